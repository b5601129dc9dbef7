#!/usr/bin/env bash
# Installs what bootlace's build, demo and tests need and is missing: Debian packages (QEMU, a
# Debian kernel with its modules, busybox-static, cpio, mkfs tools, qemu-img, OVMF, systemd's EFI
# stub and mtools for bootable disks (fdisk's sfdisk reads their tables in the tests), openssl for the key
# tests, umoci for the tests that bake OCI layouts made by a real tool), the Rust musl target and
# vhost-device-vsock (cargo install). Idempotent: when everything is present it only checks, in
# well under a second.
set -euo pipefail

log() { echo "setup: $*" >&2; }

pkg_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}

wanted=(qemu-system-x86 qemu-utils linux-image-amd64 busybox-static cpio e2fsprogs erofs-utils dosfstools mtools
  ovmf systemd-boot-efi fdisk
  squashfs-tools xorriso socat zstd kmod debootstrap openssl umoci)
missing_packages() {
  missing=()
  for pkg in "${wanted[@]}"; do
    pkg_installed "$pkg" || missing+=("$pkg")
  done
}

# Two passes: installing one package can remove another that conflicts with it (a newer
# qemu-utils goes when Debian's qemu-system-x86 comes in); the second pass brings it back in the
# matching version. apt-get update runs once.
updated=""
for _pass in 1 2; do
  missing_packages
  ((${#missing[@]})) || break
  log "installing ${missing[*]}"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { log "need root (or sudo) to install ${missing[*]}"; exit 1; }
    sudo="sudo"
  fi
  [ -n "$updated" ] || { $sudo apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
done
missing_packages
if ((${#missing[@]})); then
  log "still missing after installing: ${missing[*]}"
  exit 1
fi

# The kernel image must be readable by whoever runs QEMU.
for k in /boot/vmlinuz-*; do
  [ -r "$k" ] || log "warning: $k is not readable by $(id -un)"
done

if command -v rustup >/dev/null; then
  if ! rustup target list --installed | grep -qx x86_64-unknown-linux-musl; then
    log "adding the x86_64-unknown-linux-musl target"
    rustup target add x86_64-unknown-linux-musl >/dev/null 2>&1 \
      || log "musl target unavailable: the init is built for glibc with crt-static instead"
  fi
fi

# vhost-device-vsock serves guest vsock on hosts without /dev/vhost-vsock (bootlace-vm --vsock,
# the vsock VM tests). bootlace-vm looks at $BOOTLACE_VHOST_DEVICE_VSOCK, PATH, ~/.cargo/bin.
vsock_daemon_present() {
  [ -n "${BOOTLACE_VHOST_DEVICE_VSOCK:-}" ] && [ -x "$BOOTLACE_VHOST_DEVICE_VSOCK" ] && return 0
  command -v vhost-device-vsock >/dev/null && return 0
  [ -n "${CARGO_HOME:-}" ] && [ -x "$CARGO_HOME/bin/vhost-device-vsock" ] && return 0
  [ -x "${HOME:-}/.cargo/bin/vhost-device-vsock" ]
}
if ! vsock_daemon_present; then
  if command -v cargo >/dev/null; then
    log "installing vhost-device-vsock (cargo install --locked; takes a few minutes once)"
    cargo install --locked --quiet vhost-device-vsock \
      || { log "cargo install vhost-device-vsock failed"; exit 1; }
  else
    log "warning: vhost-device-vsock is missing and cargo is not available to install it"
  fi
fi
