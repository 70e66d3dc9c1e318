#!/usr/bin/env bash
# The README's first command: set up, then run a job in a microVM.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$REPO/scripts/setup.sh"
echo "--- running a job in a microVM: sge_virtualizer run --timings -- /bin/sh -c '...'" >&2
exec "$REPO/target/release/sge_virtualizer" run --timings -n -- /bin/sh -c \
    'echo "hello from a microVM: kernel $(uname -r), pid $$, $(nproc) vCPU"; head -1 /proc/meminfo'
