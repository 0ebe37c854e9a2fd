#!/usr/bin/env bash
# The batch mode on the example pictures: captions, then phrases to find, each into a resumable JSON-lines file.
#
#   examples/batch.sh [--model REPO|DIR] [other kosmos2 options...]
#
# Outputs go to examples/out/ (captions.jsonl, ground.jsonl and the drawn pictures).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/out"
mkdir -p "$out"

# Every picture under images/, one line per picture; pictures with boxes drawn into out/captions/.
kosmos2 batch "$here/images" -o "$out/captions.jsonl" --task caption --annotate-dir "$out/captions" "$@"

# Running it again is safe: the pictures already in the file are skipped (this one does nothing).
kosmos2 batch "$here/images" -o "$out/captions.jsonl" --task caption "$@"

# Several phrases per picture: one record each, with "found" saying which phrases the model placed.
kosmos2 batch "$here/images" -o "$out/ground.jsonl" --task ground -p "a red car" -p "the sun" -p "a kite" \
  --annotate-dir "$out/ground" "$@"

# Reading the results back (any JSON-lines tool works; jq: jq -r '.text' out/captions.jsonl).
python3 - "$out/captions.jsonl" "$out/ground.jsonl" <<'PY'
import json, sys

for path in sys.argv[1:]:
    for line in open(path, encoding="utf-8"):
        record = json.loads(line)
        if "error" in record:
            print(f"{record['image']}: ERROR {record['error']}")
        elif record["task"] == "ground":
            placed = {e["phrase"]: e["boxes_px"] for e in record["entities"]}
            found = ", ".join(f"{p} {placed.get(p, 'not found')}" for p in record["found"])
            print(f"{record['image']}: {found}")
        else:
            print(f"{record['image']}: {record['text']}")
PY
