#!/usr/bin/env bash
# Adds other builds' benchmarks to a pack made by scripts/device_pack.sh, for same-call comparisons
# (scripts/device_variants.sh): each NAME=DIR puts DIR/megamoe-gemm-bench and
# DIR/megamoe-forward-bench into the pack's bin/ as megamoe-gemm-bench-NAME and
# megamoe-forward-bench-NAME, and drops bin/megamoe, megamoe-linear-bench and megamoe-serve-bench (the
# tests that start the CLI or the serving bench then fail: run them from a plain pack)
# so that the pack stays under the 64 MiB a run carries.
#   usage (here, after scripts/device_pack.sh): bash scripts/device_repack.sh old=/tmp/old-build [NAME=DIR ...]
set -euo pipefail
cd "$(dirname "$0")/.."
stage=$(mktemp -d)
tar -xJf .device/pack.tar.xz -C "$stage"
for nv in "$@"; do
    name=${nv%%=*} dir=${nv#*=}
    for b in megamoe-forward-bench megamoe-gemm-bench; do
        strip --strip-all -o "$stage/bin/$b-$name" "$dir/$b"
    done
done
rm -f "$stage"/bin/megamoe "$stage"/bin/megamoe-linear-bench "$stage"/bin/megamoe-serve-bench
tar -cf - -C "$stage" bin lib | xz -9 -T2 > .device/pack.tar.xz   # (device_pack.sh: why -9)
rm -rf "$stage"
du -sh .device/*
bash scripts/device_fits.sh device_repack "name fewer builds, or delete .device/golden.tar.xz"
