# bootlace — two commands on a fresh machine: `make demo` and `make test`.
# Every target installs what it needs first (qemu/setup.sh, idempotent).

CARGO ?= cargo

.PHONY: all setup guest build demo lint test bench fuzz clean

all: build

setup:
	@bash qemu/setup.sh

# Static guest binaries (bootlace-init, the test probe) -> target/bootlace/
guest: setup
	@bash scripts/build-guest.sh

build: guest
	$(CARGO) build --release --locked -p bootlace-image -p bootlace-vm -p bootlace-agent

demo: build
	@bash scripts/demo.sh

lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

# All tiers: pure unit tests, root-only tests (marked #[ignore = "needs root"]: run here when
# make runs as root, as CI does; listed as ignored otherwise), builder tests, and VM tests that
# boot real QEMU guests.
ROOT_TESTS := $(shell [ "$$(id -u)" = 0 ] && echo --include-ignored)
test: guest lint
	@[ -n "$(ROOT_TESTS)" ] || echo "make test: not root: the root-only tests are listed as ignored, not run" >&2
	$(CARGO) test --locked --workspace -- $(ROOT_TESTS)
	$(CARGO) test --locked -p bootlace-tests --test static_init -- --nocapture guest_binaries_are_static

# Benchmarks (not tests): medians and ratios measured side by side; see docs/performance.md.
bench: build
	$(CARGO) build --release --locked -p bootlace-bench
	./target/release/bench-boot
	./target/release/bench-native
	./target/release/bench-agent-scale
	./target/release/bench-fleet
	./target/release/bench-bundle-memory
	./target/release/bench-bake
	./target/release/bench-writable
	./target/release/bench-debian
	./target/release/bench-disk-boot

# Fuzzing (not part of `make test`, which replays the committed corpora): every target for
# FUZZ_SECONDS (default 600) each, one after another; see docs/fuzzing.md.
FUZZ_SECONDS ?= 600
fuzz:
	@FUZZ_SECONDS=$(FUZZ_SECONDS) bash scripts/fuzz.sh

clean:
	$(CARGO) clean
