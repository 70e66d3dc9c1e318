#!/usr/bin/env bash
# The real-KVM test tier: the tests that need hardware virtualization (the embedded VMM's job
# path), run in one boot of the nested KVM host (scripts/nested-kvm-host.sh: kvm-amd inside
# QEMU TCG), with the test binaries built here on the host.
#
#   run_e2e      embedded::*   (`run --backend embedded`: exit codes, streams, signals, SMP, …)
#   image_e2e    embedded::*   (OS image on virtio-blk, the cwd shared over virtio-fs)
#   network_e2e  embedded::*   (eth0 through virtio-net and passt to the outer host's loopback)
#   vmm real_kernel            (the real guest kernel in the VMM: vsock, virtio-fs and ext4 roots)
#   vmm snapshot_guests        (snapshot and restore of counting tiny guests on real KVM: the port
#                               access KVM holds at the exit completed, every MSR set back)
#   timings                    (an embedded job-path smoke: `run --timings -- true`, three times)
#   sge                        (a Grid Engine cell in the nested host whose jobs run in embedded
#                               VMs: scripts/nested-sge-checks.sh)
#
# Prints the number of tests run in the tier at the end; fails when any of them fails, when the
# outer host cannot boot, or when a test skips for want of vmx/svm (it must not, there).
#
# Known (2026-12-06/07, about 3 of 9 full runs on 2-core machines): the outer host's kernel
# locks up for good (soft lockups of an inner VM's vcpu or kvm-pit thread, then of every CPU),
# at different tests each time, more often under memory-heavy inner guests. nested-kvm-host.sh
# stops such a host once its kernel has reported the stall twice, and this script boots another
# for the groups that have not passed yet (below); the serial logs, at loglevel 5, carry the
# stacks. On 2026-12-07 3 of 4 outer boots of one CI run stalled, all in snapshot_guests (RCU
# stall, timers stopped; the 4th passed it), and 2 of 5 boots of a benchmark without it: the
# snapshot tests run last, so that a stall in them costs no other group a rerun.
#
# Usage: scripts/test-nested-kvm.sh [--timeout S]     (after scripts/setup.sh)
# Environment: NESTED_KVM_TIER_FILTER (default: all the groups above; a space-separated subset
#              of run_e2e image_e2e network_e2e real_kernel timings sge snapshot_guests), NESTED_KVM_TEST_THREADS (default 1),
#              NESTED_KVM_TEST_FILTER (run_e2e, image_e2e, network_e2e: only the embedded
#              tests whose names start with it),
#              NESTED_KVM_GROUP_TIMEOUT (seconds per group, default 480; sge:
#              NESTED_KVM_SGE_TIMEOUT, default 900; one outer boot: --timeout, default 1800;
#              all tries: NESTED_KVM_BUDGET, default 2700; a full tier takes 15-20 min on 2
#              busy cores).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
say() { echo "test-nested-kvm: $*" >&2; }
# Exit status of a tier in which no test failed but a group ran out of time (EX_TEMPFAIL).
STALLED=75
die() { echo "test-nested-kvm: error: $*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# Inside the outer VM: run each group, count.
if [ "${1:-}" = --inside ]; then
    shift
    # The large-guest memory tests (16 GiB and 2 GiB guests) run here too. The outer host froze
    # around them in 2 of 5 tier runs on 2026-12-06, as it freezes now and then elsewhere; a
    # frozen outer host is now stopped and the groups that have not passed run again (below).
    # NESTED_KVM_MEMORY=0 leaves them out (they print SKIPPED).
    if [ "${NESTED_KVM_MEMORY:-1}" = 0 ]; then
        export SGE_VIRTUALIZER_SKIP_LARGE_GUESTS=1
    fi
    threads=${NESTED_KVM_TEST_THREADS:-1}
    total_passed=0 total_failed=0 total_skipped=0 failed_groups=() stalled_groups=()
    log=$(mktemp)
    while [ $# -ge 2 ]; do
        name=$1; bin=$2; shift 2
        if [ "$name" = timings ]; then
            # An embedded job-path smoke on real KVM: phase timestamps of three `true` jobs.
            echo "=== timings: $bin run --backend embedded --timings -n -- true (3 runs)"
            for i in 1 2 3; do
                start=$(date +%s%N)
                if ! "$bin" run --backend embedded --kernel "$REPO/build/guest/vmlinux" \
                    --initrd "$REPO/build/guest/initramfs.cpio" --timings -n -- true 2>"$log"; then
                    cat "$log"
                    failed_groups+=(timings)
                    break
                fi
                echo "=== timings: run $i: $(( ($(date +%s%N) - start) / 1000000 )) ms wall: $(tail -n 1 "$log")"
            done
            if [[ " ${failed_groups[*]:-} " == *" timings "* ]]; then
                echo "=== group failed: timings"
            else
                echo "=== group passed: timings"
            fi
            continue
        fi
        if [ "$name" = sge ]; then
            echo "=== sge: $bin (a Grid Engine cell on real KVM)"
            start=$(date +%s)
            set +e
            # (a cell of its own first: it needs more time than a test group)
            timeout -k 10 "${NESTED_KVM_SGE_TIMEOUT:-900}" "$bin" "$SGE_VIRTUALIZER_BIN" \
                "$REPO/target/nested-kvm-sge/gridengine" 2>&1 | tee "$log"
            rc=${PIPESTATUS[0]}
            set -e
            result=$(grep -E '^nested-sge: [0-9]+ checks passed' "$log" | tail -n 1)
            passed=$(echo "$result" | sed -n 's/^nested-sge: \([0-9]*\) checks passed.*/\1/p')
            failed=$(echo "$result" | sed -n 's/.* \([0-9]*\) failed$/\1/p')
            echo "=== sge: exit $rc, ${passed:-0} checks passed, ${failed:-0} failed, $(($(date +%s) - start)) s"
            total_passed=$((total_passed + ${passed:-0}))
            total_failed=$((total_failed + ${failed:-0}))
            if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
                stalled_groups+=(sge)
                continue
            elif [ "$rc" != 0 ] || [ -z "$result" ]; then
                failed_groups+=(sge)
                echo "=== group failed: sge"
                continue
            fi
            echo "=== group passed: sge"
            continue
        fi
        filter=()
        case $name in
            run_e2e|image_e2e|network_e2e) filter=("embedded::${NESTED_KVM_TEST_FILTER:-}") ;;
        esac
        echo "=== $name: $bin ${filter[*]} (real KVM: $(grep -c -w svm /proc/cpuinfo) vCPUs with svm)"
        start=$(date +%s)
        set +e
        # A deadline per group, well inside the outer one, so a stuck group still reports.
        timeout -k 10 "${NESTED_KVM_GROUP_TIMEOUT:-480}" \
            "$bin" "${filter[@]}" --test-threads="$threads" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        set -e
        result=$(grep -E '^test result: ' "$log" | tail -n 1)
        passed=$(echo "$result" | sed -n 's/.* \([0-9]*\) passed.*/\1/p')
        failed=$(echo "$result" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
        skipped=$(grep -o 'SKIPPED[ :]' "$log" | wc -l || true)
        echo "=== $name: exit $rc, ${passed:-0} passed, ${failed:-0} failed, $skipped SKIPPED lines, $(($(date +%s) - start)) s"
        total_passed=$((total_passed + ${passed:-0}))
        total_failed=$((total_failed + ${failed:-0}))
        total_skipped=$((total_skipped + skipped))
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
            echo "=== $name: killed at its ${NESTED_KVM_GROUP_TIMEOUT:-480} s deadline"
            stalled_groups+=("$name")
            continue
        elif [ "$rc" != 0 ] || [ -z "$result" ]; then
            failed_groups+=("$name")
        fi
        if grep -q '^SKIPPED embedded::.*no vmx/svm' "$log"; then
            echo "=== $name: a test skipped for want of vmx/svm on the nested real-KVM host"
            failed_groups+=("$name(skipped)")
        fi
        if [[ " ${failed_groups[*]:-} " == *" $name"[\ \(]* ]]; then
            echo "=== group failed: $name"
        else
            echo "=== group passed: $name"
        fi
    done
    rm -f "$log"
    echo "=== nested real-KVM tier: $((total_passed - total_skipped)) tests ran and passed," \
        "$total_failed failed, $total_skipped printed SKIPPED" \
        "(groups failed: ${failed_groups[*]:-none}; stalled: ${stalled_groups[*]:-none})"
    # A group that only ran out of time (the nested host stalls now and then) is worth another
    # try; a test that failed is not.
    [ ${#failed_groups[@]} -eq 0 ] || exit 1
    [ ${#stalled_groups[@]} -eq 0 ] || exit "$STALLED"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# On the host: build the test binaries, then run them all in one boot of the outer VM.
timeout=1800
while [ $# -gt 0 ]; do
    case $1 in
        --timeout) timeout=$2; shift 2 ;;
        *) die "unknown argument $1" ;;
    esac
done
groups=${NESTED_KVM_TIER_FILTER:-run_e2e image_e2e network_e2e real_kernel timings sge snapshot_guests}

# The test executable cargo builds for `--test NAME` of package PKG.
test_executable() {
    local pkg=$1 test=$2
    cargo test -q -p "$pkg" --test "$test" --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1
}

[ -f build/guest/vmlinux ] && [ -f build/guest/initramfs.cpio ] ||
    die "no guest image in build/guest: run scripts/setup.sh first"
say "building the sge_virtualizer binary and the test executables"
# The tests run the release binary, as jobs do (set-up builds it): a debug build spends seconds
# of emulated time loading the guest kernel before each VM.
cargo build -q --release -p shepherd
export SGE_VIRTUALIZER_BIN=$REPO/target/release/sge_virtualizer
pairs=()
for g in $groups; do
    case $g in
        run_e2e|image_e2e|network_e2e) exe=$(test_executable integration-tests "$g") ;;
        real_kernel|snapshot_guests) exe=$(test_executable vmm "$g") ;;
        timings) exe=$SGE_VIRTUALIZER_BIN ;;
        sge)
            # The cell's files as the host's packages made them (installed if need be); the
            # outer host makes a fresh spool from them.
            [ -f /var/lib/gridengine/default/common/bootstrap ] || "$REPO/scripts/sge-cell.sh" install
            rm -rf "$REPO/target/nested-kvm-sge"
            mkdir -p "$REPO/target/nested-kvm-sge"
            cp -a /var/lib/gridengine "$REPO/target/nested-kvm-sge/gridengine"
            exe=$REPO/scripts/nested-sge-checks.sh
            ;;
        *) die "unknown group $g (run_e2e image_e2e network_e2e real_kernel snapshot_guests timings sge)" ;;
    esac
    [ -n "$exe" ] && [ -x "$exe" ] || die "cannot build the $g test executable"
    pairs+=("$g" "$exe")
done

# The repository (test binaries write under target/) and the OS image store (opening an image
# takes its lock file) are shared writable.
shares=(--share "$REPO")
store=${SGE_VIRTUALIZER_IMAGES:-/var/lib/sge_virtualizer/images}
[ -d "$store" ] && shares+=(--share "$store")
# Four outer vCPUs (threads on the host, however many cores it has): as many as the largest inner
# VM of the tier (--vcpus 4). With two, inner vCPUs spinning for a sibling whose outer CPU never
# got the timer tick (nested SVM under TCG) left two outer CPUs in soft lockup for good.
#
# When the outer host fails or stalls (nested-kvm-host.sh exits 125; it stops a host whose
# kernel reports a stall), a new outer boot runs the groups that have not passed yet, while
# the tier's time budget (NESTED_KVM_BUDGET, default 2700 s) leaves 10 minutes for one: on
# these 2-core machines the outer host froze in about 3 runs of 9. A group that failed is never
# retried; every try's serial log is kept and printed.
budget=${NESTED_KVM_BUDGET:-2700}
remaining=("${pairs[@]}")
passed_groups=()
attempt=0
# Tests that ran and passed in the groups that passed, over every outer boot (a stalled boot's
# groups run again, and only their passing run counts).
tier_ran=0 tier_skipped=0
while :; do
    attempt=$((attempt + 1))
    left=$((budget - SECONDS))
    try_timeout=$((timeout < left ? timeout : left))
    names=()
    for ((i = 0; i < ${#remaining[@]}; i += 2)); do names+=("${remaining[i]}"); done
    say "running ${names[*]} in the nested real-KVM host (one outer boot; try $attempt, ${try_timeout}s)"
    out=$(mktemp)
    set +e
    "$REPO/scripts/nested-kvm-host.sh" run --cpus 4 --timeout "$try_timeout" "${shares[@]}" \
        --env NESTED_KVM_TEST_THREADS --env NESTED_KVM_GROUP_TIMEOUT --env NESTED_KVM_SGE_TIMEOUT \
        --env NESTED_SGE_QUOTA --env NESTED_SGE_ONLY --env NESTED_KVM_MEMORY \
        --env NESTED_KVM_TEST_FILTER \
        -- "$REPO/scripts/test-nested-kvm.sh" --inside "${remaining[@]}" | tee "$out"
    rc=${PIPESTATUS[0]}
    set -e
    failed=$(sed -n 's/^=== group failed: //p' "$out" | tr '\n' ' ')
    next=()
    for ((i = 0; i < ${#remaining[@]}; i += 2)); do
        if grep -qx "=== group passed: ${remaining[i]}" "$out"; then
            passed_groups+=("${remaining[i]}")
            # Its count, from its result line (the sge group counts checks, timings none).
            line=$(grep -E "^=== ${remaining[i]}: exit 0, [0-9]+ (checks )?passed" "$out" | tail -n 1 || true)
            n=$(echo "$line" | sed -n 's/^=== [^:]*: exit 0, \([0-9]*\) .*/\1/p')
            k=$(echo "$line" | sed -n 's/.* \([0-9]*\) SKIPPED lines.*/\1/p')
            tier_ran=$((tier_ran + ${n:-0} - ${k:-0}))
            tier_skipped=$((tier_skipped + ${k:-0}))
        else
            next+=("${remaining[i]}" "${remaining[i + 1]}")
        fi
    done
    rm -f "$out"
    if [ -n "$failed" ]; then
        say "failed: ${failed}(passed: ${passed_groups[*]:-none})"
        exit 1
    fi
    case $rc in
        0 | 125 | "$STALLED") ;;
        *) exit "$rc" ;;
    esac
    remaining=("${next[@]}")
    if [ ${#remaining[@]} -eq 0 ]; then
        say "every group passed (${passed_groups[*]}) in $attempt outer boot(s), ${SECONDS}s"
        echo "=== nested real-KVM tier, all outer boots together: $tier_ran tests ran and passed," \
            "$tier_skipped printed SKIPPED"
        exit 0
    fi
    if [ $((budget - SECONDS)) -lt 600 ]; then
        say "the nested host failed or stalled (exit $rc) and the tier's budget is spent;" \
            "passed: ${passed_groups[*]:-none}; not run to the end: ${remaining[*]}"
        exit 1
    fi
    say "the nested host failed or stalled (exit $rc), not a test: another outer boot for" \
        "the groups that have not passed"
done
