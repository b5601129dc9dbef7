#!/usr/bin/env bash
# Builds the guest binaries (bootlace-init and the test probe) as static executables and puts
# them in target/bootlace/. musl when its target is installed, else glibc with crt-static.
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/bootlace
mkdir -p "$out"
if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
  target=x86_64-unknown-linux-musl
  cargo build --quiet --release --locked --target "$target" -p bootlace-init -p bootlace-probe -p bootlace-floor
else
  target=x86_64-unknown-linux-gnu
  echo "build-guest: musl target not installed; building $target with crt-static" >&2
  RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --quiet --release --locked --target "$target" -p bootlace-init -p bootlace-probe -p bootlace-floor
fi
for bin in bootlace-init bootlace-probe bootlace-floor; do
  install -m 0755 "target/$target/release/$bin" "$out/$bin.tmp"
  mv -f "$out/$bin.tmp" "$out/$bin"
done
echo "build-guest: $out/bootlace-init ($target, $(stat -c %s "$out/bootlace-init") bytes)"
