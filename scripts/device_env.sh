# Sourced on the GPU machine from the repository root: unpacks .device/pack.tar.xz (binaries and
# libraries, see scripts/device_pack.sh) to /tmp/megamoe, puts them on the paths, and links
# ../shared where the tests look for it (their MEGAMOE_SHARED_DIR is /work/shared).
mkdir -p /tmp/megamoe /work
tar -xJf .device/pack.tar.xz -C /tmp/megamoe
[ -e /work/shared ] || ln -s "$PWD/.device/shared" /work/shared
# The tests that start the CLI look for it where it was built (MEGAMOE_CLI_PATH).
mkdir -p /work/main/build && ln -sf /tmp/megamoe/bin/megamoe /work/main/build/megamoe &&
    ln -sf /tmp/megamoe/bin/megamoe-serve-bench /work/main/build/megamoe-serve-bench
export LD_LIBRARY_PATH="/tmp/megamoe/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH="/tmp/megamoe/bin:$PATH"
