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
# The same init built under another version (VERSION+next), in a target directory of its own
# so that neither build undoes the other: the newer init of the takeover tests and demo.
version=$(cargo metadata --no-deps --format-version 1 --locked |
  python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="bootlace-init"))')
BOOTLACE_INIT_VERSION="$version+next" RUSTFLAGS="${RUSTFLAGS:-}$([ "$target" = x86_64-unknown-linux-gnu ] && echo ' -C target-feature=+crt-static')" \
  cargo build --quiet --release --locked --target "$target" --target-dir target/guest-next -p bootlace-init
install -m 0755 "target/guest-next/$target/release/bootlace-init" "$out/bootlace-init-next.tmp"
mv -f "$out/bootlace-init-next.tmp" "$out/bootlace-init-next"
echo "build-guest: $out/bootlace-init ($target, $(stat -c %s "$out/bootlace-init") bytes)"
