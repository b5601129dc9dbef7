#!/usr/bin/env bash
# make demo: bake a small busybox base image with bootlace-init, build a bootstrap bundle, and
# boot the image under QEMU five ways (the last as a read-only erofs root chosen by name).
set -euo pipefail
cd "$(dirname "$0")/.."
image=target/release/bootlace-image
vm=target/release/bootlace-vm
init=target/bootlace/bootlace-init
out=target/demo
rm -rf "$out"
mkdir -p "$out"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "base image: busybox rootfs + bootlace-init, looking for a bootstrap on a disk or a 9p share"
bash tests/fixtures/busybox-rootfs.sh "$out/rootfs"
mkdir -p "$out/rootfs/demo"
echo "this /etc/motd comes from the base image" > "$out/rootfs/etc/motd"
cat > "$out/rootfs/demo/app.sh" <<'APP'
#!/bin/sh
echo "-- app: supervised by bootlace-init (PID 1 is '$(cat /proc/1/comm)'), hostname $(hostname)"
echo "-- app: APP_MODE=$APP_MODE; /etc/motd: $(cat /etc/motd); /etc/app.conf: $(cat /etc/app.conf)"
echo "-- app: /.bootstrap: $(ls -d /.bootstrap 2>&1 | sed 's/.*No such file.*/gone/'); mounts:" $(awk '{print $2}' /proc/mounts)
echo "-- app: leaving 3 orphans behind (sleep 600); bootlace reaps them when I exit"
for i in 1 2 3; do (sleep 600 &); done
exit 0
APP
cat > "$out/rootfs/etc/inittab" <<'TAB'
::sysinit:/bin/sh -c 'echo "-- busybox init is PID 1 now: bootlace-init exec-ed it; hostname $(hostname); fds:" $(ls /proc/1/fd)'
::sysinit:/sbin/poweroff
TAB
"$image" initramfs --rootfs "$out/rootfs" --init "$init" --out "$out/base.img" \
  --source disk,9p --exec /sbin/init

say "bootstrap bundle: bootlace.toml + a file, validated and made into an erofs disk image"
mkdir -p "$out/bundle/files"
echo "listen = 8080" > "$out/bundle/files/app.conf"
cat > "$out/bundle/bootlace.toml" <<'TOML'
version = 1
hostname = "demo-vm"
env = { APP_MODE = "demo" }

[[mounts]]                 # a writable /etc, seeded with the image's /etc
type = "tmpfs"
path = "/etc"

[[files]]
path = "/etc/app.conf"
source = "files/app.conf"
mode = 0o640

[[run]]
name = "greet"
command = ["/bin/sh", "-c", "echo '-- manifest command: hello from the bundle'"]

[handoff]                  # run the app under bootlace instead of exec-ing /sbin/init
mode = "supervise"
command = ["/bin/sh", "/demo/app.sh"]
TOML
sed 's/^\[handoff\].*//; s/^mode = "supervise"//; s/^command = \["\/bin\/sh", "\/demo\/app.sh"\]//' \
  "$out/bundle/bootlace.toml" > "$out/exec-bundle.toml"
"$image" bundle "$out/bundle" --format disk-erofs --out "$out/bundle.img"

set +e
say "boot 1: bundle on a virtio disk -> manifest applied -> app supervised -> power-off"
"$vm" run --initrd "$out/base.img" --bootstrap-disk "$out/bundle.img" --console-log "$out/disk.console.log"
s1=$?

say "boot 2: the same bundle over 9p, without the hand-off override -> exec busybox init"
mkdir -p "$out/share" && cp -r "$out/bundle/files" "$out/share/" && cp "$out/exec-bundle.toml" "$out/share/bootlace.toml"
"$vm" run --initrd "$out/base.img" --bootstrap-9p "$out/share" --console-log "$out/9p.console.log"
s2=$?

say "boot 3: the bundle as a tarball fetched over vsock (digest pinned), reported to a host agent"
"$image" bundle "$out/bundle" --format tar.gz --out "$out/bundle.tar.gz" | tee "$out/bundle.digest"
digest=$(tail -n 1 "$out/bundle.digest")
"$image" initramfs --rootfs "$out/rootfs" --init "$init" --out "$out/vsock.img" \
  --source vsock --host vsock:2:1024 --digest "$digest" --exec /sbin/init >/dev/null
"$vm" run --initrd "$out/vsock.img" --bootstrap-vsock "$out/bundle.tar.gz" --console-log "$out/vsock.console.log"
s4=$?

say "boot 4: no bundle attached (bootstrap required) -> the error lists what was probed"
"$vm" run --initrd "$out/base.img" --append bootlace.log=warn --console-log "$out/missing.console.log"
s3=$?

say "boot 5: the rootfs baked as a read-only erofs root + a stage-1 initramfs, booted by name"
mkdir -p "$out/images"
"$image" bake --format erofs --input "$out/rootfs" --init "$init" --source 9p \
  --exec /sbin/init --name demo --version 1.0 --out "$out/images/demo-1.0.erofs" | tail -n 2
"$image" bake --format initramfs --stage1 --init "$init" --name stage1 --version 1.0 \
  --out "$out/images/stage1-1.0.img" | tail -n 1
# Version 2.0 does not exist: bootlace-vm warns and boots the default (highest) version.
"$vm" run --images "$out/images" --image demo@2.0 --bootstrap-9p "$out/bundle" \
  --console-log "$out/erofs.console.log"
s5=$?
set -e

say "summary"
printf '  %-68s exit %s\n' "disk bundle: manifest applied, app exits 0, orphans reaped" "$s1" \
  "9p bundle: exec hand-off to busybox init, which powers off" "$s2" \
  "vsock bundle: HELLO/STEP/READY/EXIT at the host agent, app exits 0" "$s4" \
  "no bundle: clear error, EXIT_STATUS=71, clean power-off" "$s3" \
  "erofs root by name (2.0 missing -> 1.0): stage 1, switch_root, bootstrap" "$s5"
grep -h "bootlace: timeline" "$out/disk.console.log" | sed 's/^/  disk: /'
echo "  console logs: $out/*.console.log"
[ "$s1" = 0 ] && [ "$s2" = 0 ] && [ "$s3" = 71 ] && [ "$s4" = 0 ] && [ "$s5" = 0 ]
