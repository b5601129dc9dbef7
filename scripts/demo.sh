#!/usr/bin/env bash
# make demo: bake a small busybox image with bootlace-init and boot it under QEMU three ways.
set -euo pipefail
cd "$(dirname "$0")/.."
image=target/release/bootlace-image
vm=target/release/bootlace-vm
init=target/bootlace/bootlace-init
out=target/demo
mkdir -p "$out"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "building the demo root filesystem (busybox) in $out/rootfs"
bash tests/fixtures/busybox-rootfs.sh "$out/rootfs"
mkdir -p "$out/rootfs/demo"
cat > "$out/rootfs/demo/app.sh" <<'APP'
#!/bin/sh
echo "-- demo app: supervised by bootlace-init (PID 1 is '$(cat /proc/1/comm)'), my pid $$"
echo "-- kernel $(uname -r); modules bootlace loaded:" $(cut -d' ' -f1 /proc/modules)
echo "-- mounts:" $(awk '{print $2}' /proc/mounts)
echo "-- leaving 3 orphans behind (sleep 600); bootlace reaps them at exit"
for i in 1 2 3; do (sleep 600 &); done
exit 0
APP
cat > "$out/rootfs/etc/inittab" <<'TAB'
::sysinit:/bin/echo "-- busybox init is PID 1 now: bootlace-init exec'd it"
::sysinit:/bin/sh -c 'echo "-- PID 1 is $(cat /proc/1/comm); its fds:" $(ls /proc/1/fd)'
::sysinit:/sbin/poweroff
TAB

say "baking $out/supervise.img: bootlace-init supervising /demo/app.sh, with virtio_blk and 9pnet_virtio"
"$image" initramfs --rootfs "$out/rootfs" --init "$init" --out "$out/supervise.img" \
  --handoff supervise --exec "/bin/sh /demo/app.sh" --module virtio_blk --module 9pnet_virtio
say "booting it under QEMU (TCG); console follows"
set +e
"$vm" run --initrd "$out/supervise.img" --console-log "$out/supervise.console.log"
s1=$?

say "baking $out/exec.img: bootlace-init handing PID 1 over to busybox init"
"$image" initramfs --rootfs "$out/rootfs" --init "$init" --out "$out/exec.img" --exec /sbin/init
say "booting it"
"$vm" run --initrd "$out/exec.img" --console-log "$out/exec.console.log"
s2=$?

say "booting exec.img with a typo on the kernel command line (bootlace.hanfoff=exec)"
"$vm" run --initrd "$out/exec.img" --append bootlace.hanfoff=exec --console-log "$out/typo.console.log"
s3=$?
set -e

say "summary"
printf '  %-52s exit %s\n' "supervise: app exits 0, orphans reaped, power-off" "$s1" \
  "exec: busybox init becomes PID 1 and powers off" "$s2" \
  "typo: clear error, EXIT_STATUS=78, clean power-off" "$s3"
echo "  console logs: $out/*.console.log"
[ "$s1" = 0 ] && [ "$s2" = 0 ] && [ "$s3" = 78 ]
