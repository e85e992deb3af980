#!/usr/bin/env bash
# Packs what a GPU run needs into .device/ (git-ignored; name it in the device tool's `carry`):
# the binaries of a build folder, the shared libraries they load that a CUDA image may lack, and
# the golden cases the GPU tests read. On the GPU machine, scripts/device_env.sh sets it up.
#   usage: scripts/device_pack.sh [build-dir] [golden case ...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(tiny-flash-nvfp4 tiny-flash-mxfp4)
rm -rf .device
stage=$(mktemp -d)
mkdir -p "$stage"/bin "$stage"/lib .device/shared/golden
cp "$build"/tests/megamoe_tests "$build"/megamoe "$build"/megamoe-forward-bench "$build"/megamoe-gemm-bench "$build"/megamoe-linear-bench \
    "$build"/megamoe-serve-bench "$stage"/bin/
strip --strip-debug "$stage"/bin/* 2>/dev/null || true
# Libraries outside glibc/libstdc++ (Debian 12 builds; the CUDA image may not have them).
ldd "$stage"/bin/megamoe_tests "$stage"/bin/megamoe "$stage"/bin/megamoe-forward-bench | awk '/=>/ {print $3}' | sort -u |
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so' |
    grep -v -E '/(libnccl|libcublas|libcublasLt)\.so' | xargs -r -I{} cp -L {} "$stage"/lib/
# libnccl (218 MB) does not travel: scripts/device_env.sh finds the GPU machine's own (PyTorch's).
# Nor does cuBLAS (libcublasLt alone is 540 MB): the GPU machine's CUDA 13 image has it.
# Compressed: the binaries' cubins shrink ~4x, which keeps a run under the 64 MiB that travels.
tar -cf - -C "$stage" bin lib | xz -6 -T2 > .device/pack.tar.xz
rm -rf "$stage"
cp -r ../shared/golden/tokenizer .device/shared/golden/   # the server tests' tokenizer fixture
for c in "${cases[@]}"; do
    mkdir -p .device/shared/golden/"$c"
    cp -r ../shared/golden/"$c"/model ../shared/golden/"$c"/golden.* .device/shared/golden/"$c"/
    cp ../shared/golden/"$c"/mtp.* .device/shared/golden/"$c"/ 2>/dev/null || true
done
du -sh .device .device/*
