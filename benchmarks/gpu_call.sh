#!/usr/bin/env bash
# One device call's measurements (each part fits the 10-minute limit); .bench from prepare_gpu_call.sh:
#
#   bash benchmarks/gpu_call.sh ab      # ~6 min: rows_ab.sh without serve, this tree beside .bench/static
#                                       # (kosmos2 batch start-up, steady rate, whole-run GPU time per record),
#                                       # then this tree's start-up with KOSMOS2_FIRST_BATCH=0
#   bash benchmarks/gpu_call.sh serve   # ~6 min: the CUDA tests, then serve.py at 1/8/64/256 clients for this
#                                       # tree and at 256 for .bench/before, then serve under host_timing
#
# Everything lands in $OUT (at most 8 files come back from a device call: the logs are gathered into a few).
set -u
OUT=${OUT:-$PWD/gpu-call}
mkdir -p "$OUT"
export KOSMOS2_SHARED=$PWD/.bench/shared KOSMOS2_TRAINED_DIR=$PWD/.bench/trained
export PYTHONPYCACHEPREFIX=/tmp/kosmos2-pycache
W=/tmp/kosmos2-full
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/device.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt" 2>&1
cat .bench/HEAD >> "$OUT/device.txt" 2>/dev/null  # this tree, when prepared
echo "static $(cat .bench/static/COMMIT 2>/dev/null), before $(cat .bench/before/COMMIT 2>/dev/null)" >> "$OUT/device.txt"
case "${1:-}" in
  ab)
    OUT=/tmp/ab OLD=$PWD/.bench/static/src SERVE=0 timeout 460 bash benchmarks/rows_ab.sh > /tmp/ab.log 2>&1
    # this tree without its small first batch: what that batch alone changes
    KOSMOS2_FIRST_BATCH=0 PYTHONPATH=$PWD/src timeout 110 python benchmarks/startup.py --weights "$W" --batch 4000 \
      > /tmp/ab/startup-first0.log 2>&1
    OUT=/tmp/ab OLD=- SUMMARY_ONLY=1 bash benchmarks/rows_ab.sh > /dev/null 2>&1  # also after a run cut short
    cp /tmp/ab/summary.txt "$OUT/" 2>/dev/null
    for f in profile-new.json profile-old.json; do cp "/tmp/ab/$f" "$OUT/" 2>/dev/null; done
    cat /tmp/ab/startup-*.log > "$OUT/startup.txt" 2>/dev/null
    tail -40 /tmp/ab.log >> "$OUT/startup.txt"
    ;;
  serve)
    PYTHONPATH=$PWD/src timeout 150 python -m pytest -q -p no:cacheprovider tests/test_fast_path.py \
      tests/test_no_sync.py tests/test_rows.py tests/test_head_widths.py tests/test_staging.py > "$OUT/tests.txt" 2>&1
    (cd benchmarks && PYTHONPATH=$PWD/../src python -c \
      "from pathlib import Path; import common; common.full_size_checkpoint(Path('$W'))") > "$OUT/serve.txt" 2>&1
    PYTHONPATH=$PWD/src timeout 150 python benchmarks/serve.py --weights "$W" --only ours \
      --json "$OUT/serve-new.json" >> "$OUT/serve.txt" 2>&1
    PYTHONPATH=$PWD/.bench/before/src timeout 90 python benchmarks/serve.py --weights "$W" --only ours \
      --levels 256 --json "$OUT/serve-before.json" >> "$OUT/serve.txt" 2>&1
    PYTHONPATH=$PWD/src timeout 80 python benchmarks/host_timing.py -- serve.py --weights "$W" --only ours \
      --levels 256 > "$OUT/host-timing.txt" 2>&1
    ;;
  *)
    echo "usage: bash benchmarks/gpu_call.sh ab|serve" >&2
    exit 2
    ;;
esac
ls -la "$OUT"
