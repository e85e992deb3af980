#!/usr/bin/env bash
# Packs what a GPU run needs into .device/ (git-ignored; name it in the device tool's `carry`):
# the binaries of a build folder, the shared libraries they load that a CUDA image may lack, and
# the golden cases the GPU tests read. On the GPU machine, scripts/device_env.sh sets it up.
#   usage: scripts/device_pack.sh [--tests] [build-dir] [golden case ...]
#   --tests: only what the GPU tests run (megamoe_tests, the CLI and megamoe-serve-bench, which
#   tests start), not the three benchmarks, for room beside the golden cases (tiny-flash-nvfp4,
#   tiny-flash-mxfp4 and official-tiny-mxfp4: 41 MB of them, compressed).
set -euo pipefail
cd "$(dirname "$0")/.."
tests_only=0
if [ "${1:-}" = --tests ]; then
    tests_only=1
    shift
fi
build=${1:-build}
shift || true
cases=("$@")
[ ${#cases[@]} -eq 0 ] && cases=(tiny-flash-nvfp4 tiny-flash-mxfp4)
rm -rf .device
stage=$(mktemp -d)
mkdir -p "$stage"/bin "$stage"/lib "$stage"/golden .device
bins=("$build"/tests/megamoe_tests "$build"/megamoe "$build"/megamoe-serve-bench)
[ "$tests_only" = 1 ] ||
    bins+=("$build"/megamoe-forward-bench "$build"/megamoe-gemm-bench "$build"/megamoe-linear-bench)
cp "${bins[@]}" "$stage"/bin/
strip --strip-all "$stage"/bin/* 2>/dev/null || true
# Libraries outside glibc/libstdc++ (Debian 12 builds; the CUDA image may not have them).
ldd "$stage"/bin/* | awk '/=>/ {print $3}' | sort -u |   # (the forward bench's CUPTI among them)
    grep -v -E '/(libc|libm|libdl|libpthread|librt|libgcc_s|libstdc\+\+)\.so' |
    grep -v -E '/(libnccl|libcublas|libcublasLt)\.so' | xargs -r -I{} cp -L {} "$stage"/lib/
# libnccl (218 MB) does not travel: scripts/device_env.sh finds the GPU machine's own (PyTorch's).
# Nor does cuBLAS (libcublasLt alone is 540 MB): the GPU machine's CUDA 13 image has it.
# Compressed: the binaries' cubins shrink ~4x, which keeps a run under the 64 MiB that travels.
# xz -9: its 64 MiB dictionary spans whole binaries, which share most of their code (the CLI and
# the tests' binary: --tests' pack 15.6 MB at -6 with --strip-debug, 10.0 at -9 with --strip-all,
# of which --strip-all alone is ~3%), so the three golden cases travel beside the benchmarks.
tar -cf - -C "$stage" bin lib | xz -9 -T2 > .device/pack.tar.xz
# The golden cases, compressed too (~17% smaller: what lets all three travel beside --tests'
# binaries); scripts/device_env.sh unpacks them into .device/shared/golden on the GPU machine.
cp -r ../shared/golden/tokenizer "$stage"/golden/   # the server tests' tokenizer fixture
for c in "${cases[@]}"; do
    mkdir -p "$stage"/golden/"$c"
    cp -r ../shared/golden/"$c"/model ../shared/golden/"$c"/golden.* "$stage"/golden/"$c"/
    cp ../shared/golden/"$c"/mtp.* "$stage"/golden/"$c"/ 2>/dev/null || true
done
tar -cf - -C "$stage" golden | xz -6 -T2 > .device/golden.tar.xz
rm -rf "$stage"
du -sh .device/*
du -sh .device
# What travels is the working tree plus .device; the device tool refuses more than 64 MiB.
bash scripts/device_fits.sh device_pack "pack fewer golden cases, or --tests"
