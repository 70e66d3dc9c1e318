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
cargo test --workspace --no-fail-fast -- --test-threads=2
echo "--- scripts/fuzz.sh -s 20 (AFL++ on each guest-facing parser; fuzz/README.md)" >&2
scripts/fuzz.sh -s 20 -o target/fuzz-ci
