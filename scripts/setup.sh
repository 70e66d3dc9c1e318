#!/usr/bin/env bash
# Set up a Debian 12 machine to build, run and test sge_virtualizer. Safe to run again: what is
# installed or built already is kept (the guest kernel is cached in ${SGE_VM_CACHE:-/var/cache/sge_virtualizer}).
#
#   1. Debian packages: QEMU (the backend where KVM cannot run Linux), linux-source-6.1 and the
#      kernel build tools, busybox-static (the guest's /bin/sh and tools)
#   2. vhost-device-vsock (QEMU backend's vsock daemon) from crates.io, into /usr/local/bin
#   3. the sge_virtualizer binary (cargo build --release), and passt built from Debian 13's
#      source into /usr/local/libexec/sge_virtualizer (scripts/build-passt.sh)
#   4. the guest image: kernel (vmlinux), initramfs with the static guest agent -> build/guest/
#   5. the nested real-KVM test host (scripts/nested-kvm-host.sh build: Debian's kernel package,
#      fetched and unpacked into the cache, with kvm-amd; kmod installed for its modules)
#   (OS images for jobs are built on demand, cached: sge_virtualizer image build --debootstrap
#    bullseye bullseye; tests/tests/image_e2e.rs does that itself)
#
# Usage: scripts/setup.sh            (run as root, or with sudo)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { echo "setup: $*" >&2; }
die() { echo "setup: error: $*" >&2; exit 1; }

SUDO=
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "run as root (package installation needs it)"
    SUDO=sudo
fi

# debootstrap + e2fsprogs: `sge_virtualizer image build` (OS images jobs run in); erofs-utils:
# `image import --format erofs|erofs-lz4`.
# quota: setquota, for the test of job output beyond the job user's disk quota.
# passt: jobs' network (the job user's own sockets on the host, issue 13).
PACKAGES=(qemu-system-x86 linux-source-6.1 busybox-static build-essential flex bison bc
          libelf-dev libssl-dev xz-utils cpio patch binutils ca-certificates curl
          debootstrap e2fsprogs erofs-utils quota passt)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    say "Debian packages present"
fi

command -v cargo >/dev/null || die "cargo not found: install Rust (rustup, stable >= 1.85) first"

VHOST_VERSION=0.3.0
if ! /usr/local/bin/vhost-device-vsock --version 2>/dev/null | grep -q "$VHOST_VERSION"; then
    say "installing vhost-device-vsock $VHOST_VERSION from crates.io"
    $SUDO env "PATH=$PATH" cargo install --quiet --locked --root /usr/local \
        vhost-device-vsock --version "$VHOST_VERSION"
else
    say "vhost-device-vsock $VHOST_VERSION present"
fi

say "building sge_virtualizer (release)"
(cd "$REPO" && cargo build --quiet --release -p shepherd)

say "building passt for the jobs' network (Debian 12's has a TCP bug: see the script)"
$SUDO "$REPO/scripts/build-passt.sh"
say "building the guest image (kernel is cached after the first build)"
"$REPO/scripts/build-guest-image.sh" --out "$REPO/build/guest"
say "preparing the nested real-KVM test host (Debian's kernel with kvm-amd, run under QEMU TCG)"
"$REPO/scripts/nested-kvm-host.sh" build
say "ready: $REPO/target/release/sge_virtualizer, guest image in $REPO/build/guest"
