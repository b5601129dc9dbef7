#!/usr/bin/env bash
# Installs what `make fuzz` needs, idempotently: cargo-fuzz (only if missing), and picks the
# toolchain. libFuzzer instrumentation needs nightly flags (-Zsanitizer, sancov): with a
# nightly toolchain present, `cargo +nightly fuzz`; otherwise stable with RUSTC_BOOTSTRAP=1.
# Prints the command prefix to use on its last line (consumed by scripts/fuzz.sh).
set -euo pipefail

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "setup-fuzz: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked >&2
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "cargo +nightly fuzz"
else
    echo "setup-fuzz: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1" >&2
    echo "env RUSTC_BOOTSTRAP=1 cargo fuzz"
fi
