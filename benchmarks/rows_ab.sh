#!/usr/bin/env bash
# The row scheduler end to end, this tree beside another, on one GPU machine in one call (~6 minutes):
#
#   OLD=path/to/old/src bash benchmarks/rows_ab.sh     # logs and JSON under $OUT (default ./rows-ab)
#
# For each tree: `kosmos2 batch` start-up over 4,000 JPEGs (startup.py --batch: fresh Triton cache, then warm), a
# 2 s GPU timeline 8 s into the same batch (profile_batch.py: busy share, idle gaps), then `kosmos2 serve` in
# process at 1 and 256 clients (serve.py --only ours). Full-size random weights, built once under /tmp.
set -u
OUT=${OUT:-$PWD/rows-ab}
OLD=${OLD:?"OLD: the other tree's src folder"}
W=${WEIGHTS:-/tmp/kosmos2-full}
mkdir -p "$OUT"
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/kosmos2-pycache}
(cd benchmarks && PYTHONPATH=$PWD/../src python -c \
  "from pathlib import Path; import common; common.full_size_checkpoint(Path('$W'))") > "$OUT/weights.log" 2>&1
for tree in new old; do
  if [ "$tree" = new ]; then src=$PWD/src; else src=$OLD; fi
  PYTHONPATH=$src timeout 150 python benchmarks/startup.py --weights "$W" --batch 4000 > "$OUT/startup-$tree.log" 2>&1
  rm -f "/tmp/rows-ab-$tree.jsonl"  # `kosmos2 batch` resumes an existing output: start each tree afresh
  PYTHONPATH=$src timeout 90 python benchmarks/profile_batch.py --after 8 --seconds 2 --json "$OUT/profile-$tree.json" \
    -- batch "$(dirname "$W")/kosmos2-e2e-4000" -o "/tmp/rows-ab-$tree.jsonl" --model "$W" --max-new-tokens 64 --json \
    --quiet > "$OUT/profile-$tree.log" 2>&1
  PYTHONPATH=$src timeout 120 python benchmarks/serve.py --weights "$W" --only ours --levels 1,256 \
    --json "$OUT/serve-$tree.json" > "$OUT/serve-$tree.log" 2>&1
done
grep -h "first record" "$OUT"/startup-*.log
