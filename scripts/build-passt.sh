#!/usr/bin/env bash
# Builds passt (the jobs' network: issue 13) from Debian's source of a pinned version and
# installs it as /usr/local/libexec/sge_virtualizer/passt (and passt.avx2), where the shepherd
# looks first. Safe to run again: an installed build of the pinned version is kept.
#
# Why not Debian 12's own passt (0.0~git20230309): measured here, it corrupts TCP streams
# towards the guest. A job that sends 64 KiB to an echo server on the host's loopback got 1.5 to
# 2.8 MB back, and with the server closing at once the guest never saw its FIN. That happened
# with both backends (QEMU's -netdev socket and the embedded VMM's virtio-net), under host
# kernels 6.1 and 6.18. passt 2025-05-03 (Debian 13's) returns the same bytes and the FIN. Its
# Debian 13 binary needs glibc 2.38, so it is built here from the same source tarball Debian
# 13 ships, fetched from the Debian archive and checked against its pinned SHA-256. passt needs
# nothing but libc to build.
#
# Environment: SGE_VM_CACHE (cache dir, default /var/cache/sge_virtualizer), DEBIAN_MIRROR
# (default http://deb.debian.org/debian), PASST_PREFIX (default /usr/local/libexec/sge_virtualizer).
set -euo pipefail

VERSION=0.0~git20250503.587980c
TARBALL=passt_${VERSION}.orig.tar.xz
SHA256=69d5eb843f7d648c2cc60bfbca6ea7b5014c6b6f07cdee362c2a8cf490515a49
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${SGE_VM_CACHE:-/var/cache/sge_virtualizer}/passt
PREFIX=${PASST_PREFIX:-/usr/local/libexec/sge_virtualizer}

say() { echo "build-passt: $*" >&2; }
die() { echo "build-passt: error: $*" >&2; exit 1; }

if [ -x "$PREFIX/passt" ] && [ "$(cat "$PREFIX/passt.version" 2>/dev/null)" = "$VERSION" ]; then
    say "passt $VERSION present in $PREFIX"
    exit 0
fi
mkdir -p "$CACHE"
if ! echo "$SHA256  $CACHE/$TARBALL" | sha256sum -c --status 2>/dev/null; then
    say "fetching $TARBALL from $MIRROR"
    curl -fsSL -o "$CACHE/$TARBALL.tmp" "$MIRROR/pool/main/p/passt/$TARBALL" ||
        die "cannot fetch $MIRROR/pool/main/p/passt/$TARBALL"
    echo "$SHA256  $CACHE/$TARBALL.tmp" | sha256sum -c --status ||
        die "$TARBALL does not have the pinned SHA-256 $SHA256"
    mv "$CACHE/$TARBALL.tmp" "$CACHE/$TARBALL"
fi
work=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
tar -xJf "$CACHE/$TARBALL" -C "$work" --strip-components=1
say "building passt $VERSION"
make -C "$work" -j"$(nproc)" VERSION="$VERSION" passt passt.avx2 >"$work/build.log" 2>&1 ||
    { tail -n 20 "$work/build.log" >&2; die "passt did not build"; }
install -d -m 0755 "$PREFIX"
install -m 0755 "$work/passt" "$work/passt.avx2" "$PREFIX/"
echo "$VERSION" >"$PREFIX/passt.version"
say "installed $PREFIX/passt ($("$PREFIX/passt" --version 2>&1 | head -n 1))"
