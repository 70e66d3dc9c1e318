#!/usr/bin/env bash
# Coverage-guided fuzzing of the guest-facing parsers (the fuzz/ crate) with AFL++ through
# afl.rs, on the stable toolchain. Installs cargo-afl (and builds its AFL++) when missing,
# builds the targets instrumented, and runs each target in turn — one afl-fuzz at a time —
# for a time or a number of executions; prints executions, exec/s, corpus and crashes per
# target; exits 1 if any target crashed (crashing inputs: $OUT/<target>/default/crashes/).
#
#   scripts/fuzz.sh [-s SECONDS | -n EXECUTIONS] [-o OUT] [TARGET...]
#
# Defaults: 60 s per target, all targets, OUT=target/fuzz-runs. A second run on the same OUT
# resumes from the corpus found so far. Replay a crash with the plain build:
#   cargo run -p fuzz --bin fuzz_<target> -- <crash file>
#
# System settings: none are changed. AFL++ would like core dumps not piped to a helper and the
# CPU governor at "performance"; AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES and AFL_SKIP_CPUFREQ
# tell it to go on without them (crashes are still seen: a panic aborts the target).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

ALL_TARGETS=(virtqueue_chains vsock_packets fuse_request block_request agent_frames net_frames snapshot_file)
SECONDS_PER_TARGET=60
EXECS=""
OUT="$REPO/target/fuzz-runs"
while getopts "s:n:o:h" opt; do
    case "$opt" in
        s) SECONDS_PER_TARGET=$OPTARG ;;
        n) EXECS=$OPTARG ;;
        o) OUT=$(realpath -m "$OPTARG") ;;
        *) sed -n '2,17p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=("${ALL_TARGETS[@]}")
for t in "${TARGETS[@]}"; do
    [[ " ${ALL_TARGETS[*]} " == *" $t "* ]] || { echo "unknown target $t (known: ${ALL_TARGETS[*]})" >&2; exit 2; }
done

if ! cargo afl --version >/dev/null 2>&1; then
    echo "--- installing cargo-afl" >&2
    cargo install cargo-afl --locked
fi
# Builds AFL++ and its runtime for this rustc once; says "already built" (an error) after.
cargo afl config --build >/dev/null 2>&1 || true

echo "--- cargo afl build --release -p fuzz --features afl" >&2
# A target directory of its own: the instrumented build must not replace the normal one.
export CARGO_TARGET_DIR="$REPO/target/afl"
cargo afl build --release -p fuzz --features afl --bins
BIN="$CARGO_TARGET_DIR/release"

# The cases make scratch directories (shares, disks, sockets); on tmpfs when there is one.
SCRATCH=$(mktemp -d "${FUZZ_SCRATCH:-/dev/shm}/sge-fuzz.XXXXXX" 2>/dev/null || mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export TMPDIR="$SCRATCH"
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_AUTORESUME=1
# The machine is shared: do not pin a core.
export AFL_NO_AFFINITY=1

stat_of() { awk -F' *: *' -v k="$2" '$1 == k { print $2 }' "$1"; }

SUMMARY=()
CRASHED=0
for t in "${TARGETS[@]}"; do
    dir="$OUT/$t"
    mkdir -p "$dir"
    rm -rf "$dir/seeds"
    FUZZ_WRITE_SEEDS="$dir/seeds" "$BIN/fuzz_$t"
    if [ -n "$EXECS" ]; then limit=(-E "$EXECS"); else limit=(-V "$SECONDS_PER_TARGET"); fi
    echo "--- fuzz_$t (${limit[*]})" >&2
    # Timeouts: 1 s per case (the queue targets take about a millisecond).
    cargo afl fuzz -i "$dir/seeds" -o "$dir" -t 1000 "${limit[@]}" -- "$BIN/fuzz_$t" \
        >"$dir/afl-fuzz.log" 2>&1 || { tail -20 "$dir/afl-fuzz.log" >&2; echo "afl-fuzz failed for $t" >&2; exit 1; }
    stats="$dir/default/fuzzer_stats"
    execs=$(stat_of "$stats" execs_done)
    speed=$(stat_of "$stats" execs_per_sec)
    runtime=$(stat_of "$stats" run_time)
    corpus=$(stat_of "$stats" corpus_count)
    edges=$(stat_of "$stats" edges_found)
    crashes=$(stat_of "$stats" saved_crashes)
    hangs=$(stat_of "$stats" saved_hangs)
    SUMMARY+=("$(printf '%-18s %12s %10s %8s %8s %8s %8s %6s' "$t" "$execs" "$speed" "$runtime" "$corpus" "$edges" "$crashes" "$hangs")")
    if [ "${crashes:-0}" != 0 ]; then
        CRASHED=1
        echo "CRASH: $t: inputs in $dir/default/crashes/" >&2
    fi
done

printf '%-18s %12s %10s %8s %8s %8s %8s %6s\n' target execs exec/s seconds corpus edges crashes hangs
printf '%s\n' "${SUMMARY[@]}"
exit "$CRASHED"
