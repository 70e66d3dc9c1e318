#!/usr/bin/env bash
# build-bench-vm.sh REV DIR [PATCH]: build `bench-vm` (the embedded VMM in a minimal process,
# benches/src/vm_child_main.rs) from commit REV, with PATCH applied to that tree if given,
# into DIR/bench-vm, and write DIR/REVISION. `bench-report compare-vmm` then boots the tiny
# guest with two such builds interleaved: the before/after of a change to the vmm crate that
# is measured here before it is proposed to the vmm crate's owner.
set -euo pipefail
[[ $# -ge 2 && $# -le 3 ]] || { echo "usage: $0 REV DIR [PATCH]" >&2; exit 2; }
rev=$1
out=$2
patch=${3:-}
repo=$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)
sha=$(git -C "$repo" rev-parse --verify "$rev^{commit}")
target=${BENCH_TARGET_DIR:-/work/target-bench-rev}
[[ -z $patch ]] || patch=$(cd "$(dirname "$patch")" && pwd)/$(basename "$patch")
mkdir -p "$out"
out=$(cd "$out" && pwd)
src=$out/src
rm -rf "$src"
mkdir -p "$src"
git -C "$repo" archive "$sha" | tar -x -C "$src"
[[ -z $patch ]] || patch -d "$src" -p1 <"$patch"
(cd "$src" && CARGO_TARGET_DIR=$target cargo build --release -p benchmarks --bin bench-vm)
cp "$target/release/bench-vm" "$out/bench-vm.tmp"
mv "$out/bench-vm.tmp" "$out/bench-vm"
printf '%s %s%s\n' "$sha" "$(git -C "$repo" log -1 --format=%s "$sha")" \
    "${patch:+ + patch $(basename "$patch")}" >"$out/REVISION"
echo "built bench-vm of $sha${patch:+ + $(basename "$patch")} into $out"
