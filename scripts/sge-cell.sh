#!/usr/bin/env bash
# sge-cell.sh: a one-host Son of Grid Engine cell (Debian packages) for testing sge_virtualizer.
#
# Verbs (all idempotent; run as root):
#   install                 install gridengine-master/exec/client non-interactively, create the
#                           job user `sgetest` and the BDB spool
#   start [SHEPHERD_CMD]    install if needed, start qmaster + execd, configure the cell (host
#                           aliases, submit/exec host, @allhosts, smp PE, all.q with slots, fast
#                           scheduler) and set shepherd_cmd (default: none = the stock shepherd)
#   shepherd SHEPHERD_CMD   set shepherd_cmd (a path, or `none`) in the global configuration
#   stop                    stop execd (jobs keep running) and qmaster, by PID
#   stop-execd              stop execd only (jobs keep running; `start` brings it back)
#   status                  print whether the daemons run and the queue state; exit 0 if usable
#   purge                   stop, then delete all cell state (spool, accounting, job numbers)
#
# Environment: SGE_CELL_SLOTS (default 4), SGE_CELL_NOTIFY (queue notify, default 00:00:05),
# SGE_CELL_KEEP_ACTIVE=true keeps active job directories for debugging,
# SGE_CELL_VIRTUALIZER_CONFIG=FILE starts execd with SGE_VIRTUALIZER_CONFIG=FILE (the settings
# file shepherds it starts read; execd is restarted when it runs with another value).
# Background: shared/reference/sge-single-host-cell.md (the gotchas each step works around).
set -euo pipefail

export SGE_ROOT=/var/lib/gridengine SGE_CELL=default
COMMON=$SGE_ROOT/$SGE_CELL/common
SPOOLDB=/var/spool/gridengine/spooldb
RUNDIR=/var/run/gridengine
QMASTER_PID=$RUNDIR/qmaster.pid
EXECD_PID=$RUNDIR/execd.pid
JOB_USER=sgetest
SLOTS=${SGE_CELL_SLOTS:-4}
NOTIFY=${SGE_CELL_NOTIFY:-00:00:05}
KEEP_ACTIVE=${SGE_CELL_KEEP_ACTIVE:-false}
VIRT_CONFIG=${SGE_CELL_VIRTUALIZER_CONFIG:-}
PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH

log() { echo "sge-cell: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root"

installed() { [ -x /usr/lib/gridengine/sge_qmaster ] && [ -x /usr/lib/gridengine/sge_execd ] && [ -x /usr/lib/gridengine/qsub ]; }

do_install() {
    if ! installed; then
        log "installing gridengine-master gridengine-exec gridengine-client"
        debconf-set-selections <<EOF
gridengine-common shared/gridengineconfig boolean true
gridengine-common shared/gridenginecell string default
gridengine-common shared/gridenginemaster string $(hostname)
EOF
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            gridengine-master gridengine-exec gridengine-client >/tmp/sge-cell-apt.log 2>&1; then
            DEBIAN_FRONTEND=noninteractive apt-get update >>/tmp/sge-cell-apt.log 2>&1 || true
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
                gridengine-master gridengine-exec gridengine-client >>/tmp/sge-cell-apt.log 2>&1 \
                || { tail -20 /tmp/sge-cell-apt.log >&2; die "apt-get install failed"; }
        fi
    fi
    # jobs need uid/gid >= min_uid/min_gid (1000)
    if ! id "$JOB_USER" >/dev/null 2>&1; then
        useradd --create-home --shell /bin/bash --uid 1500 "$JOB_USER" 2>/dev/null \
            || useradd --create-home --shell /bin/bash "$JOB_USER"
    fi
    init_spool
}

init_spool() {
    if [ ! -e "$SPOOLDB/sge" ]; then
        log "creating the BDB spool"
        mkdir -p "$SPOOLDB" /var/spool/gridengine/qmaster /var/spool/gridengine/execd
        chown sgeadmin: "$SPOOLDB" /var/spool/gridengine/qmaster /var/spool/gridengine/execd
        runuser -u sgeadmin -- /usr/share/gridengine/scripts/init_cluster \
            "$SGE_ROOT" "$SGE_CELL" "$SPOOLDB" sgeadmin >/tmp/sge-cell-init.log 2>&1 \
            || { tail -20 /tmp/sge-cell-init.log >&2; die "init_cluster failed"; }
    fi
}

# pid_alive FILE: the PID in FILE runs and is a gridengine daemon
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(head -n1 "$1")
    [ -n "$pid" ] && [ -d "/proc/$pid" ] && grep -q '^sge_' "/proc/$pid/comm" 2>/dev/null
}

# qmaster writes its PID file to the spool dir when started by the init script (see reference §1)
qmaster_pidfile() {
    local f
    for f in "$QMASTER_PID" /var/spool/gridengine/qmaster/qmaster.pid; do
        if pid_alive "$f"; then echo "$f"; return 0; fi
    done
    return 1
}
execd_pidfile() {
    local f
    for f in "$EXECD_PID" /var/spool/gridengine/execd/*/execd.pid; do
        if pid_alive "$f"; then echo "$f"; return 0; fi
    done
    return 1
}

host_name() { /usr/lib/gridengine/gethostname -aname; }

# host_aliases: every reverse name of the host's addresses (plus 127.0.0.1 when any is loopback)
# that differs from the host name becomes an alias, so commlib accepts local clients.
write_host_aliases() {
    local h addrs a r aliases="" want
    h=$(host_name)
    addrs=$(getent ahostsv4 "$h" | awk '{print $1}' | sort -u)
    if echo "$addrs" | grep -q '^127\.'; then addrs="$addrs 127.0.0.1"; fi
    for a in $addrs; do
        # the system resolver, not SGE's: SGE's applies the very aliases being computed here
        r=$(getent hosts "$a" | awk '{print $2; exit}')
        if [ -n "$r" ] && [ "$r" != "$h" ] && ! echo " $aliases " | grep -q " $r "; then
            aliases="$aliases $r"
        fi
    done
    if [ -n "$aliases" ]; then want="$h$aliases"; else want=""; fi
    local have=""
    [ -f "$COMMON/host_aliases" ] && have=$(cat "$COMMON/host_aliases")
    if [ "$have" != "$want" ]; then
        if [ -n "$want" ]; then echo "$want" >"$COMMON/host_aliases"; else rm -f "$COMMON/host_aliases"; fi
        [ -f "$COMMON/host_aliases" ] && chown sgeadmin: "$COMMON/host_aliases"
        return 0 # changed
    fi
    return 1
}

start_daemon() { # NAME PIDFILE_VAR PIDFILE [VAR=VALUE...]
    local name=$1 var=$2 file=$3
    shift 3
    (cd / && setsid --wait env -i --default-signal PATH=/usr/sbin:/usr/bin:/sbin:/bin \
        SGE_ROOT=$SGE_ROOT SGE_CELL=$SGE_CELL LANG=C "$var=$file" "$@" "/usr/sbin/$name" \
        </dev/null >/dev/null 2>&1) || die "$name failed to start"
}

# the SGE_VIRTUALIZER_CONFIG value of the running execd (empty if none)
execd_virt_config() {
    local f pid
    f=$(execd_pidfile) || return 0
    pid=$(head -n1 "$f")
    tr '\0' '\n' <"/proc/$pid/environ" | sed -n 's/^SGE_VIRTUALIZER_CONFIG=//p'
}

wait_for() { # SECONDS CMD...
    local n=$(($1 * 5)); shift
    while ! "$@" >/dev/null 2>&1; do
        n=$((n - 1)); [ $n -gt 0 ] || return 1; sleep 0.2
    done
}

queue_ready() {
    local h line
    h=$(host_name)
    line=$(qstat -f -q "all.q@$h" 2>/dev/null | grep "^all.q@$h") || return 1
    # columns: queuename qtype resv/used/tot load arch [states]
    [ "$(echo "$line" | awk '{print $5}')" != "-NA-" ] || return 1
    [ -z "$(echo "$line" | awk '{print $6}')" ]
}

configure_cell() {
    local h tmp
    h=$(host_name)
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    qconf -as "$h" >/dev/null 2>&1 || true
    if ! qconf -se "$h" >/dev/null 2>&1; then
        printf 'hostname %s\nload_scaling NONE\ncomplex_values NONE\nuser_lists NONE\nxuser_lists NONE\nprojects NONE\nxprojects NONE\nusage_scaling NONE\nreport_variables NONE\n' "$h" >"$tmp/exechost"
        qconf -Ae "$tmp/exechost" >/dev/null
    fi
    printf 'group_name @allhosts\nhostlist %s\n' "$h" >"$tmp/allhosts"
    if qconf -shgrp @allhosts >/dev/null 2>&1; then qconf -Mhgrp "$tmp/allhosts" >/dev/null; else qconf -Ahgrp "$tmp/allhosts" >/dev/null; fi
    if ! qconf -sp smp >/dev/null 2>&1; then
        qconf -Ap /usr/share/gridengine/util/resources/pe/smp >/dev/null
    fi
    cat >"$tmp/all.q" <<EOF
qname                 all.q
hostlist              @allhosts
seq_no                0
load_thresholds       NONE
suspend_thresholds    NONE
nsuspend              1
suspend_interval      00:05:00
priority              0
min_cpu_interval      00:05:00
processors            UNDEFINED
qtype                 BATCH INTERACTIVE
ckpt_list             NONE
pe_list               smp
rerun                 FALSE
slots                 $SLOTS
tmpdir                /tmp
shell                 /bin/sh
prolog                NONE
epilog                NONE
shell_start_mode      posix_compliant
starter_method        NONE
suspend_method        NONE
resume_method         NONE
terminate_method      NONE
notify                $NOTIFY
owner_list            NONE
user_lists            NONE
xuser_lists           NONE
subordinate_list      NONE
complex_values        NONE
projects              NONE
xprojects             NONE
calendar              NONE
initial_state         default
s_rt                  INFINITY
h_rt                  INFINITY
s_cpu                 INFINITY
h_cpu                 INFINITY
s_fsize               INFINITY
h_fsize               INFINITY
s_data                INFINITY
h_data                INFINITY
s_stack               INFINITY
h_stack               INFINITY
s_core                INFINITY
h_core                INFINITY
s_rss                 INFINITY
h_rss                 INFINITY
s_vmem                INFINITY
h_vmem                INFINITY
EOF
    if qconf -sq all.q >/dev/null 2>&1; then qconf -Mq "$tmp/all.q" >/dev/null; else qconf -Aq "$tmp/all.q" >/dev/null; fi
    qconf -ssconf >"$tmp/sched"
    sed -i -e 's/^schedule_interval .*/schedule_interval                 0:0:1/' \
        -e 's/^flush_submit_sec .*/flush_submit_sec                  1/' \
        -e 's/^flush_finish_sec .*/flush_finish_sec                  1/' "$tmp/sched"
    qconf -Msconf "$tmp/sched" >/dev/null
    write_global_config "$tmp" ""
    rm -rf "$tmp"
}

# write_global_config TMPDIR SHEPHERD: rewrite the global configuration with the test settings;
# SHEPHERD empty keeps the current shepherd_cmd.
write_global_config() {
    local tmp=$1 shep=$2 params
    params="KEEP_ACTIVE=$KEEP_ACTIVE"
    qconf -sconf global >"$tmp/global"
    # join continuation lines so the sed below sees one line per key
    sed -i -e ':a' -e '/\\$/N; s/\\\n[[:space:]]*//; ta' "$tmp/global"
    sed -i -e 's/^load_report_time .*/load_report_time             00:00:01/' \
        -e 's/^reporting_params .*/reporting_params             accounting=true reporting=false flush_time=00:00:01 joblog=false sharelog=00:00:00 accounting_flush_time=00:00:00/' \
        -e "s|^execd_params .*|execd_params                 $params|" "$tmp/global"
    grep -q '^execd_params' "$tmp/global" || echo "execd_params                 $params" >>"$tmp/global"
    if [ -n "$shep" ]; then
        if grep -q '^shepherd_cmd' "$tmp/global"; then
            sed -i "s|^shepherd_cmd .*|shepherd_cmd                 $shep|" "$tmp/global"
        else
            echo "shepherd_cmd                 $shep" >>"$tmp/global"
        fi
    fi
    qconf -Mconf "$tmp/global" >/dev/null
}

do_shepherd() {
    local shep=${1:?shepherd_cmd path or none}
    local tmp
    if [ "$shep" != none ]; then
        [ -x "$shep" ] || die "$shep is not an executable file"
        # execd stat()s shepherd_cmd as the admin user: every directory on the way must be searchable
        local d
        d=$(dirname "$shep")
        while [ "$d" != / ]; do
            runuser -u sgeadmin -- test -x "$d" || die "$d is not searchable by sgeadmin"
            d=$(dirname "$d")
        done
    fi
    tmp=$(mktemp -d)
    chmod 755 "$tmp"
    write_global_config "$tmp" "$shep"
    rm -rf "$tmp"
    log "shepherd_cmd = $shep"
}

do_start() {
    local shep=${1:-}
    installed || do_install
    id "$JOB_USER" >/dev/null 2>&1 || do_install
    init_spool
    mkdir -p "$RUNDIR"; chown sgeadmin: "$RUNDIR"
    local h changed=0
    h=$(host_name)
    if write_host_aliases; then changed=1; fi
    if [ "$(cat "$COMMON/act_qmaster" 2>/dev/null)" != "$h" ]; then
        echo "$h" >"$COMMON/act_qmaster"; chown sgeadmin: "$COMMON/act_qmaster"; changed=1
    fi
    if [ $changed = 1 ] && { qmaster_pidfile >/dev/null || execd_pidfile >/dev/null; }; then
        log "host names changed: restarting the daemons"
        do_stop
    fi
    if ! qmaster_pidfile >/dev/null; then
        log "starting sge_qmaster"
        start_daemon sge_qmaster SGE_QMASTER_PIDFILE "$QMASTER_PID"
    fi
    wait_for 30 qconf -sh || die "qmaster does not answer (see /var/spool/gridengine/qmaster/messages)"
    configure_cell
    if [ -n "$shep" ]; then do_shepherd "$shep"; fi
    if execd_pidfile >/dev/null && [ "$(execd_virt_config)" != "$VIRT_CONFIG" ]; then
        log "restarting sge_execd with SGE_VIRTUALIZER_CONFIG=$VIRT_CONFIG (jobs keep running)"
        stop_execd
    fi
    if ! execd_pidfile >/dev/null; then
        log "starting sge_execd"
        local extra=()
        [ -n "$VIRT_CONFIG" ] && extra=("SGE_VIRTUALIZER_CONFIG=$VIRT_CONFIG")
        start_daemon sge_execd SGE_EXECD_PIDFILE "$EXECD_PID" "${extra[@]}"
    fi
    wait_for 60 queue_ready || { qstat -f >&2 || true; die "all.q@$h did not become ready"; }
    log "cell ready: all.q@$h with $SLOTS slots, job user $JOB_USER"
}

stop_pid() { # PIDFILE
    local pid n
    pid=$(head -n1 "$1")
    for n in $(seq 1 100); do
        [ -d "/proc/$pid" ] || return 0
        [ "$n" = 50 ] && kill -TERM "$pid" 2>/dev/null
        sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
}

# stop execd only; its jobs keep running and are picked up again when it restarts
stop_execd() {
    local f h
    h=$(host_name 2>/dev/null || hostname)
    if f=$(execd_pidfile); then
        log "stopping sge_execd"
        qconf -ke "$h" >/dev/null 2>&1 || kill -TERM "$(head -n1 "$f")" 2>/dev/null || true
        stop_pid "$f"
    fi
}

do_stop() {
    local f
    stop_execd
    if f=$(qmaster_pidfile); then
        log "stopping sge_qmaster"
        qconf -km >/dev/null 2>&1 || kill -TERM "$(head -n1 "$f")" 2>/dev/null || true
        stop_pid "$f"
    fi
}

do_status() {
    local ok=0
    if f=$(qmaster_pidfile); then echo "qmaster: running (pid $(head -n1 "$f"))"; else echo "qmaster: stopped"; ok=1; fi
    if f=$(execd_pidfile); then echo "execd: running (pid $(head -n1 "$f"))"; else echo "execd: stopped"; ok=1; fi
    if [ $ok = 0 ]; then
        qconf -sconf global | grep '^shepherd_cmd' || true
        qstat -f || true
        queue_ready || ok=1
    fi
    return $ok
}

do_purge() {
    installed || { log "nothing installed"; return 0; }
    do_stop
    # shepherds left over from jobs of the old cell
    local p
    for p in /var/spool/gridengine/execd/*/active_jobs/*/pid; do
        [ -f "$p" ] || continue
        local pid; pid=$(head -n1 "$p")
        if [ -n "$pid" ] && grep -q '^sge_shep' "/proc/$pid/comm" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    done
    rm -rf "${SPOOLDB:?}"/* /var/spool/gridengine/qmaster/* /var/spool/gridengine/execd/*
    rm -f "$COMMON/accounting" "$COMMON/host_aliases"
    : >"$COMMON/act_qmaster"
    init_spool
    log "purged"
}

verb=${1:-}
shift || true
case "$verb" in
    install) do_install ;;
    start) do_start "$@" ;;
    shepherd) do_shepherd "$@" ;;
    stop) do_stop ;;
    stop-execd) stop_execd ;;
    status) do_status ;;
    purge) do_purge ;;
    *) sed -n '2,21p' "$0" >&2; exit 2 ;;
esac
