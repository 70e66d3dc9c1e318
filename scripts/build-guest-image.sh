#!/usr/bin/env bash
# Build the sge_virtualizer guest image: an uncompressed vmlinux (Debian linux-source-6.1,
# tinyconfig + guest-agent/image/kernel.config + guest-agent/image/patches/*.patch) and an
# uncompressed initramfs.cpio whose /init is the guest agent, plus manifest.json.
#
# The kernel is built once per (fragment, patches, linux-source version, compiler) and kept in
# ${SGE_VM_CACHE:-/var/cache/sge_virtualizer}; a run with nothing changed rebuilds nothing.
#
# Usage: scripts/build-guest-image.sh [--out DIR] [--init FILE] [--kernel-only] [--jobs N]
#   --out DIR       where vmlinux, initramfs.cpio and manifest.json go (default <repo>/build/guest)
#   --init FILE     use FILE (a static executable or a #! script) as /init instead of building
#                   the agent (`cargo build -p guest-agent --bin sge-vm-agent`, static)
#   --kernel-only   build/cache the kernel and copy vmlinux; skip the initramfs
#   --jobs N        parallel make jobs (default: nproc)
# Environment: SGE_VM_CACHE (cache dir), LINUX_SOURCE_TAR (default /usr/src/linux-source-6.1.tar.xz),
#              BUSYBOX (default: busybox from PATH; must be statically linked).
set -euo pipefail

# Bump when the kernel build steps below change in a way that changes the result.
readonly RECIPE_VERSION=1
readonly LINUX_PKG=linux-source-6.1

die() { echo "build-guest-image: error: $*" >&2; exit 1; }
say() { echo "build-guest-image: $*"; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE_DIR=$REPO/guest-agent/image
OUT=$REPO/build/guest
INIT_OVERRIDE=
KERNEL_ONLY=0
JOBS=$(nproc)

while [[ $# -gt 0 ]]; do
    case $1 in
        --out) [[ $# -ge 2 ]] || die "--out needs a directory"; OUT=$2; shift 2 ;;
        --init) [[ $# -ge 2 ]] || die "--init needs a file"; INIT_OVERRIDE=$2; shift 2 ;;
        --kernel-only) KERNEL_ONLY=1; shift ;;
        --jobs) [[ $# -ge 2 ]] || die "--jobs needs a number"; JOBS=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || die "--jobs must be a positive number, got '$JOBS'"

CACHE=${SGE_VM_CACHE:-/var/cache/sge_virtualizer}
LINUX_TAR=${LINUX_SOURCE_TAR:-/usr/src/$LINUX_PKG.tar.xz}
FRAGMENT=$IMAGE_DIR/kernel.config
LIST_IN=$IMAGE_DIR/initramfs.list.in

for tool in make gcc tar xz patch sha256sum flex bison bc readelf; do
    command -v "$tool" >/dev/null || die "'$tool' not found (Debian: apt-get install build-essential flex bison bc libelf-dev libssl-dev xz-utils patch binutils)"
done
[[ -r $LINUX_TAR ]] || die "$LINUX_TAR not found (Debian: apt-get install $LINUX_PKG)"
[[ -r $FRAGMENT ]] || die "missing $FRAGMENT"
mkdir -p "$OUT" || die "cannot create $OUT"
OUT=$(cd "$OUT" && pwd)
mkdir -p "$CACHE" || die "cannot create cache dir $CACHE (set SGE_VM_CACHE to a writable dir)"
CACHE=$(cd "$CACHE" && pwd)

# ---------------------------------------------------------------------------------------------
# Cache key: fragment + patches + linux-source version (+ compiler and recipe version).
# ---------------------------------------------------------------------------------------------
if LINUX_VER=$(dpkg-query -W -f='${Version}' "$LINUX_PKG" 2>/dev/null) && [[ -n $LINUX_VER ]]; then
    :
else
    LINUX_VER=sha256-$(sha256sum "$LINUX_TAR" | cut -c1-16)
fi
shopt -s nullglob
PATCHES=("$IMAGE_DIR"/patches/*.patch)
shopt -u nullglob

patch_hash() {
    local p
    for p in "${PATCHES[@]}"; do
        printf 'patch %s\n' "$(basename "$p")"
        cat "$p"
    done | sha256sum | cut -c1-16
}
PATCH_HASH=$(patch_hash)
CC_VERSION=$(gcc --version | head -n1)
CONFIG_HASH=$( {
    printf 'recipe %s\npackage %s %s\ncompiler %s\npatches %s\n' \
        "$RECIPE_VERSION" "$LINUX_PKG" "$LINUX_VER" "$CC_VERSION" "$PATCH_HASH"
    cat "$FRAGMENT"
} | sha256sum | cut -c1-16)

SRC=$CACHE/src/${LINUX_PKG}_$LINUX_VER
KDIR=$CACHE/kernel/$CONFIG_HASH

# One build at a time per cache dir (the source tree is shared).
exec 9>"$CACHE/.lock"
if ! flock -n 9; then
    say "waiting for another build using $CACHE ..."
    flock 9
fi

prepare_source() {
    # A pristine extract with our patches applied; re-extracted when the patch set changes.
    if [[ -f $SRC/.sge-prepared ]] && [[ $(cat "$SRC/.sge-prepared") == "$PATCH_HASH" ]]; then
        return 0
    fi
    say "extracting $LINUX_TAR into $SRC (about a minute)"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xJf "$LINUX_TAR" -C "$SRC.tmp" --strip-components=1
    local p
    for p in "${PATCHES[@]}"; do
        say "applying $(basename "$p")"
        patch -p1 -N --quiet -d "$SRC.tmp" <"$p" || die "patch $p does not apply to $LINUX_PKG $LINUX_VER"
    done
    echo "$PATCH_HASH" >"$SRC.tmp/.sge-prepared"
    mv "$SRC.tmp" "$SRC"
}

# Check that the fragment's settings survived olddefconfig: `=value` lines must appear verbatim,
# `is not set` lines must not have become =y/=m.
check_config() {
    local config=$1 line sym bad=0
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            if ! grep -qxF -- "$line" "$config"; then
                sym=${BASH_REMATCH[1]}
                echo "  wanted: $line   got: $(grep -E "^(# )?${sym}[= ]" "$config" || echo "(absent: dependencies not met)")" >&2
                bad=1
            fi
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}
            if grep -qE "^$sym=[ym]$" "$config"; then
                echo "  wanted: $line   got: $(grep -E "^$sym=" "$config")" >&2
                bad=1
            fi
        fi
    done <"$FRAGMENT"
    return $bad
}

build_kernel() {
    prepare_source
    local log=$CACHE/kernel/$CONFIG_HASH.log
    mkdir -p "$CACHE/kernel"
    say "configuring (tinyconfig + $(basename "$FRAGMENT")); log: $log"
    : >"$log"
    {
        make -C "$SRC" tinyconfig
        (cd "$SRC" && ./scripts/kconfig/merge_config.sh -m .config "$FRAGMENT")
        make -C "$SRC" olddefconfig
    } >>"$log" 2>&1 || { tail -n 30 "$log" >&2; die "kernel configuration failed (see $log)"; }
    if ! check_config "$SRC/.config"; then
        die "the options above from $FRAGMENT did not end up in .config (missing dependency?)"
    fi
    say "building vmlinux with make -j$JOBS (cold: about 4 minutes on 2 cores; incremental: seconds)"
    local t0=$SECONDS
    if ! make -C "$SRC" -j"$JOBS" vmlinux >>"$log" 2>&1; then
        tail -n 40 "$log" >&2
        die "kernel build failed (see $log)"
    fi
    # vmlinux builds usr/ (and so gen_init_cpio) when BLK_DEV_INITRD=y; make sure of it.
    make -C "$SRC" usr/gen_init_cpio >>"$log" 2>&1 || die "building usr/gen_init_cpio failed (see $log)"
    local release
    release=$(make -s -C "$SRC" kernelrelease) || die "make kernelrelease failed"
    say "kernel $release built in $((SECONDS - t0)) s"

    rm -rf "$KDIR.tmp"
    mkdir -p "$KDIR.tmp"
    cp "$SRC/vmlinux" "$KDIR.tmp/vmlinux"
    cp "$SRC/usr/gen_init_cpio" "$KDIR.tmp/gen_init_cpio"
    cp "$SRC/.config" "$KDIR.tmp/config"
    echo "$release" >"$KDIR.tmp/kernelrelease"
    rm -rf "$KDIR"
    mv "$KDIR.tmp" "$KDIR"
}

if [[ -f $KDIR/vmlinux && -f $KDIR/gen_init_cpio && -f $KDIR/kernelrelease ]]; then
    say "kernel cached: $KDIR (config hash $CONFIG_HASH)"
else
    build_kernel
fi
flock -u 9
KERNEL_RELEASE=$(cat "$KDIR/kernelrelease")

# Copy into the out dir only when different, so that a no-change run touches nothing.
install_if_changed() {
    local src=$1 dst=$2
    if [[ -f $dst ]] && cmp -s "$src" "$dst"; then
        return 1
    fi
    cp "$src" "$dst.tmp.$$"
    mv "$dst.tmp.$$" "$dst"
}
# The zeros between .text and the 2 MiB-aligned .rodata are loaded by the VMM at every boot and
# then poisoned and freed by the kernel (see kernel.config): say how many there are.
text_rodata_gap() {
    local sections text rodata
    sections=$(readelf -SW "$1")
    text=$(sed -n 's/.*\] \.text  *PROGBITS  *\([0-9a-f]*\) [0-9a-f]* \([0-9a-f]*\) .*/\1 \2/p' <<<"$sections")
    rodata=$(sed -n 's/.*\] \.rodata  *PROGBITS  *\([0-9a-f]*\) .*/\1/p' <<<"$sections")
    [[ -n $text && -n $rodata ]] || { echo "unknown"; return; }
    set -- $text
    echo "$(( (0x$rodata - 0x$1 - 0x$2) / 1024 )) KiB"
}
say "vmlinux: $(text_rodata_gap "$KDIR/vmlinux") of zeros between .text and .rodata"
if install_if_changed "$KDIR/vmlinux" "$OUT/vmlinux"; then
    say "wrote $OUT/vmlinux"
else
    say "$OUT/vmlinux up to date"
fi

json_str() { # a JSON string literal for $1
    local s=$1
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "$s"
}
sha() { sha256sum "$1" | cut -d' ' -f1; }

if [[ $KERNEL_ONLY == 1 ]]; then
    INIT_DESC=none
    rm -f "$OUT/initramfs.cpio"
else
    # -----------------------------------------------------------------------------------------
    # /init: the guest agent (static), or --init FILE.
    # -----------------------------------------------------------------------------------------
    if [[ -n $INIT_OVERRIDE ]]; then
        [[ -f $INIT_OVERRIDE ]] || die "--init $INIT_OVERRIDE: no such file"
        INIT_BIN=$(cd "$(dirname "$INIT_OVERRIDE")" && pwd)/$(basename "$INIT_OVERRIDE")
        INIT_DESC="custom: $INIT_BIN"
    else
        command -v cargo >/dev/null || die "cargo not found (needed to build the guest agent)"
        RUST_TARGET=x86_64-unknown-linux-gnu
        say "building the guest agent (static, target dir $REPO/target/guest)"
        # --target keeps RUSTFLAGS off build scripts and proc macros, which cannot be static.
        # strip=symbols: the symbol table is 14 % of the binary and only serves debuggers;
        # every byte of /init is loaded by the VMM, unpacked and freed by the guest at each boot.
        if ! (cd "$REPO" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --release \
                -p guest-agent --bin sge-vm-agent --target "$RUST_TARGET" \
                --target-dir "$REPO/target/guest"); then
            die "building the guest agent failed (to test the image without it: --init /bin/busybox)"
        fi
        INIT_BIN=$REPO/target/guest/$RUST_TARGET/release/sge-vm-agent
        INIT_DESC=sge-vm-agent
    fi
    if head -c2 "$INIT_BIN" | grep -q '^#!'; then
        :   # a script: its interpreter must be in the image (busybox sh is)
    elif readelf -l "$INIT_BIN" 2>/dev/null | grep -q 'Requesting program interpreter'; then
        die "$INIT_BIN is dynamically linked; /init must be static"
    elif ! readelf -h "$INIT_BIN" >/dev/null 2>&1; then
        die "$INIT_BIN is neither an ELF executable nor a #! script"
    fi

    BUSYBOX=${BUSYBOX:-$(command -v busybox || true)}
    [[ -n $BUSYBOX && -x $BUSYBOX ]] || die "busybox not found (Debian: apt-get install busybox-static)"
    if readelf -l "$BUSYBOX" 2>/dev/null | grep -q 'Requesting program interpreter'; then
        die "$BUSYBOX is dynamically linked (Debian: apt-get install busybox-static)"
    fi

    # -----------------------------------------------------------------------------------------
    # initramfs.list from initramfs.list.in (gen_init_cpio spec), then initramfs.cpio.
    # -----------------------------------------------------------------------------------------
    [[ -r $LIST_IN ]] || die "missing $LIST_IN"
    for p in "$INIT_BIN" "$BUSYBOX" "$IMAGE_DIR"; do
        [[ $p != *[[:space:]]* ]] || die "path with whitespace cannot go into a gen_init_cpio spec: $p"
    done
    WORK=$(mktemp -d "$OUT/.initramfs.XXXXXX")
    trap 'rm -rf "$WORK"' EXIT
    APPLET_RE='^[][A-Za-z0-9._+-]+$'   # includes the applets "[" and "[["
    mapfile -t APPLETS < <("$BUSYBOX" --list | LC_ALL=C sort -u)
    [[ ${#APPLETS[@]} -gt 0 ]] || die "'$BUSYBOX --list' printed nothing"
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line == \#* || -z $line ]]; then
            printf '%s\n' "$line"   # comments and blank lines pass through as they are
            continue
        fi
        if [[ $line == "@BUSYBOX_APPLETS@" ]]; then
            for a in "${APPLETS[@]}"; do
                [[ $a != busybox ]] || continue   # --list names busybox itself; /bin/busybox is the binary
                [[ $a =~ $APPLET_RE ]] || die "odd applet name from busybox --list: '$a'"
                printf 'slink /bin/%s /bin/busybox 0777 0 0\n' "$a"
            done
            continue
        fi
        line=${line//@INIT@/$INIT_BIN}
        line=${line//@BUSYBOX@/$BUSYBOX}
        line=${line//@IMAGE_DIR@/$IMAGE_DIR}
        [[ $line != *@*@* ]] || die "unknown placeholder in $LIST_IN: $line"
        printf '%s\n' "$line"
    done <"$LIST_IN" >"$WORK/initramfs.list"
    # Fixed mtime for directories/nodes/links so that the same inputs give the same archive.
    "$KDIR/gen_init_cpio" -t "${SOURCE_DATE_EPOCH:-0}" "$WORK/initramfs.list" >"$WORK/initramfs.cpio" \
        || die "gen_init_cpio failed on $WORK/initramfs.list"
    if install_if_changed "$WORK/initramfs.cpio" "$OUT/initramfs.cpio"; then
        say "wrote $OUT/initramfs.cpio ($(grep -c '^slink /bin/.* /bin/busybox ' "$WORK/initramfs.list") busybox applet links, /init = $INIT_DESC)"
    else
        say "$OUT/initramfs.cpio up to date"
    fi
    cp "$WORK/initramfs.list" "$OUT/initramfs.list"
fi

# ---------------------------------------------------------------------------------------------
# manifest.json
# ---------------------------------------------------------------------------------------------
manifest_body() {
    printf '  "kernel_release": %s,\n' "$(json_str "$KERNEL_RELEASE")"
    printf '  "config_hash": %s,\n' "$(json_str "$CONFIG_HASH")"
    printf '  "linux_source": %s,\n' "$(json_str "$LINUX_PKG $LINUX_VER")"
    printf '  "patches": [%s],\n' "$(sep=; for p in "${PATCHES[@]}"; do printf '%s%s' "$sep" "$(json_str "$(basename "$p")")"; sep=', '; done)"
    printf '  "vmlinux": {"size": %s, "sha256": %s},\n' "$(stat -c %s "$OUT/vmlinux")" "$(json_str "$(sha "$OUT/vmlinux")")"
    if [[ $KERNEL_ONLY == 1 ]]; then
        printf '  "initramfs": null,\n'
    else
        printf '  "initramfs": {"size": %s, "sha256": %s, "init": %s},\n' \
            "$(stat -c %s "$OUT/initramfs.cpio")" "$(json_str "$(sha "$OUT/initramfs.cpio")")" "$(json_str "$INIT_DESC")"
    fi
    printf '  "kernel_cache": %s,\n' "$(json_str "$KDIR")"
}
# build_date is when the outputs last changed: a run that changes nothing keeps the old manifest.
BODY=$(manifest_body)
if [[ -f $OUT/manifest.json ]] && [[ $(grep -v '^[{}]$\|"build_date"' "$OUT/manifest.json") == "$BODY" ]]; then
    say "$OUT/manifest.json up to date"
else
    printf '{\n%s\n  "build_date": %s\n}\n' "$BODY" "$(json_str "$(date -u +%Y-%m-%dT%H:%M:%SZ)")" >"$OUT/manifest.json.tmp.$$"
    mv "$OUT/manifest.json.tmp.$$" "$OUT/manifest.json"
fi
if [[ $KERNEL_ONLY == 1 ]]; then
    say "done: $OUT/{vmlinux,manifest.json} (kernel $KERNEL_RELEASE)"
else
    say "done: $OUT/{vmlinux,initramfs.cpio,manifest.json} (kernel $KERNEL_RELEASE)"
fi
