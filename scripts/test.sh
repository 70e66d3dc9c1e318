#!/usr/bin/env bash
# The README's second command: set up everything the tests need (packages, guest image, a
# one-host Grid Engine cell with qmaster and execd running) and run the whole test suite.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
scripts/setup.sh
if [ -x scripts/sge-cell.sh ]; then
    scripts/sge-cell.sh start
fi
echo "--- cargo fmt --check" >&2
cargo fmt --all -- --check
echo "--- cargo clippy --workspace --all-targets -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "--- cargo build --workspace --bins (the end-to-end tests run the built sge_virtualizer)" >&2
cargo build --workspace --bins
echo "--- cargo test --workspace" >&2
# Two test threads: each VM test boots a guest under software emulation, on two cores.
suite_rc=0
cargo test --workspace --no-fail-fast -- --test-threads=2 || suite_rc=$?
# The embedded VMM's job path needs hardware virtualization, which these machines lack: those
# tests run again on real KVM in a nested host (kvm-amd inside QEMU TCG), in one outer boot.
echo "--- nested real-KVM tier (scripts/test-nested-kvm.sh)" >&2
nested_rc=0
scripts/test-nested-kvm.sh || nested_rc=$?
echo "--- scripts/fuzz.sh -s 20 (AFL++ on each guest-facing parser; fuzz/README.md)" >&2
fuzz_rc=0
scripts/fuzz.sh -s 20 -o target/fuzz-ci || fuzz_rc=$?
if [ "$suite_rc" != 0 ] || [ "$nested_rc" != 0 ] || [ "$fuzz_rc" != 0 ]; then
    echo "--- FAILED: cargo test exit $suite_rc, nested real-KVM tier exit $nested_rc," \
        "fuzz exit $fuzz_rc" >&2
    exit 1
fi
