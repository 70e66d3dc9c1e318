#!/usr/bin/env bash
# Boot smoke test of the guest image under QEMU TCG (microvm, no ACPI) with a vhost-user vsock
# device served by vhost-device-vsock. The image's /init is guest-agent/image/test/smoke-init.sh
# (a busybox shell script); it reports what it sees and reboots, which ends QEMU (-no-reboot).
#
# Checks: user space runs, uname -r matches the manifest, the virtio vsock device (id 0x0013) is
# bound to vmw_vsock_virtio_transport, /dev/vsock exists, the filesystems the agent and jobs need
# are there, overlayfs works, QEMU exits 0. Prints boot-to-init and whole-run wall times.
#
# Usage: guest-agent/image/test/boot-smoke.sh [--image DIR] [--append "ARGS"] [--runs N] [--smp N]
#   --image DIR     a directory with vmlinux + initramfs.cpio whose /init is smoke-init.sh
#                   (default: build one with scripts/build-guest-image.sh --init ... into
#                   <repo>/build/guest-smoke)
#   --append ARGS   kernel command line (default: "console=ttyS0 reboot=t panic=-1"; microvm
#                   has no i8042, so reboot=k would spin ~1 s before the reset)
#   --runs N        boot N times and print each run's times (default 1)
#   --smp N         vCPUs (default 1)
#   --verbose       print the guest console
set -euo pipefail

die() { echo "boot-smoke: error: $*" >&2; exit 1; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)
IMAGE=
APPEND="console=ttyS0 reboot=t panic=-1"
RUNS=1
SMP=1
VERBOSE=0
while [[ $# -gt 0 ]]; do
    case $1 in
        --image) [[ $# -ge 2 ]] || die "--image needs a directory"; IMAGE=$2; shift 2 ;;
        --append) [[ $# -ge 2 ]] || die "--append needs a string"; APPEND=$2; shift 2 ;;
        --runs) [[ $# -ge 2 ]] || die "--runs needs a number"; RUNS=$2; shift 2 ;;
        --smp) [[ $# -ge 2 ]] || die "--smp needs a number"; SMP=$2; shift 2 ;;
        --verbose) VERBOSE=1; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive number"
[[ $SMP =~ ^[1-9][0-9]*$ ]] || die "--smp must be a positive number"

QEMU=$(command -v qemu-system-x86_64) || die "qemu-system-x86_64 not found (Debian: apt-get install qemu-system-x86)"
VHOST=$(command -v vhost-device-vsock || true)
[[ -n $VHOST ]] || { [[ -x $HOME/.cargo/bin/vhost-device-vsock ]] && VHOST=$HOME/.cargo/bin/vhost-device-vsock; }
[[ -n $VHOST ]] || die "vhost-device-vsock not found (cargo install vhost-device-vsock --locked)"

if [[ -z $IMAGE ]]; then
    IMAGE=$REPO/build/guest-smoke
    "$REPO/scripts/build-guest-image.sh" --out "$IMAGE" --init "$REPO/guest-agent/image/test/smoke-init.sh"
fi
[[ -f $IMAGE/vmlinux && -f $IMAGE/initramfs.cpio ]] || die "$IMAGE has no vmlinux + initramfs.cpio"
WANT_RELEASE=
if [[ -f $IMAGE/manifest.json ]]; then
    WANT_RELEASE=$(sed -n 's/^ *"kernel_release": "\(.*\)",$/\1/p' "$IMAGE/manifest.json")
fi

TMP=$(mktemp -d /tmp/sge-boot-smoke.XXXXXX)
VHOST_PID=
cleanup() {
    if [[ -n $VHOST_PID ]]; then kill "$VHOST_PID" 2>/dev/null || true; wait "$VHOST_PID" 2>/dev/null || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT

now_us() { local t=${EPOCHREALTIME/./}; echo "$((10#$t))"; }
ms() { printf '%d.%03d' $(($1 / 1000000)) $((($1 / 1000) % 1000)); }

fail=0
INIT_TIMES=()
TOTAL_TIMES=()
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {if (NR == 0) print "?"; else if (NR % 2) print a[(NR+1)/2]; else printf "%d\n", (a[NR/2]+a[NR/2+1])/2}'; }
for run in $(seq 1 "$RUNS"); do
    rm -f "$TMP"/vhost.sock "$TMP"/vsock.uds*
    "$VHOST" --vm "guest-cid=3,socket=$TMP/vhost.sock,uds-path=$TMP/vsock.uds" >"$TMP/vhost.log" 2>&1 &
    VHOST_PID=$!
    for _ in $(seq 1 100); do [[ -S $TMP/vhost.sock ]] && break; sleep 0.05; done
    [[ -S $TMP/vhost.sock ]] || { cat "$TMP/vhost.log" >&2; die "vhost-device-vsock did not create its socket"; }

    t0=$(now_us)
    set +e
    timeout 120 "$QEMU" -accel tcg -M microvm,acpi=off,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=128M,share=on -m 128M -smp "$SMP" -cpu max \
        -nodefaults -no-user-config -nographic -serial stdio -no-reboot \
        -kernel "$IMAGE/vmlinux" -initrd "$IMAGE/initramfs.cpio" -append "$APPEND" \
        -chardev socket,id=c0,path="$TMP/vhost.sock" -device vhost-user-vsock-device,chardev=c0 \
        </dev/null 2>&1 | while IFS= read -r line; do
            printf '%s %s\n' "$(( $(now_us) - t0 ))" "${line%$'\r'}"
        done >"$TMP/console.log"
    rc=${PIPESTATUS[0]}
    set -e
    t_end=$(( $(now_us) - t0 ))
    kill "$VHOST_PID" 2>/dev/null || true; wait "$VHOST_PID" 2>/dev/null || true; VHOST_PID=

    if [[ $VERBOSE == 1 ]]; then
        while read -r t rest; do printf '+%s %s\n' "$(ms "$t")" "$rest"; done <"$TMP/console.log"
    fi
    cut -d' ' -f2- "$TMP/console.log" >"$TMP/console.txt"
    get() { sed -n "s/^SGE-SMOKE $1=\(.*\)$/\1/p" "$TMP/console.txt" | head -n1; }
    t_init=$(awk '/SGE-SMOKE init-start/ {print $1; exit}' "$TMP/console.log")
    problems=()
    [[ $rc == 0 ]] || problems+=("qemu exit status $rc")
    grep -q '^SGE-SMOKE done' "$TMP/console.txt" || problems+=("init did not finish")
    grep -qE '^SGE-SMOKE device=virtio[0-9]+ id=0x0013 driver=vmw_vsock_virtio_transport$' "$TMP/console.txt" \
        || problems+=("virtio vsock device not bound to vmw_vsock_virtio_transport")
    [[ $(get dev-vsock) == present ]] || problems+=("/dev/vsock missing")
    [[ $(get overlay) == ok ]] || problems+=("overlayfs mount failed")
    fss=" $(get filesystems) "
    for fs in proc sysfs devtmpfs tmpfs devpts cgroup2 ext4 overlay fuse virtiofs 9p; do
        [[ $fss == *" $fs "* ]] || problems+=("filesystem $fs missing")
    done
    release=$(get release)
    [[ -z $WANT_RELEASE || $release == "$WANT_RELEASE" ]] || problems+=("uname -r $release, manifest says $WANT_RELEASE")

    [[ -n $t_init ]] && INIT_TIMES+=("$t_init")
    TOTAL_TIMES+=("$t_end")
    printf 'boot-smoke run %d: boot-to-init %ss wall (guest uptime %ss), whole run %ss; kernel %s, %s vCPU(s), cgroup controllers: %s\n' \
        "$run" "$( [[ -n $t_init ]] && ms "$t_init" || echo '?')" "$(sed -n 's/^SGE-SMOKE init-start uptime=//p' "$TMP/console.txt")" \
        "$(ms "$t_end")" "${release:-?}" "$(get cpus)" "$(get cgroup-controllers)"
    if [[ ${#problems[@]} -gt 0 ]]; then
        fail=1
        printf 'boot-smoke run %d FAILED: %s\n' "$run" "$(IFS=';'; echo "${problems[*]}")" >&2
        echo "---- guest console ----" >&2
        tail -n 40 "$TMP/console.txt" >&2
    fi
done
if [[ $RUNS -gt 1 ]]; then
    printf 'boot-smoke: median of %d runs: boot-to-init %ss wall, whole run %ss\n' "$RUNS" \
        "$(ms "$(median "${INIT_TIMES[@]}")")" "$(ms "$(median "${TOTAL_TIMES[@]}")")"
fi
[[ $fail == 0 ]] || exit 1
echo "boot-smoke: OK (cmdline: $APPEND)"
