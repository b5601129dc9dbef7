#!/bin/bash
# A Debian bookworm root with systemd, as an image author bakes one:
#   debootstrap --variant=minbase --include=systemd-sysv,udev,dbus bookworm DIR
# Cached: DIR.complete (beside it, not in the image) marks a finished root; an unfinished one is made
# again. The mirror is the one apt on this machine uses (debootstrap's own default otherwise).
# Usage: scripts/debian-root.sh DIR
set -euo pipefail
dir=${1:?usage: debian-root.sh DIR}
stamp="$dir.complete"
if [ -f "$stamp" ]; then
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debian-root: debootstrap is missing: make setup installs it" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "debian-root: debootstrap needs root" >&2; exit 1; }

# The mirror apt uses for bookworm: a deb822 entry's URIs, else a one-line source.
mirror=""
for f in /etc/apt/sources.list.d/*.sources; do
  [ -f "$f" ] || continue
  mirror=$(awk '/^URIs:/ {u=$2} /^Suites:/ && / bookworm( |$)/ && u {print u; exit}' "$f")
  [ -n "$mirror" ] && break
done
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list)
fi

rm -rf "$dir.partial"
mkdir -p "$(dirname "$dir")"
echo "debian-root: debootstrap bookworm (minbase, systemd-sysv udev dbus) into $dir${mirror:+ from $mirror}" >&2
debootstrap --variant=minbase --include=systemd-sysv,udev,dbus bookworm "$dir.partial" ${mirror:+"$mirror"} \
  > "$dir.log" 2>&1 || { tail -20 "$dir.log" >&2; echo "debian-root: debootstrap failed (log: $dir.log)" >&2; exit 1; }
# What an image author trims: the package cache.
rm -rf "$dir.partial"/var/cache/apt/archives/*.deb "$dir.partial"/var/lib/apt/lists/*
rm -rf "$dir"
mv "$dir.partial" "$dir"
touch "$stamp"
