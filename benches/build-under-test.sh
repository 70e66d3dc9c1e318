#!/usr/bin/env bash
# build-under-test.sh REV DIR: build the sge_virtualizer release binary and the guest image of
# commit REV into DIR (DIR/sge_virtualizer, DIR/guest/{vmlinux,initramfs.cpio,manifest.json},
# DIR/REVISION) from a clean `git archive`, not from the shared working tree, so a benchmark
# names exactly what it measured and two revisions can be compared (before/after).
#
# Cargo's target dir is ${BENCH_TARGET_DIR:-/work/target-bench-rev} (shared between revisions so
# dependencies build once). The guest kernel comes from build-guest-image.sh's cache.
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 REV DIR" >&2; exit 2; }
rev=$1
out=$2
repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
sha=$(git -C "$repo" rev-parse --verify "$rev^{commit}")
target=${BENCH_TARGET_DIR:-/work/target-bench-rev}
mkdir -p "$out"
out=$(cd "$out" && pwd)
src=$out/src
rm -rf "$src"
mkdir -p "$src"
git -C "$repo" archive "$sha" | tar -x -C "$src"
(cd "$src" && CARGO_TARGET_DIR=$target cargo build --release -p shepherd)
cp "$target/release/sge_virtualizer" "$out/sge_virtualizer.tmp"
mv "$out/sge_virtualizer.tmp" "$out/sge_virtualizer"
"$src/scripts/build-guest-image.sh" --out "$out/guest"
printf '%s %s\n' "$sha" "$(git -C "$repo" log -1 --format=%s "$sha")" >"$out/REVISION"
echo "built $sha into $out"
