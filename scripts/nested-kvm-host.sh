#!/usr/bin/env bash
# A nested real-KVM test host: QEMU software emulation (`-accel tcg -cpu max`) presents AMD SVM
# with nested paging to its guest even on machines without vmx/svm, and Debian 12's own kernel
# (downloaded, unpacked, never installed) loads kvm-amd there, so that outer VM has a /dev/kvm
# that runs Linux guests: the embedded VMM's job path can be tested on real KVM.
#
# Usage:
#   scripts/nested-kvm-host.sh build
#       fetch and cache the outer host's kernel, its modules and the initramfs base
#       (in ${SGE_VM_CACHE:-/var/cache/sge_virtualizer}/nested-kvm-host; safe to run again)
#   scripts/nested-kvm-host.sh run [--mem MiB] [--cpus N] [--timeout S] [--share DIR]...
#                                  [--env NAME]... [--cwd DIR] -- CMD ARGS...
#       boot the outer VM, run CMD there as root and print its stdout/stderr live; exits with
#       CMD's exit status (125: the outer VM failed; its serial log is printed).
#       --mem      outer VM memory (default 6144)
#       --cpus     outer vCPUs (default 2)
#       --timeout  deadline for the whole run, boot included (default 1800 s)
#       --share    a host directory the command may write, at the same path in the outer VM
#                  (default: the repository; may repeat). /usr (hence /bin, /lib, /sbin),
#                  /etc and /var/lib/sge_virtualizer (OS images) are always shared read-only.
#       --env      pass this host environment variable to CMD (may repeat; PATH, HOME, TERM,
#                  RUST_BACKTRACE and SGE_VIRTUALIZER_* pass always)
#       --cwd      CMD's working directory (default: the current directory)
# NESTED_KVM_HEARTBEAT_LIMIT: seconds without the command's heartbeat (written every 10 s)
# after which the outer host counts as stalled and is stopped (default 180).
# NESTED_KVM_HOST_APPEND: more words for the outer kernel's command line (module parameters such
# as kvm.nx_huge_pages=never, transparent_hugepage=never), for chasing outer-host stalls.
# Each run keeps its directory (serial log of the outer VM, command, stdout, stderr, status) in
# ${NESTED_KVM_RUNS:-<repo>/target/nested-kvm-host}/<time>-<pid>; the path is printed at the end.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${SGE_VM_CACHE:-/var/cache/sge_virtualizer}/nested-kvm-host
RUNS=${NESTED_KVM_RUNS:-$REPO/target/nested-kvm-host}
# Modules the outer host loads, in this order after their dependencies: KVM on AMD SVM, the
# 9p file system over virtio-pci that carries the shared directories, and loop devices, ext4
# and quota for tests that make a small file system with user quotas (this host's own kernel
# may lack quota support; Debian's has it), and dummy: the outer host's only non-loopback
# interface, with an address and a default route, so passt (jobs' network) has a host
# network to copy (the tests' traffic stays on the outer host's loopback).
readonly MODULES=(kvm-amd 9p 9pnet_virtio virtio_pci loop ext4 quota_v2 dummy)
# Bump when the initramfs layout or /init below changes.
readonly RECIPE_VERSION=4

say() { echo "nested-kvm-host: $*" >&2; }
die() { echo "nested-kvm-host: error: $*" >&2; exit 125; }

SUDO=
[ "$(id -u)" = 0 ] || SUDO=sudo

ensure_packages() {
    local missing=() p
    for p in qemu-system-x86 busybox-static kmod cpio; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    $SUDO timeout 600 apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO timeout 900 apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

# The kernel package Debian's linux-image-amd64 currently depends on (security updates move it),
# or, offline, the newest one already cached.
resolve_kernel_package() {
    local pkg
    pkg=$(timeout 60 apt-cache depends --important linux-image-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9]/ { print $2; exit }') || true
    if [ -z "$pkg" ]; then
        pkg=$(ls -1 "$CACHE" 2>/dev/null | grep '^linux-image-' | sort -V | tail -n 1) || true
        [ -n "$pkg" ] || die "cannot resolve linux-image-amd64's kernel package (apt-get update?)"
        say "apt has no answer; using the cached $pkg"
    fi
    echo "$pkg"
}

# Fetches and unpacks the kernel package into $CACHE/<pkg>: vmlinuz, the needed modules and
# modules.order (the insmod order, dependencies first).
build_kernel() {
    local pkg=$1 dir=$CACHE/$1
    [ -s "$dir/vmlinuz" ] && [ -s "$dir/modules.order" ] &&
        [ "$(cat "$dir/modules.wanted" 2>/dev/null)" = "${MODULES[*]}" ] && return 0
    local work
    work=$(mktemp -d "$CACHE/.fetch.XXXXXX")
    say "fetching $pkg (Debian's kernel for the outer host; unpacked, not installed)"
    (cd "$work" && timeout 600 apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) ||
        { rm -rf "$work"; die "apt-get download $pkg failed"; }
    dpkg-deb -x "$work"/*.deb "$work/root"
    local release
    release=$(ls -1 "$work/root/lib/modules")
    [ -d "$work/root/lib/modules/$release" ] || { rm -rf "$work"; die "$pkg has no modules"; }
    depmod -b "$work/root" "$release"
    mkdir -p "$work/out/modules"
    local m line path
    for m in "${MODULES[@]}"; do
        modprobe -d "$work/root" -S "$release" --show-depends "$m" |
            while read -r line; do
                [[ $line == insmod\ * ]] || continue
                path=$(echo "$line" | awk '{ print $2 }')
                if ! grep -qxF "$(basename "$path")" "$work/out/modules.order" 2>/dev/null; then
                    cp "$path" "$work/out/modules/"
                    basename "$path" >>"$work/out/modules.order"
                fi
            done
    done
    cp "$work/root/boot/vmlinuz-$release" "$work/out/vmlinuz"
    echo "$release" >"$work/out/release"
    echo "${MODULES[*]}" >"$work/out/modules.wanted"
    rm -rf "$dir"
    mv "$work/out" "$dir"
    rm -rf "$work"
    say "cached $pkg ($release) in $dir"
}

# /init of the outer host (busybox sh): mount the basics, load KVM and 9p, mount the shares
# that the run directory lists, run the command, record its status, power off.
write_init() {
    cat >"$1" <<'EOF'
#!/.nested/busybox sh
B=/.nested/busybox
fail() { echo "nested-kvm-host init: $*" >/dev/console; $B sync; $B poweroff -f; }
# Run from a tmpfs copy of the initramfs: the initramfs itself (rootfs) cannot be pivot_root'ed,
# which passt's sandbox does (as it would on an execution host's real root file system).
if [ ! -e /.nested/on-tmpfs ]; then
    $B mkdir -p /.root
    $B mount -t tmpfs -o mode=0755 tmpfs /.root || fail "cannot mount the tmpfs root"
    for e in /* /.nested; do
        [ "$e" = /.root ] || $B cp -a "$e" /.root/ || fail "cannot copy $e to the tmpfs root"
    done
    $B touch /.root/.nested/on-tmpfs
    exec $B switch_root /.root /init
fi
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs devtmpfs /dev
$B mkdir -p /dev/pts /dev/shm
$B mount -t devpts devpts /dev/pts
$B mount -t tmpfs tmpfs /dev/shm
$B mount -t tmpfs tmpfs /tmp
$B mount -t tmpfs tmpfs /run
for m in $($B cat /.nested/modules.order); do
    $B insmod /.nested/modules/$m || fail "insmod $m failed"
done
[ -c /dev/kvm ] || fail "no /dev/kvm after loading kvm-amd"
opts=trans=virtio,version=9p2000.L,msize=512000
$B mkdir -p /run/nested
$B mount -t 9p -o $opts,cache=none run /run/nested || fail "cannot mount the run directory"
# Each line: tag ro|rw path. The host does not change shared files during a run, so the guest
# caches them (an uncached 70 MB debug binary is read again at each exec: seconds under TCG);
# what the command writes reaches the host at the latest at the sync before power-off.
# Only the run directory (live stdout/stderr, status) is uncached.
while read -r tag mode path; do
    if [ "$mode" = ro ]; then o=$opts,ro,cache=loose; else o=$opts,cache=loose; fi
    $B mkdir -p "$path"
    $B mount -t 9p -o $o "$tag" "$path" || fail "cannot mount $path"
done </run/nested/mounts
$B ip link set lo up 2>/dev/null
# A host network for passt to copy: no traffic leaves the outer host (it has no NIC).
if $B ip link add nested0 type dummy 2>/dev/null; then
    $B ip addr add 10.0.2.15/24 dev nested0
    $B ip link set nested0 up
    $B ip route add default via 10.0.2.2 dev nested0
fi
echo "nested-kvm-host init: running the command" >/dev/console
/bin/bash /run/nested/command </dev/null >/run/nested/stdout 2>/run/nested/stderr
echo $? >/run/nested/status.tmp
$B mv /run/nested/status.tmp /run/nested/status
$B sync
$B poweroff -f
EOF
    chmod 755 "$1"
}

# The initramfs base: busybox, /init, the modules, and mount points; /usr and the rest come
# from the host over 9p at run time.
build_initramfs() {
    local dir=$1 stage
    stage=$(mktemp -d "$CACHE/.initramfs.XXXXXX")
    # mktemp makes it 0700, and it becomes the outer host's /: jobs run as other users.
    chmod 755 "$stage"
    mkdir -p "$stage"/{.nested/modules,proc,sys,dev,tmp,run,usr,etc,var,root}
    local busybox
    busybox=$(command -v busybox) || die "busybox not found"
    file -L "$busybox" 2>/dev/null | grep -q 'statically linked' ||
        ldd "$busybox" 2>&1 | grep -q 'not a dynamic' || die "$busybox is not statically linked"
    cp "$busybox" "$stage/.nested/busybox"
    cp "$dir"/modules/*.ko "$stage/.nested/modules/"
    cp "$dir/modules.order" "$stage/.nested/"
    # Debian 12 merges /bin, /sbin and /lib into /usr.
    for l in bin sbin lib lib64; do ln -s "usr/$l" "$stage/$l"; done
    write_init "$stage/init"
    (cd "$stage" && find . | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) >"$stage.cpio"
    mv "$stage.cpio" "$dir/initramfs-v$RECIPE_VERSION.cpio"
    rm -rf "$stage"
}

cmd_build() {
    ensure_packages
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    timeout 900 flock 9 || die "another build holds $CACHE/.lock for 15 minutes"
    local pkg
    pkg=$(resolve_kernel_package)
    build_kernel "$pkg"
    build_initramfs "$CACHE/$pkg"
    ln -sfn "$pkg" "$CACHE/current"
    exec 9>&-
    say "outer host ready: $(cat "$CACHE/current/release") in $CACHE/current"
}

cmd_run() {
    local mem=6144 cpus=2 deadline=1800 cwd=$PWD shares=() envs=()
    while [ $# -gt 0 ]; do
        case $1 in
            --mem) mem=$2; shift 2 ;;
            --cpus) cpus=$2; shift 2 ;;
            --timeout) deadline=$2; shift 2 ;;
            --share) shares+=("$(cd "$2" && pwd)"); shift 2 ;;
            --env) envs+=("$2"); shift 2 ;;
            --cwd) cwd=$2; shift 2 ;;
            --) shift; break ;;
            *) die "unknown option $1 (see --help)" ;;
        esac
    done
    [ $# -gt 0 ] || die "no command given (… run -- CMD ARGS)"
    [[ $mem =~ ^[0-9]+$ && $cpus =~ ^[0-9]+$ && $deadline =~ ^[0-9]+$ ]] ||
        die "--mem, --cpus and --timeout take numbers"
    [ ${#shares[@]} -gt 0 ] || shares=("$REPO")

    cmd_build
    local host=$CACHE/current
    local run
    mkdir -p "$RUNS"
    run=$(cd "$RUNS" && pwd)/$(date -u +%Y%m%dT%H%M%S)-$$
    mkdir -p "$run"
    : >"$run/stdout"
    : >"$run/stderr"

    # The shares: 9p tag, mode, path (the same path inside).
    local qemu_fs=() i=0 path mode
    : >"$run/mounts"
    local seen=" "
    for path in /usr /etc /var/lib/sge_virtualizer "${shares[@]}"; do
        [ -d "$path" ] || continue
        case $seen in *" $path "*) continue ;; esac
        seen+="$path "
        mode=ro
        case " ${shares[*]} " in *" $path "*) mode=rw ;; esac
        echo "s$i $mode $path" >>"$run/mounts"
        local ro=
        [ $mode = ro ] && ro=,readonly=on
        qemu_fs+=(-fsdev "local,id=fs$i,path=$path,security_model=none$ro"
                  -device "virtio-9p-pci,fsdev=fs$i,mount_tag=s$i")
        i=$((i + 1))
    done

    # The command: the environment, the directory, then the argv, each word quoted.
    {
        echo 'set -e'
        local name
        for name in PATH HOME TERM RUST_BACKTRACE RUST_LOG "${envs[@]}" \
            $(compgen -e | grep '^SGE_VIRTUALIZER_' || true); do
            [ -n "${!name+x}" ] && printf 'export %s=%q\n' "$name" "${!name}"
        done
        printf 'cd %q\n' "$cwd"
        # A heartbeat the host watches: an outer host whose timers stopped (it froze without a
        # word, 2026-12-07) stops writing it.
        local beat='date +%s >/run/nested/heartbeat.tmp && mv -f /run/nested/heartbeat.tmp /run/nested/heartbeat'
        echo "( while :; do $beat; sleep 10; done ) </dev/null >/dev/null 2>&1 &"
        echo 'set +e'
        printf 'exec'
        printf ' %q' "$@"
        echo
    } >"$run/command"

    say "booting the outer host ($(cat "$host/release"), ${mem} MiB, $cpus vCPUs, TCG); run dir $run"
    local start=$SECONDS rc=0
    timeout -k 10 "$deadline" qemu-system-x86_64 \
        -accel tcg -cpu max -M pc -m "$mem" -smp "$cpus" \
        -nodefaults -no-user-config -display none -no-reboot \
        -kernel "$host/vmlinuz" -initrd "$host/initramfs-v$RECIPE_VERSION.cpio" \
        -append "console=ttyS0 panic=-1 loglevel=5 ${NESTED_KVM_HOST_APPEND:-}" \
        -serial "file:$run/serial.log" \
        -fsdev "local,id=fsrun,path=$run,security_model=none" \
        -device "virtio-9p-pci,fsdev=fsrun,mount_tag=run" \
        "${qemu_fs[@]}" \
        </dev/null >"$run/qemu.log" 2>&1 &
    local qemu=$!
    QEMU_PID=$qemu
    # If this script is stopped, the outer host goes with it (timeout passes the signal on).
    trap 'kill "$QEMU_PID" 2>/dev/null || true' EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
    tail -f --pid=$qemu -c +1 "$run/stdout" &
    local tail_out=$!
    tail -f --pid=$qemu -c +1 "$run/stderr" >&2 &
    local tail_err=$!
    # A stalled outer host is stopped now rather than at the deadline: once its kernel has
    # reported a soft lockup (or RCU a stall) twice, about a minute stuck, or once the command's
    # heartbeat (every 10 s) is $heartbeat_limit s old. Neither kind of stall ever came back
    # (2026-12-06/07: soft lockups for 600 to 1300 s; a silent freeze with every timer stopped).
    local heartbeat_limit=${NESTED_KVM_HEARTBEAT_LIMIT:-180}
    (
        while kill -0 "$qemu" 2>/dev/null; do
            stalls=$(grep -c -E 'soft lockup - CPU#|self-detected stall on CPU' \
                "$run/serial.log" 2>/dev/null || true)
            why=
            if [ "${stalls:-0}" -ge 2 ]; then
                why="its kernel reports a stall (see its serial log below)"
            elif [ -e "$run/heartbeat" ] &&
                [ $(($(date +%s) - $(stat -c %Y "$run/heartbeat"))) -gt "$heartbeat_limit" ]; then
                why="its heartbeat stopped more than ${heartbeat_limit}s ago (its timers stopped)"
            fi
            if [ -n "$why" ]; then
                echo "$why" >"$run/stalled"
                say "the outer host stalled: $why; stopping it"
                kill "$qemu" 2>/dev/null
                break
            fi
            sleep 5
        done
    ) &
    local stall_watch=$!
    wait $qemu || rc=$?
    kill $stall_watch 2>/dev/null || true
    wait $tail_out $tail_err $stall_watch 2>/dev/null || true
    local took=$((SECONDS - start))

    if [ -s "$run/status" ]; then
        local status
        status=$(cat "$run/status")
        say "command exited $status after ${took}s in the outer host (run dir $run)"
        if [ "$status" != 0 ]; then
            say "outer host serial log ($run/serial.log):"
            sed 's/^/  | /' "$run/serial.log" >&2
        fi
        return "$status"
    fi
    if [ -e "$run/stalled" ]; then
        say "error: the outer host stalled after ${took}s and was stopped"
    elif [ $rc = 124 ] || [ $rc = 137 ]; then
        say "error: the outer host ran past the ${deadline}s deadline and was killed"
    else
        say "error: the outer host ended (QEMU status $rc) without the command's status"
    fi
    say "QEMU's output:"
    sed 's/^/  | /' "$run/qemu.log" >&2
    say "outer host serial log ($run/serial.log):"
    sed 's/^/  | /' "$run/serial.log" >&2
    return 125
}

case ${1:-} in
    build) shift; cmd_build "$@" ;;
    run) shift; cmd_run "$@" ;;
    -h|--help|"") awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown subcommand $1 (build | run; see --help)" ;;
esac
