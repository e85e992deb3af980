# Sourced on the GPU machine from the repository root: unpacks .device/pack.tar.xz (binaries and
# libraries, see scripts/device_pack.sh) to /tmp/megamoe and .device/golden.tar.xz (the golden
# cases) to .device/shared, puts the binaries on the paths, and links .device/shared where the
# tests look for it (their MEGAMOE_SHARED_DIR is /work/shared).
mkdir -p /tmp/megamoe /work
tar -xJf .device/pack.tar.xz -C /tmp/megamoe
# The golden cases (scripts/device_pack.sh compresses them) → .device/shared/golden.
mkdir -p .device/shared
[ -f .device/golden.tar.xz ] && [ ! -d .device/shared/golden ] && tar -xJf .device/golden.tar.xz -C .device/shared
[ -e /work/shared ] || ln -s "$PWD/.device/shared" /work/shared
# The tests that start the CLI look for it where it was built (MEGAMOE_CLI_PATH).
mkdir -p /work/main/build && ln -sf /tmp/megamoe/bin/megamoe /work/main/build/megamoe &&
    ln -sf /tmp/megamoe/bin/megamoe-serve-bench /work/main/build/megamoe-serve-bench
export LD_LIBRARY_PATH="/tmp/megamoe/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/tmp/megamoe/bin:$PATH"
# NCCL (the multi-GPU tests link it): the machine's own, or the copy PyTorch's wheels bring.
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2; then
    nccl_dir=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
    [ -z "$nccl_dir" ] && nccl_dir=$(dirname "$(find / -name 'libnccl.so.2*' -not -path '*/proc/*' 2>/dev/null | head -1)" 2>/dev/null || true)
    [ -n "$nccl_dir" ] && export LD_LIBRARY_PATH="$nccl_dir:$LD_LIBRARY_PATH"
fi
