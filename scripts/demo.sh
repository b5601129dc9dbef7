#!/usr/bin/env bash
# make demo: bake a small busybox base image with bootlace-init, build a bootstrap bundle, and
# boot the image under QEMU five ways (the last as a read-only erofs root chosen by name), then a
# fleet: two guests of one image configured by one host agent, a task, a captured version, and
# the image as a bootable disk booted through UEFI firmware.
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

say "boot 6+7: a fleet: one image, two guests, one host agent; each its own configuration"
# The image trusts a key, pins nothing: each guest's bundle is trusted by a signature or by a
# digest its VMM hands it out of band (SMBIOS type 11), without a rebake.
agent=target/release/bootlace-agent
"$image" keygen --out "$out/fleet.key" >/dev/null
"$image" bake --format initramfs --input "$out/rootfs" --init "$init" --out "$out/fleet.img" \
  --source vsock --host vsock:2:1024 --trust-key "$out/fleet.key.pub" --exec /sbin/init \
  --name demo-fleet --version 1 | tail -n 1
mkdir -p "$out/web-1" && cp -r "$out/bundle/files" "$out/web-1/"
sed 's/^hostname = .*/hostname = "web-1"/' "$out/bundle/bootlace.toml" > "$out/web-1/bootlace.toml"
"$image" bundle "$out/web-1" --format tar.gz --out "$out/web-1.tar.gz" --sign "$out/fleet.key" | tail -n 1
cat > "$out/fleet.toml" <<TOML
[defaults]
image = "demo-fleet@1"

[guests.web-1]                # its own bundle, signed by the key the image trusts
socket = "vm1/vsock"
bundle = "web-1.tar.gz"

[guests.web-2]                # the shared bundle with its hostname and vars written in
socket = "vm2/vsock"
bundle = "bundle"
hostname = "web-2"
vars = { APP_MODE = "fleet" }
TOML
web2=$("$agent" resolve --fleet "$out/fleet.toml" --json web-2 | sed 's/.*"sha256":"\([0-9a-f]*\)".*/\1/')
echo "  web-2's bundle, composed by the agent: sha256:$web2 (handed to its VM over SMBIOS)"
"$agent" serve --fleet "$out/fleet.toml" --status-socket "$out/agent.sock" > "$out/agent.log" 2>&1 &
agent_pid=$!
"$vm" run --initrd "$out/fleet.img" --vsock-dir "$out/vm1" --guest-cid 3 --uuid 6f1c0000-0000-4000-8000-000000000001 \
  --console-log "$out/web-1.console.log" > "$out/web-1.out" 2>&1 &
vm1=$!
"$vm" run --initrd "$out/fleet.img" --vsock-dir "$out/vm2" --guest-cid 4 --uuid 6f1c0000-0000-4000-8000-000000000002 \
  --oob-digest "sha256:$web2" --oob-via smbios --console-log "$out/web-2.console.log" > "$out/web-2.out" 2>&1 &
vm2=$!
wait "$vm1"; s6=$?
wait "$vm2"; s7=$?
grep -h -- "-- app:.*hostname" "$out/web-1.out" "$out/web-2.out" | sed 's/^/  /'
"$agent" status --socket "$out/agent.sock" | sed 's/^/  /'
kill "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null

say "boot 8: a task of three guests of one image file, one host agent, a table at the end"
"$image" bake --format initramfs --input "$out/rootfs" --init "$init" --source vsock \
  --host vsock:2:1024 --exec /sbin/init --name demo-task --version 1 \
  --out "$out/images/demo-task-1.img" 2>/dev/null | tail -n 1
cat > "$out/demo.task.toml" <<'TOML'
name = "demo"
image = "demo-task@1"
images = "images"
count = 3
bundle = "bundle"                  # the demo bundle: its app prints the hostname and APP_MODE
hostname = "demo-{n}"
vars = { APP_MODE = "task-{n}" }

[restart]
policy = "on-failure"
max = 1
TOML
"$vm" up "$out/demo.task.toml" --logs "$out/task-logs" 2> "$out/task.err"
s8=$?
grep -h -- "-- app:.*hostname" "$out"/task-logs/*.log 2>/dev/null | sed 's/^.*-- app/  -- app/' | sort

say "capture: a guest configured by a bundle, baked as the image's next version, booted by name"
cat > "$out/rootfs/demo/show.sh" <<'SH'
#!/bin/sh
echo "-- captured: /etc/hostname $(cat /etc/hostname 2>&1); /etc/app.conf: $(cat /etc/app.conf 2>&1); no bundle: /.bootstrap has $(ls -A /.bootstrap 2>/dev/null | wc -l) entries"
SH
"$image" bake --format ext4 --input "$out/rootfs" --init "$init" --handoff supervise \
  --exec "/bin/sh /demo/show.sh" --extra-module vmw_vsock_virtio_transport \
  --name demo-app --version 1.0 --out "$out/images/demo-app-1.0.ext4" | tail -n 1
mkdir -p "$out/capture-bundle/files"
echo "configured = once, captured for every guest" > "$out/capture-bundle/files/app.conf"
cat > "$out/capture-bundle/bootlace.toml" <<'TOML'
version = 1
hostname = "captured-vm"

[[files]]
path = "/etc/app.conf"
source = "files/app.conf"
mode = 0o644
TOML
"$image" bundle "$out/capture-bundle" --format tar.gz --out "$out/capture-bundle.tar.gz" >/dev/null
"$image" capture --images "$out/images" --image demo-app@1.0 --bundle "$out/capture-bundle.tar.gz" \
  --console-log "$out/capture.console.log" 2>&1 | tail -n 3 | sed 's/^/  /'
"$vm" run --images "$out/images" --image demo-app@1.1 --console-log "$out/captured.console.log" \
  > "$out/captured.out" 2>&1
s9=$?
grep -h -- "-- captured:" "$out/captured.out" | sed 's/^/  /'

say "bootable disk: GPT + EFI system partition (unified kernel image) + root, booted by UEFI firmware"
# No -kernel: OVMF boots \EFI\BOOT\BOOTX64.EFI (systemd's EFI stub + kernel + stage 1 + command
# line); the guest's configuration comes over vsock, trusted by a digest handed over SMBIOS.
"$image" bake --format disk --disk-format qcow2 --input "$out/rootfs" --init "$init" \
  --source vsock --host vsock:2:1024 --exec /sbin/init --name demo-disk --version 1.0 \
  --out "$out/images/demo-disk-1.0.qcow2" | head -n 1
"$vm" run --images "$out/images" --image demo-disk --bootstrap-vsock "$out/bundle.tar.gz" \
  --oob-digest bundle --console-log "$out/uefi.console.log" > "$out/uefi.out" 2>&1
s10=$?
grep -h -e "booting demo-disk" -e "stage1: root" -e "-- app:.*hostname" -e "READY" "$out/uefi.out" \
  | sed 's/^/  /' | head -n 6
set -e

say "summary"
printf '  %-68s exit %s\n' "disk bundle: manifest applied, app exits 0, orphans reaped" "$s1" \
  "9p bundle: exec hand-off to busybox init, which powers off" "$s2" \
  "vsock bundle: HELLO/STEP/READY/EXIT at the host agent, app exits 0" "$s4" \
  "no bundle: clear error, EXIT_STATUS=71, clean power-off" "$s3" \
  "erofs root by name (2.0 missing -> 1.0): stage 1, switch_root, bootstrap" "$s5" \
  "fleet web-1: its own bundle, trusted by signature" "$s6" \
  "fleet web-2: the shared bundle + its hostname, trusted by an SMBIOS digest" "$s7" \
  "task: three guests of one image file, each its hostname, one agent" "$s8" \
  "capture: demo-app@1.1 booted by name, configured, no bundle" "$s9" \
  "bootable disk (qcow2) through UEFI firmware, bundle over vsock" "$s10"
grep -h "bootlace: timeline" "$out/disk.console.log" | sed 's/^/  disk: /'
echo "  console logs: $out/*.console.log"
[ "$s1" = 0 ] && [ "$s2" = 0 ] && [ "$s3" = 71 ] && [ "$s4" = 0 ] && [ "$s5" = 0 ] && [ "$s6" = 0 ] && [ "$s7" = 0 ] && [ "$s8" = 0 ] && [ "$s9" = 0 ] && [ "$s10" = 0 ]
