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
#   ckpt_elsewhere     a checkpoint this host cannot resume is refused with the reason and the
#                      job re-queued with it, not lost; it goes on once it can be resumed
#   ckpt_shutdown      execd's -kej shutdown migrates the job; it ends as the stock shepherd's
#                      job does (qmaster finishes both: see the check)
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

# cpu_ticks PID: user + system CPU time of process PID and its threads, in clock ticks
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
trace_file() { echo /var/spool/gridengine/execd/*/active_jobs/"$1".1/trace; }

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
    # the guest's clock against the host's before the suspension (the ticker's last line)
    skew_before=$(($(date +%s) - $(grep -o '^[0-9][0-9]*$' "$out" | tail -n 1)))
    qmod -sj "$ticker" >/dev/null 2>&1
    got_usr1() { grep -qs "got USR1" "$out"; }
    until_ok 60 got_usr1 || true
    sleep 5
    frozen=$(lines "$out")
    cpu_before=$(cpu_ticks "$pid")
    sleep 10
    cpu_after=$(cpu_ticks "$pid")
    still=$(lines "$out")
    paused_trace=$(grep -c "pausing the VM's vCPUs" $(trace_file "$ticker") 2>/dev/null)
    qmod -usj "$ticker" >/dev/null 2>&1
    moving() { [ "$(lines "$out")" -gt $((still + 2)) ]; }
    if ! got_usr1; then
        bad notify "no USR1 before the suspend: $(tail -n 3 "$out" | tr '\n' ' ')"
    fi
    # while suspended the VMM process uses (almost) no CPU: its vCPUs are paused; on resume
    # the guest's clock (the ticker prints `date +%s`) is the host's again at once
    used=$((cpu_after - cpu_before))
    if [ "$still" -le $((frozen + 1)) ] && until_ok 120 moving; then
        skew=$(($(date +%s) - $(grep -o '^[0-9][0-9]*$' "$out" | tail -n 1)))
        drift=$((skew - skew_before))
        if [ "${paused_trace:-0}" -ge 1 ] && [ "$used" -le 50 ] && [ "${drift#-}" -le 3 ]; then
            ok suspend_resume "$frozen lines when suspended, $still 10 s later, $(lines "$out") after -usj; vCPUs paused: the VMM process used $used ticks of CPU in those 10 s; guest clock $skew_before s behind the host's before, $skew s after resume"
        else
            bad suspend_resume "vCPUs paused: ${paused_trace:-0} times in the trace; $used CPU ticks in 10 s suspended (at most 50); guest clock $skew_before s behind the host's before, $skew s after resume"
        fi
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

# ---- ckpt_migrate, ckpt_elsewhere, ckpt_shutdown -------------------------------------------
# A checkpoint environment of ours (transparent: VM snapshots), a queue that offers it and
# gives its jobs no network device (snapshots cannot capture virtio-net yet), and a job that
# counts to N every 100 ms on stdout and into a file on its share.
CKPT_N=200
# runs JOB FIELD: the field of each of the job's qacct records, in order, space-separated
runs() {
    qacct -j "$1" 2>/dev/null | awk -v k="$2" '$1 == k { printf "%s ", $2 }' | sed 's/ $//'
}
# counts FILE N: FILE is exactly the lines 1..N
counts() { [ "$(cat "$1" 2>/dev/null)" = "$(seq 1 "$2")" ]; }
# counter_job NAME QUEUE -> job id (in $WORK/NAME; counter.out, counter.txt)
counter_job() {
    local dir=$WORK/$1
    install -d -o "$JOB_USER" -g "$JOB_USER" "$dir"
    printf '#!/bin/sh\ni=1\nwhile [ $i -le %s ]; do echo $i; echo $i >>counter.txt; i=$((i+1)); sleep 0.1; done\nexit 3\n' \
        "$CKPT_N" >"$dir/counter.sh"
    chown "$JOB_USER:" "$dir/counter.sh"
    runuser -u "$JOB_USER" -- env -C "$dir" qsub -terse -q "$2" -ckpt vmckpt -cwd \
        -o counter.out -e counter.err counter.sh | cut -d. -f1
}
# counting NAME: the job has written 30 lines
counting() { [ "$(lines "$WORK/$1/counter.out")" -ge 30 ]; }
# states seen for $job, in order (qstat's state column; "gone" once qstat no longer lists it)
seen() {
    local state
    state=$(qstat -u '*' 2>/dev/null | awk -v j="$job" '$1 == j { print $5 }')
    case " $states " in *" ${state:-gone} ") ;; *) states="$states ${state:-gone}" ;; esac
}
# finished_with NAME JOB FAILS STATUSES RESTORES_AT_LEAST: the job's output is exactly 1..N in
# both files, and qacct's records say FAILS / STATUSES
finished_with() {
    local dir=$WORK/$1 fails statuses restored
    fails=$(runs "$2" failed)
    statuses=$(runs "$2" exit_status)
    restored=$(grep -c 'job restored from checkpoint' $(trace_file "$2") 2>/dev/null)
    verdict="stdout $(lines "$dir/counter.out") lines ($(counts "$dir/counter.out" "$CKPT_N" && echo exact || echo 'not 1..N')), counter.txt $(lines "$dir/counter.txt") lines ($(counts "$dir/counter.txt" "$CKPT_N" && echo exact || echo 'not 1..N')), qacct failed '$fails' exit_status '$statuses', ${restored:-0} restores"
    counts "$dir/counter.out" "$CKPT_N" && counts "$dir/counter.txt" "$CKPT_N" &&
        [ "$fails" = "$3" ] && [ "$statuses" = "$4" ] && [ "${restored:-0}" -ge "$5" ]
}
ckpt_failed() { # NAME JOB WHY
    bad "$1" "job $2: $3: $(trace_of "$2")"
    grep -E 'checkpoint|migrat|restor' $(trace_file "$2") 2>/dev/null | tail -n 12
    host_state_of "$2"
    qdel -f "$2" >/dev/null 2>&1
}

if [ -z "$only" ] || [ "${only#ckpt}" != "$only" ]; then
printf 'ckpt_name vmckpt\ninterface transparent\nckpt_command none\nmigr_command none\nrestart_command none\nclean_command none\nckpt_dir /tmp\nsignal USR2\nwhen xs\n' \
    >/tmp/vmckpt.ckpt
qconf -Ackpt /tmp/vmckpt.ckpt >/dev/null 2>&1
for q in ckpt.q ckpthost.q; do
    qconf -sq all.q | sed "s/^qname .*/qname $q/; s/^slots .*/slots 1/; s/^ckpt_list .*/ckpt_list vmckpt/" >/tmp/$q
    qconf -Aq /tmp/$q >/dev/null 2>&1
done
if ! qconf -sq ckpt.q 2>/dev/null | grep -q '^ckpt_list *vmckpt'; then
    bad ckpt_migrate "can't set up ckpt.q with checkpoint environment vmckpt: $(qconf -sckpt vmckpt 2>&1 | head -n 3)"
else
# ckpt_migrate: qmod -sj with `when x` migrates the job; it is re-queued and restored.
if [ -z "$only" ] || [ "$only" = ckpt ] || [ "$only" = ckpt_migrate ]; then
    name=ckpt_migrate states=
    job=$(counter_job $name ckpt.q)
    say "job $job ($name: counts to $CKPT_N every 100 ms; qmod -sj after 30)"
    if ! until_ok 300 counting $name; then
        ckpt_failed $name "$job" "never counted to 30"
    else
        qmod -sj "$job" >/dev/null 2>&1
        two_runs() { seen; [ "$(runs "$job" failed | wc -w)" -ge 2 ]; }
        if ! until_ok 400 two_runs; then
            ckpt_failed $name "$job" "not two runs in 400 s: '$(runs "$job" failed)', states$states"
        elif finished_with $name "$job" "24 0" "137 3" 1; then
            ok $name "qstat states:$states; restored from its snapshot; $verdict"
        else
            ckpt_failed $name "$job" "$verdict"
        fi
    fi
fi

# ckpt_elsewhere: a checkpoint this host cannot resume (here: a snapshot format version this
# VMM does not read, as from a newer build; a missing CPU feature takes the same path, see
# vmm/tests/snapshot_guests.rs) is refused with the reason, kept, and the job re-queued; once
# the checkpoint is one this host can resume, the job goes on from it. The queue is disabled
# around each step so that the re-queued job waits.
if [ -z "$only" ] || [ "$only" = ckpt ] || [ "$only" = ckpt_elsewhere ]; then
    name=ckpt_elsewhere states=
    job=$(counter_job $name ckpt.q)
    say "job $job ($name: migrated, its snapshot made one this host cannot resume)"
    one_run() { seen; [ "$(runs "$job" failed | wc -w)" -ge "$1" ]; }
    snap=
    if ! until_ok 300 counting $name; then
        ckpt_failed $name "$job" "never counted to 30"
    else
        qmod -d "ckpt.q@$host" >/dev/null 2>&1
        qmod -sj "$job" >/dev/null 2>&1
        if until_ok 300 one_run 1; then
            ckpt_dir=/tmp/sge_virtualizer.$job.0
            snap=$ckpt_dir/$(cat "$ckpt_dir/latest" 2>/dev/null)/vm.snap
        fi
    fi
    if [ -n "$snap" ] && [ -f "$snap" ]; then
        version=$(dd if="$snap" bs=1 skip=8 count=4 2>/dev/null | od -An -tx1 | tr -d ' \n')
        printf '\377\377\000\000' | dd of="$snap" bs=1 seek=8 conv=notrunc 2>/dev/null
        qmod -e "ckpt.q@$host" >/dev/null 2>&1
        refused() { grep -qs 'cannot be restored on this host' $(trace_file "$job") && one_run 2; }
        if until_ok 300 refused; then
            qmod -d "ckpt.q@$host" >/dev/null 2>&1
            lines_refused=$(lines "$WORK/$name/counter.out")
            sleep 5
            # back to the version it was written with: a host that can resume it
            printf "$(echo "$version" | sed 's/../\\x&/g')" | dd of="$snap" bs=1 seek=8 conv=notrunc 2>/dev/null
            reason=$(grep -m1 -o 'checkpoint cannot be restored on this host[^;]*' $(trace_file "$job"))
            qmod -e "ckpt.q@$host" >/dev/null 2>&1
            runs_refused=$(runs "$job" failed | wc -w)
            done_now() { seen; [ "$(runs "$job" failed | wc -w)" -gt "$runs_refused" ] && [ "$(runs "$job" failed | awk '{print $NF}')" = 0 ]; }
            if ! until_ok 400 done_now; then
                ckpt_failed $name "$job" "did not go on after the refusal: '$(runs "$job" failed)'"
            elif finished_with $name "$job" "$(runs "$job" failed)" "$(runs "$job" exit_status)" 1 &&
                [ "$(runs "$job" failed | awk '{print $NF}')" = 0 ] &&
                [ "$(runs "$job" exit_status | awk '{print $NF}')" = 3 ] &&
                [ "$lines_refused" -lt "$CKPT_N" ]; then
                ok $name "refused ($reason), re-queued with its checkpoint ($lines_refused lines kept), then restored; qstat states:$states; $verdict"
            else
                ckpt_failed $name "$job" "$verdict"
            fi
        else
            qmod -e "ckpt.q@$host" >/dev/null 2>&1
            ckpt_failed $name "$job" "no refusal with re-queue: runs '$(runs "$job" failed)'"
        fi
    elif [ -n "$job" ]; then
        qmod -e "ckpt.q@$host" >/dev/null 2>&1
        ckpt_failed $name "$job" "no snapshot after the migration (${snap:-none})"
    fi
fi

# ckpt_shutdown: execd shut down with -kej migrates a `when s` job, as with the stock shepherd:
# our run is snapshotted, the stock shepherd's killed. Both runs end with failed 24; Grid
# Engine's qmaster then finishes both jobs rather than re-queueing them (it marks every job of
# a host shut down with -kej as deleted: sge_host_qmaster.c, "mark killed jobs as deleted"), so
# the check is that ours ends exactly as the stock shepherd's does, after a snapshot.
if [ -z "$only" ] || [ "$only" = ckpt ] || [ "$only" = ckpt_shutdown ]; then
    name=ckpt_shutdown
    job=$(counter_job $name ckpt.q)
    stock=$(counter_job ${name}_stock ckpthost.q)
    say "jobs $job (ours) and $stock (ckpthost.q: has a network, so the stock shepherd's) ($name)"
    both_counting() { counting $name && counting ${name}_stock; }
    if ! until_ok 300 both_counting; then
        ckpt_failed $name "$job" "jobs $job and $stock never both counted to 30"
        qdel -f "$stock" >/dev/null 2>&1
    else
        qconf -kej "$host" >/dev/null 2>&1
        gone() { ! vmm_pid "$job" >/dev/null && ! pgrep -x sge_execd >/dev/null; }
        until_ok 240 gone || say "job $job: its VM or execd still runs 240 s after -kej"
        SGE_CELL_VIRTUALIZER_CONFIG=$settings SGE_CELL_SLOTS=2 \
            timeout 240 "$REPO/scripts/sge-cell.sh" start "$BIN" >>/tmp/sge-cell.log 2>&1 ||
            say "restarting the cell after -kej failed: $(tail -n 3 /tmp/sge-cell.log)"
        accounted() { [ -n "$(runs "$job" failed)" ] && [ -n "$(runs "$stock" failed)" ]; }
        until_ok 240 accounted || true
        sleep 10
        ours="failed '$(runs "$job" failed)' exit_status '$(runs "$job" exit_status)' $(qstat -j "$job" >/dev/null 2>&1 && echo queued || echo finished)"
        theirs="failed '$(runs "$stock" failed)' exit_status '$(runs "$stock" exit_status)' $(qstat -j "$stock" >/dev/null 2>&1 && echo queued || echo finished)"
        snapshotted=$(grep -c 'checkpoint [0-9]* taken' $(trace_file "$job") 2>/dev/null)
        if [ -n "$(runs "$job" failed)" ] && [ "$ours" = "$theirs" ] && [ "${snapshotted:-0}" -ge 1 ]; then
            ok $name "as the stock shepherd's job: $ours; ours was snapshotted before its VM stopped"
        else
            ckpt_failed $name "$job" "ours: $ours, $snapshotted snapshots; stock's: $theirs"
            qdel -f "$stock" >/dev/null 2>&1
        fi
    fi
fi
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
