#!/usr/bin/env bash
# Exits 1, with a message naming the caller, when the working tree's tracked files and .device
# together exceed the 64 MiB a device run carries (scripts/device_pack.sh, device_repack.sh).
#   usage (here, repository root): bash scripts/device_fits.sh CALLER [hint]
set -euo pipefail
cd "$(dirname "$0")/.."
total=$(( $(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) + $(du -sb .device | cut -f1) ))
if [ "$total" -gt $((64 * 1024 * 1024)) ]; then
    echo "$1: the tree and .device come to $total bytes, over the 64 MiB a run carries" >&2
    [ -n "${2:-}" ] && echo "  ($2)" >&2
    exit 1
fi
