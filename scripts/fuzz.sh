#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 600) each, one after another, one worker
# each. New inputs go to fuzz/work/<target> (not committed); the committed corpus in
# fuzz/corpus/<target> is read as seeds. A crash ends that target's run (the input is left in
# fuzz/artifacts/<target>/); the other targets still run, and the script fails at the end
# naming the targets that crashed. FUZZ_TARGETS picks targets (default: all); extra arguments go to
# libFuzzer. See docs/fuzzing.md.
set -euo pipefail
cd "$(dirname "$0")/.."

FUZZ_SECONDS=${FUZZ_SECONDS:-600}
FUZZ_TARGETS=${FUZZ_TARGETS:-"manifest confine extract decompress frames host_session"}
read -r -a CARGO_FUZZ <<<"$(bash scripts/setup-fuzz.sh | tail -n 1)"

# The file-system targets write and fsync a small tree per input: keep it in memory.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
    export TMPDIR=/dev/shm
fi

# Largest single allocation allowed, in MB: caught by libFuzzer, so "no huge allocation"
# is checked on every input. Extraction and decompression may use a zstd window of up to
# 32 MiB (extract::MAX_ZSTD_WINDOW); the others never need more than 1 MiB.
malloc_limit() {
    case "$1" in
        extract | decompress) echo 96 ;;
        *) echo 8 ;;
    esac
}

cd fuzz
"${CARGO_FUZZ[@]}" build
failed=()
for t in $FUZZ_TARGETS; do
    mkdir -p "work/$t"
    echo "== fuzz $t for ${FUZZ_SECONDS}s"
    if ! "${CARGO_FUZZ[@]}" run "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$FUZZ_SECONDS" -timeout=20 -rss_limit_mb=2048 \
        -malloc_limit_mb="$(malloc_limit "$t")" -print_final_stats=1 "$@"; then
        failed+=("$t")
    fi
done
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/<target>/)" >&2
    exit 1
fi
echo "fuzz: every target ran ${FUZZ_SECONDS}s without a crash"
