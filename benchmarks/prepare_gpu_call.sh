#!/usr/bin/env bash
# Gather what a device call needs into ./.bench (git-ignored; pass it as the call's carry), from this checkout:
#
#   bash benchmarks/prepare_gpu_call.sh [STATIC_COMMIT [BEFORE_COMMIT]]
#
#   .bench/shared    a copy of ../shared (the released tokenizer, the demo images)
#   .bench/trained   the trained tiny checkpoint (built by the test suite's fixture if this machine has none)
#   .bench/static    STATIC_COMMIT's src (default 1f8c256: the static batches before the row scheduler)
#   .bench/before    BEFORE_COMMIT's src (default HEAD~1: the tree before the change being measured)
#
# Then `run` with command `bash benchmarks/gpu_call.sh ab` (or `serve`) and carry [".bench"].
set -eu
STATIC=${1:-1f8c256}
BEFORE=${2:-HEAD~1}
root=$(git rev-parse --show-toplevel)
cd "$root"
rm -rf .bench/shared .bench/trained .bench/static .bench/before
mkdir -p .bench/static .bench/before
cp -r ../shared .bench/shared
trained=$(cd tests && python -c "from trained import trained_checkpoint_dir; print(trained_checkpoint_dir())")
cp -r "$trained" .bench/trained
git archive "$STATIC" src | tar -x -C .bench/static
git archive "$BEFORE" src | tar -x -C .bench/before
git rev-parse --short "$STATIC" > .bench/static/COMMIT
git rev-parse --short "$BEFORE" > .bench/before/COMMIT
git log --oneline -1 > .bench/HEAD  # the device's copy of the tree has no .git
du -sh .bench
