#!/usr/bin/env bash
# mutate.sh — applies single-line mutants to the CPU code, one at a time, and reports which tests
# catch each (fail) and which mutants survive.
#
#   scripts/mutate.sh WORK_DIR [MUTANTS_FILE [GTEST_FILTER]]
#
# Works on a private copy: the committed tree (git archive HEAD) is exported to WORK_DIR/src-tree,
# built CPU-only in WORK_DIR/build, and each mutant is applied there, built, tested and undone;
# the working tree is never touched. The copy has no ../shared next to it, so the golden data is
# absent (configured with -DMEGAMOE_ALLOW_MISSING_GOLDEN=ON, its tests skip): a mutant counts as
# caught only by tests that need no golden data. To test with the goldens, link the shared folder
# into WORK_DIR first (ln -s "$PWD/../shared" WORK_DIR/shared). MUTANTS_FILE defaults to scripts/mutants.txt (FILE<TAB>TEXT<TAB>REPLACEMENT).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:?usage: scripts/mutate.sh WORK_DIR [MUTANTS_FILE [GTEST_FILTER]]}
mutants=$(realpath "${2:-scripts/mutants.txt}")
filter=${3:-'-Cuda*:Gpu*:GpuServe*:Server*:ServerLimits*:ServerAuth*:ServerBind*:Cli*:OpenAIClient*:ServeBench*'}
mkdir -p "$work"
work=$(realpath "$work")
tree=$work/src-tree
rm -rf "$tree" && mkdir -p "$tree"
git archive HEAD | tar -x -C "$tree"
cmake -S "$tree" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DMEGAMOE_CUDA=OFF -DMEGAMOE_ALLOW_MISSING_GOLDEN=ON >/dev/null
cmake --build "$work/build" -j"$(nproc)" --target megamoe_tests >/dev/null
bin=$work/build/tests/megamoe_tests
"$bin" --gtest_filter="$filter" --gtest_brief=1 >/dev/null || { echo "mutate: the unmutated suite fails" >&2; exit 1; }

n=0 caught=0
printf '%-4s %-8s %s\n' '#' result 'mutant / failing tests'
while IFS=$'\t' read -r file text repl; do
    [[ -z "$file" || "$file" == \#* ]] && continue
    n=$((n + 1))
    f=$tree/$file
    cp "$f" "$f.orig"
    if ! python3 - "$f" "$text" "$repl" <<'PY'
import sys
path, text, repl = sys.argv[1:4]
s = open(path).read()
if text not in s:
    sys.exit(1)
open(path, "w").write(s.replace(text, repl, 1))
PY
    then
        printf '%-4s %-8s %s: text not found\n' "$n" SKIPPED "$file"
        mv "$f.orig" "$f"
        continue
    fi
    result=
    if ! cmake --build "$work/build" -j"$(nproc)" --target megamoe_tests >"$work/build.log" 2>&1; then
        result="NOBUILD"
    else
        failing=$("$bin" --gtest_filter="$filter" --gtest_brief=1 2>/dev/null | grep -o '^\[  FAILED  \] [A-Za-z0-9_/.]*' |
                  sed 's/^\[  FAILED  \] //' | sort -u | tr '\n' ' ' || true)
        if [ -n "$failing" ]; then result=caught; caught=$((caught + 1)); else result=SURVIVED; fi
    fi
    printf '%-4s %-8s %s: %s -> %s\n' "$n" "$result" "$file" "$text" "$repl"
    [ "$result" = caught ] && printf '              caught by: %s\n' "$failing"
    mv "$f.orig" "$f"
    touch "$f"
done <"$mutants"
cmake --build "$work/build" -j"$(nproc)" --target megamoe_tests >/dev/null
printf 'mutate: %d of %d mutants caught\n' "$caught" "$n"
