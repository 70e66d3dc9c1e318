#!/usr/bin/env bash
# Inside the nested real-KVM host (scripts/test-nested-kvm.sh, group `sge`): a one-host Son of
# Grid Engine cell (the host's Debian packages over the shared /usr, a fresh spool in the outer
# host's memory) whose shepherd is sge_virtualizer with `backend = "auto"`, which picks the
# embedded VMM there. Checks, each printed as `check NAME: ok` or `check NAME: FAILED (why)`:
#
#   auto_is_embedded   a job's VM runs in the embedded VMM: the job's trace says so, vCPU
#                      threads in the job user's VMM process, no QEMU anywhere
#   qacct_like_stock   the same job (output, exit 7) gives the same output file and qacct
#                      failed/exit_status under the stock shepherd and under ours
#   qdel_leaves_no_vm  qdel of a running job ends it and leaves no VMM process
#   online_usage       qstat -j shows the running job's CPU and memory (execd sees the VM)
#   h_cpu              a job spinning past h_cpu is killed, with its CPU time in qacct
#   seccomp            the VMM process's vCPU and VMM threads run under their seccomp filters
#                      while the job's output flows
#   suspend_resume     qmod -sj stops the job in its VM, qmod -usj lets it go on
#   notify             with -notify, USR1 before the suspend and USR2 before qdel's kill
#   h_rt               a job past h_rt is killed (137) after its wall-clock limit
#   per_queue_image    a queue's OS image (bullseye, built by the host tier) is the job's OS
#   oom                a job touching more than its guest has (sized from h_vmem) is killed by
#                      the guest's OOM killer: exit status 137 and a line in the trace
#   ckpt_migrate       a `qsub -ckpt` job (transparent interface, when xs) is migrated by
#                      qmod -sj: its VM is snapshotted, it is re-queued (failed 24) and goes on
#                      from the snapshot; stdout and a file on its share are each exactly 1..N,
#                      and qacct has both runs (24/137, then 0/the job's exit status)
#   ckpt_shutdown      the same with execd's shutdown (qconf -kej) instead of qmod -sj; only
#                      with NESTED_SGE_ONLY=ckpt_shutdown (see below)
#   quota              output beyond the job user's disk quota stops at the quota, and the job
#                      sees its write fail (this host's kernel has quotas; the development
#                      machines' has none). NESTED_SGE_QUOTA=0 skips it
#
# Usage (as root in the outer host): nested-sge-checks.sh SGE_VIRTUALIZER_BIN STAGED_SGE_ROOT
# STAGED_SGE_ROOT is a copy of the host's /var/lib/gridengine (scripts/test-nested-kvm.sh makes
# it). Exits 1 when a check failed.
set -uo pipefail

BIN=$1
STAGED=$2
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
JOB_USER=sgetest
export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
# Every sge-cell.sh call keeps the active job directories: the checks read the shepherd's trace.
export SGE_CELL_KEEP_ACTIVE=true
WORK=/home/$JOB_USER/nested-sge
passed=0 failed=0

say() { echo "nested-sge: $*"; }
ok() { echo "check $1: ok${2:+ ($2)}"; passed=$((passed + 1)); }
bad() { echo "check $1: FAILED ($2)"; failed=$((failed + 1)); }

# ---- the cell ------------------------------------------------------------------------------
# The cell is named after the host it was set up on; /etc (shared) says which. Its address here
# is the loopback's, which must resolve back to that name, not to `localhost` (commlib refuses a
# client whose address resolves to another name than the one it gives): a private hosts file.
host=$(cat /etc/hostname)
hostname "$host"
printf '127.0.0.1\t%s localhost\n::1\tlocalhost\n' "$host" >/tmp/hosts
mount --bind /tmp/hosts /etc/hosts
mkdir -p "$SGE_ROOT" /var/spool/gridengine /home
cp -a "$STAGED/." "$SGE_ROOT/"
rm -f "$SGE_ROOT/$SGE_CELL/common/accounting"
chown -R sgeadmin: "$SGE_ROOT" /var/spool/gridengine
install -d -o "$JOB_USER" -g "$JOB_USER" "/home/$JOB_USER" "$WORK"
settings=/tmp/sge_virtualizer.toml
cat >"$settings" <<EOF
kernel = "$REPO/build/guest/vmlinux"
initramfs = "$REPO/build/guest/initramfs.cpio"
backend = "auto"
[queues."bullseye.q"]
image = "bullseye"
[queues."ckpt.q"]
network = "none"
memory_mib = 256
EOF
say "starting the cell (fresh spool; takes a minute under TCG)"
start=$(date +%s)
if ! SGE_CELL_VIRTUALIZER_CONFIG=$settings SGE_CELL_SLOTS=2 \
    timeout 240 "$REPO/scripts/sge-cell.sh" start "$BIN" >/tmp/sge-cell.log 2>&1; then
    cat /tmp/sge-cell.log
    tail -n 20 /var/spool/gridengine/qmaster/messages
    bad cell "sge-cell.sh start failed"
    echo "nested-sge: $passed checks passed, $failed failed"
    exit 1
fi
say "cell ready in $(($(date +%s) - start)) s"

qsub_job() { # ARGS... -> job id
    runuser -u "$JOB_USER" -- env -C "$WORK" qsub -terse -q all.q -cwd "$@" | cut -d. -f1
}

# accounting JOB FIELD: the field's value in the job's (first) qacct record
accounting() {
    qacct -j "$1" 2>/dev/null | awk -v k="$2" '$1 == k { $1 = ""; sub(/^ /, ""); print; exit }'
}

# until SECONDS CMD...: runs CMD until it succeeds or SECONDS have passed (each Grid Engine
# command takes seconds under TCG: deadlines, not counts).
until_ok() {
    local end=$(($(date +%s) + $1))
    shift
    until "$@"; do
        [ "$(date +%s)" -lt "$end" ] || return 1
        sleep 1
    done
}

has_accounting() { [ -n "$(accounting "$1" failed)" ]; }

# The job's VMM process (named sge_vmm-<job>), if it runs.
vmm_pid() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(cat "$p/comm" 2>/dev/null)" = "sge_vmm-$1" ] && { basename "$p"; return 0; }
    done
    return 1
}

# What is known of a job that did not do what a check expected.
trace_of() {
    tail -n 3 /var/spool/gridengine/execd/*/active_jobs/"$1".1/trace 2>/dev/null
    qstat -j "$1" 2>&1 | grep -E '^(job_state|scheduling info|error reason)' || true
    echo "qacct failed: $(accounting "$1" failed), exit_status: $(accounting "$1" exit_status)"
}

# Everything known of the host when a job did not start or end in time (for flakes that a
# full tier run shows and a single check does not): printed after the check's line.
host_state_of() {
    echo "---- host state for job $1"
    echo "trace:"; cat /var/spool/gridengine/execd/*/active_jobs/"$1".1/trace 2>&1 | tail -n 40
    echo "qstat -f:"; qstat -f 2>&1 | tail -n 12
    echo "qstat -j:"; qstat -j "$1" 2>&1 | tail -n 25
    echo "execd messages:"; tail -n 15 /var/spool/gridengine/execd/*/messages 2>&1
    echo "qmaster messages:"; tail -n 15 /var/spool/gridengine/qmaster/messages 2>&1
    grep -E '^(MemTotal|MemAvailable|SwapFree)' /proc/meminfo
    echo "processes:"; ps -eo pid,ppid,user,stat,wchan:24,etime,comm 2>&1 |
        grep -E 'sge|vmm|qemu|vcpu' | grep -v grep
    echo "----"
}

only=${NESTED_SGE_ONLY:-}
if [ -z "$only" ]; then
# ---- qacct_like_stock, trace_says_embedded -------------------------------------------------
printf '#!/bin/sh\necho hi\nexit 7\n' >"$WORK/job.sh"
chown "$JOB_USER:" "$WORK/job.sh"
ours=$(qsub_job job.sh)
say "job $ours (exit 7) under sge_virtualizer"
if until_ok 180 has_accounting "$ours"; then
    "$REPO/scripts/sge-cell.sh" shepherd none >/dev/null 2>&1
    sleep 3
    stock=$(qsub_job job.sh)
    say "job $stock (exit 7) under the stock shepherd"
    until_ok 120 has_accounting "$stock" || true
    "$REPO/scripts/sge-cell.sh" shepherd "$BIN" >/dev/null 2>&1
    sleep 3
    o="$(accounting "$ours" failed)/$(accounting "$ours" exit_status)"
    s="$(accounting "$stock" failed)/$(accounting "$stock" exit_status)"
    o_out=$(cat "$WORK/job.sh.o$ours" 2>&1)
    s_out=$(cat "$WORK/job.sh.o$stock" 2>&1)
    if [ "$o" = "$s" ] && [ "$(accounting "$ours" exit_status)" = 7 ] &&
        [ "$o_out" = "$s_out" ] && [ "$o_out" = hi ]; then
        ok qacct_like_stock "failed/exit_status $o and output '$o_out' under both"
    else
        bad qacct_like_stock "ours $o '$o_out', stock $s '$s_out'"
    fi
    trace=$(grep -h 'VM started' /var/spool/gridengine/execd/*/active_jobs/"$ours".1/trace 2>/dev/null)
    case $trace in
        *"backend embedded (auto"*) ok trace_says_embedded "${trace#*sge_virtualizer: }" ;;
        *) bad trace_says_embedded "trace: '$trace'" ;;
    esac
else
    bad qacct_like_stock "job $ours has no accounting after 180 s: $(trace_of "$ours")"
    host_state_of "$ours"
fi

# ---- auto_is_embedded, online_usage, h_cpu -------------------------------------------------
# (a script: `-b y sh -c '…'` would lose its quoting on the way)
printf '#!/bin/sh\nwhile :; do :; done\n' >"$WORK/spin.sh"
chown "$JOB_USER:" "$WORK/spin.sh"
# h_cpu leaves execd time to report online usage before the kill (qstat -j had no usage line
# yet in a run at load 5 with h_cpu 30 s: the VM's boot counts towards it).
spin=$(qsub_job -l h_cpu=0:1:0 spin.sh)
say "job $spin (spins, h_cpu 60 s)"
if until_ok 180 vmm_pid "$spin" >/dev/null; then
    pid=$(vmm_pid "$spin")
    threads=$(cat /proc/"$pid"/task/*/comm 2>/dev/null | sort | uniq -c | tr -s ' \n' ' ')
    # The job's own QEMU would be a child of its VMM process (a global pgrep also caught
    # short-lived probes such as a load sensor's `qemu-system-x86_64 --version`).
    children=$(ps --ppid "$pid" -o comm= 2>/dev/null | tr '\n' ' ')
    if grep -qs vcpu /proc/"$pid"/task/*/comm && [[ $children != *qemu* ]]; then
        ok auto_is_embedded "VMM process $pid threads:$threads"
    else
        bad auto_is_embedded "VMM process $pid threads:$threads; children: $children"
    fi
    usage=
    busy_usage() {
        usage=$(qstat -j "$spin" 2>/dev/null | grep '^usage' || true)
        case $usage in *cpu=00:00:0[0-1],* | "") return 1 ;; esac
    }
    until_ok 120 busy_usage || true
    case $usage in
        *cpu=*maxvmem=0.000*) bad online_usage "no memory: $usage" ;;
        *cpu=00:00:0[0-1],*) bad online_usage "no CPU time: $usage" ;;
        *cpu=*maxvmem=*) ok online_usage "$usage" ;;
        *) bad online_usage "no usage line in qstat -j: $(qstat -j "$spin" 2>&1 | tail -n 8 | tr '\n' '|')" ;;
    esac
    if until_ok 300 has_accounting "$spin"; then
        exit_status=$(accounting "$spin" exit_status | awk '{print $1}')
        cpu=$(accounting "$spin" cpu | sed 's/s$//; s/\..*//')
        if [ "${exit_status:-0}" -gt 128 ] && [ "${cpu:-0}" -ge 55 ] && [ "${cpu:-0}" -le 180 ]; then
            ok h_cpu "killed with exit status $exit_status after ${cpu} s of CPU"
        else
            bad h_cpu "exit_status $exit_status, cpu $cpu"
        fi
    else
        bad h_cpu "the spinning job was not ended within 300 s: $(trace_of "$spin")"
        qdel -f "$spin" >/dev/null 2>&1
    fi
else
    for c in auto_is_embedded online_usage h_cpu; do
        bad "$c" "job $spin's VMM process never appeared: $(trace_of "$spin")"
    done
    host_state_of "$spin"
fi

# ---- qdel_leaves_no_vm ---------------------------------------------------------------------
sleeper=$(qsub_job -b y sleep 600)
say "job $sleeper (sleeps; deleted once running)"
if until_ok 180 vmm_pid "$sleeper" >/dev/null; then
    pid=$(vmm_pid "$sleeper")
    sleep 2
    qdel "$sleeper" >/dev/null
    gone() { [ ! -d "/proc/$pid" ]; }
    if ! until_ok 30 gone; then
        bad qdel_leaves_no_vm "VMM process $pid still there 30 s after qdel"
    elif until_ok 60 has_accounting "$sleeper"; then
        ok qdel_leaves_no_vm "exit_status $(accounting "$sleeper" exit_status), VMM gone"
    else
        bad qdel_leaves_no_vm "no accounting 60 s after the VMM was gone"
    fi
else
    bad qdel_leaves_no_vm "job $sleeper's VMM process never appeared: $(trace_of "$sleeper")"
    host_state_of "$sleeper"
fi

fi

# lines FILE: how many lines FILE has now
lines() { { wc -l <"$1"; } 2>/dev/null || echo 0; }

# ---- suspend_resume, notify ----------------------------------------------------------------
# qmod -sj stops the job in its VM (USR1 first with -notify), -usj lets it go on, qdel sends
# USR2 and, the queue's notify time (5 s) later, KILL.
if [ -z "$only" ] || [ "$only" = suspend ]; then
printf '#!/bin/sh\ntrap "echo got USR1" USR1\ntrap "echo got USR2" USR2\necho ready\nwhile :; do date +%%s; sleep 1; done\n' \
    >"$WORK/ticker.sh"
chown "$JOB_USER:" "$WORK/ticker.sh"
ticker=$(qsub_job -notify -o ticker.out ticker.sh)
out=$WORK/ticker.out
say "job $ticker (ticks every second; -notify)"
ready() { grep -qs ready "$out" && [ "$(lines "$out")" -ge 4 ]; }
if until_ok 300 ready; then
    # every thread of the VMM process that runs guest work has its seccomp filter while the
    # guest's output flows
    pid=$(vmm_pid "$ticker" || true)
    unfiltered=
    for t in /proc/"$pid"/task/*; do
        name=$(cat "$t/comm" 2>/dev/null)
        case $name in
            vcpu* | vmm) grep -qs '^Seccomp:[[:space:]]*2' "$t/status" || unfiltered="$unfiltered $name" ;;
        esac
    done
    if [ -n "$pid" ] && grep -qs vcpu /proc/"$pid"/task/*/comm && [ -z "$unfiltered" ]; then
        ok seccomp "vCPU and VMM threads of VMM process $pid in seccomp filter mode while the job's output flows"
    else
        bad seccomp "VMM process '$pid': threads without a filter:${unfiltered:- (none found)}"
    fi
    qmod -sj "$ticker" >/dev/null 2>&1
    got_usr1() { grep -qs "got USR1" "$out"; }
    until_ok 60 got_usr1 || true
    sleep 5
    frozen=$(lines "$out")
    sleep 10
    still=$(lines "$out")
    qmod -usj "$ticker" >/dev/null 2>&1
    moving() { [ "$(lines "$out")" -gt $((still + 2)) ]; }
    if ! got_usr1; then
        bad notify "no USR1 before the suspend: $(tail -n 3 "$out" | tr '\n' ' ')"
    fi
    if [ "$still" -le $((frozen + 1)) ] && until_ok 120 moving; then
        ok suspend_resume "$frozen lines when suspended, $still 10 s later, $(lines "$out") after -usj"
    else
        bad suspend_resume "lines: $frozen suspended, $still 10 s later, $(lines "$out") after -usj"
    fi
    qdel "$ticker" >/dev/null 2>&1
    got_usr2() { grep -qs "got USR2" "$out"; }
    if until_ok 60 got_usr2 && until_ok 240 has_accounting "$ticker" &&
        [ "$(accounting "$ticker" exit_status | awk '{print $1}')" = 137 ] && got_usr1; then
        ok notify "USR1 before the suspend, USR2 before the kill, exit_status 137"
    elif got_usr1; then
        bad notify "after qdel: USR2 $(got_usr2 && echo seen || echo missing), exit_status '$(accounting "$ticker" exit_status)'"
    fi
else
    bad suspend_resume "job $ticker never ticked: $(trace_of "$ticker")"
    host_state_of "$ticker"
    qdel -f "$ticker" >/dev/null 2>&1
fi
fi

# ---- h_rt ----------------------------------------------------------------------------------
if [ -z "$only" ] || [ "$only" = h_rt ]; then
hrt=$(qsub_job -l h_rt=0:0:30 -b y sleep 600)
say "job $hrt (sleeps; h_rt 30 s)"
if until_ok 300 has_accounting "$hrt"; then
    wall=$(accounting "$hrt" ru_wallclock | sed 's/s$//; s/\..*//')
    status=$(accounting "$hrt" exit_status | awk '{print $1}')
    # execd counts h_rt from the shepherd's start, the VM's boot included (several seconds
    # here); ru_wallclock is the job's own time in the guest.
    if [ "$status" = 137 ] && [ "${wall:-0}" -ge 10 ] && [ "${wall:-0}" -le 120 ]; then
        ok h_rt "killed with exit_status 137; ru_wallclock ${wall} s (the job's own, without the VM's boot)"
    else
        bad h_rt "exit_status $status after ${wall} s"
    fi
else
    bad h_rt "job $hrt did not end within 300 s: $(trace_of "$hrt")"
    host_state_of "$hrt"
fi
fi

# ---- ckpt_migrate, ckpt_shutdown -----------------------------------------------------------
# A checkpoint environment of ours (transparent: VM snapshots), a queue that offers it and
# gives its jobs no network device (snapshots cannot capture virtio-net yet), and a job that
# counts to N every 100 ms on stdout and into a file on its share.
# runs JOB FIELD: the field of each of the job's qacct records, in order, space-separated
runs() {
    qacct -j "$1" 2>/dev/null | awk -v k="$2" '$1 == k { printf "%s ", $2 }' | sed 's/ $//'
}
# counts FILE N: FILE is exactly the lines 1..N
counts() { [ "$(cat "$1" 2>/dev/null)" = "$(seq 1 "$2")" ]; }
ckpt_check() { # NAME HOW
    local name=$1 how=$2 n=200 job dir out states= state
    dir=$WORK/$name
    install -d -o "$JOB_USER" -g "$JOB_USER" "$dir"
    printf '#!/bin/sh\ni=1\nwhile [ $i -le %s ]; do echo $i; echo $i >>counter.txt; i=$((i+1)); sleep 0.1; done\nexit 3\n' \
        "$n" >"$dir/counter.sh"
    chown "$JOB_USER:" "$dir/counter.sh"
    job=$(runuser -u "$JOB_USER" -- env -C "$dir" qsub -terse -q ckpt.q -ckpt vmckpt -cwd \
        -o counter.out -e counter.err counter.sh | cut -d. -f1)
    out=$dir/counter.out
    say "job $job ($name: counts to $n every 100 ms, checkpointing environment vmckpt)"
    counting() { [ "$(lines "$out")" -ge 30 ]; }
    if ! until_ok 300 counting; then
        bad "$name" "job $job never counted to 30: $(trace_of "$job")"
        host_state_of "$job"
        qdel -f "$job" >/dev/null 2>&1
        return
    fi
    case $how in
        qmod) qmod -sj "$job" >/dev/null 2>&1 ;;
        kej) qconf -kej "$host" >/dev/null 2>&1 ;;
    esac
    # re-queued, then running again from the snapshot: the states qstat shows on the way
    seen() {
        state=$(qstat 2>/dev/null | awk -v j="$job" '$1 == j { print $5 }')
        case " $states " in *" ${state:-gone} ") ;; *) states="$states ${state:-gone}" ;; esac
    }
    requeued() { seen; [ -n "$(runs "$job" failed)" ]; }
    # execd is down after -kej: the migrated run is accounted once it is up again
    migrated() { ! vmm_pid "$job" >/dev/null && ! pgrep -x sge_execd >/dev/null; }
    if [ "$how" = kej ]; then
        until_ok 240 migrated || say "job $job: its VM or execd still runs 240 s after -kej"
    else
        until_ok 240 requeued || true
    fi
    if [ "$how" = kej ]; then
        SGE_CELL_VIRTUALIZER_CONFIG=$settings SGE_CELL_SLOTS=2 \
            timeout 240 "$REPO/scripts/sge-cell.sh" start "$BIN" >>/tmp/sge-cell.log 2>&1 ||
            say "restarting the cell after -kej failed: $(tail -n 3 /tmp/sge-cell.log)"
    fi
    two_runs() { seen; [ "$(runs "$job" failed | wc -w)" -ge 2 ]; }
    if ! until_ok 400 two_runs; then
        bad "$name" "job $job: runs '$(runs "$job" failed)', states '$states', lines $(lines "$out"): $(trace_of "$job")"
        host_state_of "$job"
        qdel -f "$job" >/dev/null 2>&1
        return
    fi
    local fails statuses restored
    fails=$(runs "$job" failed)
    statuses=$(runs "$job" exit_status)
    restored=$(grep -c 'job restored from checkpoint' /var/spool/gridengine/execd/*/active_jobs/"$job".1/trace 2>/dev/null)
    if counts "$out" "$n" && counts "$dir/counter.txt" "$n" && [ "$fails" = "24 0" ] &&
        [ "$statuses" = "137 3" ] && [ "${restored:-0}" -ge 1 ]; then
        ok "$name" "qstat states:${states}; restored from its snapshot; stdout and counter.txt exactly 1..$n; qacct failed '$fails', exit_status '$statuses'"
    else
        bad "$name" "stdout $(lines "$out") lines ($(counts "$out" "$n" && echo exact || echo 'not 1..N')), counter.txt $(lines "$dir/counter.txt") lines ($(counts "$dir/counter.txt" "$n" && echo exact || echo 'not 1..N')), qacct failed '$fails' exit_status '$statuses', restores $restored: $(trace_of "$job")"
        grep -E 'checkpoint|migrat|restor' /var/spool/gridengine/execd/*/active_jobs/"$job".1/trace | tail -n 12
    fi
}
if [ -z "$only" ] || [ "$only" = ckpt ] || [ "$only" = ckpt_shutdown ]; then
    printf 'ckpt_name vmckpt\ninterface transparent\nckpt_command none\nmigr_command none\nrestart_command none\nclean_command none\nckpt_dir /tmp\nsignal USR2\nwhen xs\n' \
        >/tmp/vmckpt.ckpt
    qconf -Ackpt /tmp/vmckpt.ckpt >/dev/null 2>&1
    qconf -sq all.q | sed 's/^qname .*/qname ckpt.q/; s/^slots .*/slots 1/; s/^ckpt_list .*/ckpt_list vmckpt/' >/tmp/ckpt.q
    qconf -Aq /tmp/ckpt.q >/dev/null 2>&1
    if qconf -sq ckpt.q 2>/dev/null | grep -q '^ckpt_list *vmckpt'; then
        [ "$only" = ckpt_shutdown ] || ckpt_check ckpt_migrate qmod
        # Not in the default set yet: the migration is taken (trace: checkpoint, `checkpointed`
        # 1, qacct failed 24), but after the restarted execd reports it, SoGE's qmaster
        # finishes the job instead of re-queueing it (issue 14 note, 2026-12-08).
        if [ "$only" = ckpt_shutdown ]; then
            ckpt_check ckpt_shutdown kej
        else
            say "ckpt_shutdown not run (NESTED_SGE_ONLY=ckpt_shutdown runs it): after -kej the qmaster finishes the migrated job instead of re-queueing it; under investigation"
        fi
    else
        bad ckpt_migrate "can't set up ckpt.q with checkpoint environment vmckpt: $(qconf -sckpt vmckpt 2>&1 | head -n 3)"
    fi
fi

# ---- per_queue_image -----------------------------------------------------------------------
# The image store is the host's, shared in read-only; the host tier's image_e2e builds bullseye.
if [ -z "$only" ] || [ "$only" = image ]; then
if [ -f /var/lib/sge_virtualizer/images/bullseye/manifest.json ]; then
    qconf -sq all.q | sed 's/^qname .*/qname bullseye.q/; s/^slots .*/slots 1/' >/tmp/bullseye.q
    qconf -Aq /tmp/bullseye.q >/dev/null 2>&1
    printf '#!/bin/sh\ncat /etc/debian_version\n' >"$WORK/version.sh"
    chown "$JOB_USER:" "$WORK/version.sh"
    img=$(runuser -u "$JOB_USER" -- env -C "$WORK" qsub -terse -q bullseye.q -cwd -o version.out version.sh | cut -d. -f1)
    say "job $img (bullseye.q: the queue's OS image)"
    if until_ok 300 has_accounting "$img"; then
        version=$(cat "$WORK/version.out" 2>&1)
        case $version in
            11.*) ok per_queue_image "/etc/debian_version $version in the queue's bullseye image" ;;
            *) bad per_queue_image "output '$version', $(trace_of "$img")" ;;
        esac
    else
        bad per_queue_image "job $img did not end within 300 s: $(trace_of "$img")"
        host_state_of "$img"
    fi
else
    echo "check per_queue_image: SKIPPED (no bullseye image in /var/lib/sge_virtualizer/images:" \
        "the host tier's image_e2e builds it)"
fi
fi

# ---- oom ------------------------------------------------------------------------------------
# A job that touches more than its guest has (h_vmem 1 GiB: a guest of 832 MiB; 900 MiB under
# its RLIMIT_AS) is killed by the guest's OOM killer: exit status 137, and the trace says so.
if [ -z "$only" ] || [ "$only" = oom ]; then
printf '#!/bin/sh\ndd if=/dev/zero of=/dev/null bs=900M count=1 2>/dev/null\nst=$?\necho "dd=$st"\nexit $st\n' \
    >"$WORK/oom.sh"
chown "$JOB_USER:" "$WORK/oom.sh"
oom=$(qsub_job -l h_vmem=1G oom.sh)
say "job $oom (touches 900 MiB in a guest of 832 MiB)"
if until_ok 300 has_accounting "$oom"; then
    trace=/var/spool/gridengine/execd/*/active_jobs/"$oom".1/trace
    if [ "$(accounting "$oom" exit_status | awk '{print $1}')" = 137 ] &&
        grep -qs 'guest RAM 832 MiB' $trace && grep -qs 'the guest ran out of memory' $trace; then
        ok oom "exit_status 137; $(grep -ho 'the guest ran out of memory[^;]*' $trace)"
    else
        bad oom "exit_status $(accounting "$oom" exit_status), output '$(cat "$WORK/oom.sh.o$oom" 2>&1)', $(trace_of "$oom")"
    fi
else
    bad oom "job $oom did not end within 300 s: $(trace_of "$oom")"
    host_state_of "$oom"
fi
fi

# ---- quota ---------------------------------------------------------------------------------
quota_check() {
    local img=/tmp/quota.img mnt=$WORK/quota job size
    install -d -o "$JOB_USER" -g "$JOB_USER" "$mnt"
    if ! { truncate -s 32M "$img" &&
        mkfs.ext4 -q -F -O ^has_journal,quota -E quotatype=usrquota "$img" &&
        mount -o loop,usrquota "$img" "$mnt" && chown "$JOB_USER:" "$mnt" &&
        setquota -u "$JOB_USER" 1024 1024 0 0 "$mnt"; } >/tmp/quota.log 2>&1; then
        bad quota "cannot make a file system with a user quota: $(tail -n 3 /tmp/quota.log | tr '\n' ' ')"
        return
    fi
    printf '#!/bin/sh\ntrap "" PIPE\nhead -c 30000000 /dev/zero\necho "head=$?" >&2\n' >"$WORK/fill.sh"
    chown "$JOB_USER:" "$WORK/fill.sh"
    job=$(qsub_job -o "$mnt/out.txt" -e "$WORK/fill.err" fill.sh)
    say "job $job (writes 30 MB to a file system where its user may have 1 MiB)"
    if ! until_ok 300 has_accounting "$job"; then
        bad quota "job $job did not end within 300 s: $(trace_of "$job")"
        host_state_of "$job"
        qdel -f "$job" >/dev/null 2>&1
    else
        size=$(stat -c %s "$mnt/out.txt" 2>/dev/null || echo 0)
        if [ "$size" -gt 0 ] && [ "$size" -le 1048576 ] && grep -q 'head=1' "$WORK/fill.err" &&
            grep -q 'could not be written (Disk quota exceeded' \
                /var/spool/gridengine/execd/*/active_jobs/"$job".1/trace; then
            ok quota "the output stopped at $size bytes; the job saw its write fail"
        else
            bad quota "output $size bytes, job's stderr '$(cat "$WORK/fill.err" 2>&1)', $(trace_of "$job")"
        fi
    fi
    umount "$mnt" 2>/dev/null
}
# On by default again (NESTED_SGE_QUOTA=0 skips it): in 2 of 4 full runs at load 5-8 its job
# had not ended within 180 s after the qdel check; it passed after qdel in the sge group alone.
# The deadline is 300 s now, and a job that misses it prints the host's state (host_state_of).
if [ "${NESTED_SGE_QUOTA:-1}" != 0 ] || [ "$only" = quota ]; then
    quota_check
fi

"$REPO/scripts/sge-cell.sh" stop >/dev/null 2>&1 || true
echo "nested-sge: $passed checks passed, $failed failed"
[ "$failed" = 0 ]
