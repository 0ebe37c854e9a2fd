#!/usr/bin/env bash
# The row scheduler end to end, this tree beside another, on one GPU machine in one call (~6 minutes):
#
#   OLD=path/to/old/src bash benchmarks/rows_ab.sh     # logs and JSON under $OUT (default ./rows-ab)
#
# For each tree: `kosmos2 batch` start-up over 4,000 JPEGs (startup.py --batch: fresh Triton cache, then warm), the
# GPU's timeline of the same batch from 5 s in to its end (profile_batch.py: busy share, idle gaps, GPU time per
# record and per kernel), then `kosmos2 serve` in process at 1 and 256 clients (serve.py --only ours). Full-size
# random weights, built once under /tmp. `$OUT/summary.txt` holds the figures to compare. SERVE=0 leaves serve out;
# SUMMARY_ONLY=1 only writes the summary of what $OUT holds (after a run that was cut short).
set -u
OUT=${OUT:-$PWD/rows-ab}
OLD=${OLD:?"OLD: the other tree's src folder"}
W=${WEIGHTS:-/tmp/kosmos2-full}
mkdir -p "$OUT"
if [ "${SUMMARY_ONLY:-0}" != 1 ]; then
unset PYTHONDONTWRITEBYTECODE
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/kosmos2-pycache}
(cd benchmarks && PYTHONPATH=$PWD/../src python -c \
  "from pathlib import Path; import common; common.full_size_checkpoint(Path('$W'))") > "$OUT/weights.log" 2>&1
for tree in new old; do
  if [ "$tree" = new ]; then src=$PWD/src; else src=$OLD; fi
  PYTHONPATH=$src timeout 150 python benchmarks/startup.py --weights "$W" --batch 4000 > "$OUT/startup-$tree.log" 2>&1
  rm -f "/tmp/rows-ab-$tree.jsonl"  # `kosmos2 batch` resumes an existing output: start each tree afresh
  PYTHONPATH=$src timeout 150 python benchmarks/profile_batch.py --after 5 --seconds 600 --json "$OUT/profile-$tree.json" \
    -- batch "$(dirname "$W")/kosmos2-e2e-4000" -o "/tmp/rows-ab-$tree.jsonl" --model "$W" --max-new-tokens 64 --json \
    --quiet > "$OUT/profile-$tree.log" 2>&1
  if [ "${SERVE:-1}" != 0 ]; then
    PYTHONPATH=$src timeout 120 python benchmarks/serve.py --weights "$W" --only ours --levels 1,256 \
      --json "$OUT/serve-$tree.json" > "$OUT/serve-$tree.log" 2>&1
  fi
done
fi
python - "$OUT" > "$OUT/summary.txt" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for tree in ("new", "old"):
    print(f"== {tree}")
    log = out / f"startup-{tree}.log"
    for line in (log.read_text().splitlines() if log.exists() else ["startup: no log"]):
        if "first record" in line or "no log" in line:
            print(line)
    try:
        p = json.loads((out / f"profile-{tree}.json").read_text())
        print({k: p.get(k) for k in ("busy_share", "records_in_window", "gpu_busy_ms_per_record", "gap_ms")})
        print("kernel us/record:", p.get("kernel_us_per_record"))
        print("longest gaps:", p.get("longest_gaps_us", [])[:5])
    except (OSError, ValueError) as err:
        print("profile:", err)
    try:
        for row in json.loads((out / f"serve-{tree}.json").read_text()).get("ours", []):
            print("serve:", row)
    except (OSError, ValueError) as err:
        print("serve:", err)
PY
cat "$OUT/summary.txt"
