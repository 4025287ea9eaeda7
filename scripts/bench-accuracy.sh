#!/usr/bin/env bash
# What each gradient compressor costs in accuracy: the CNN for 2 epochs at
# W=4 (batch 64 per rank) under PyTorch DDP and under ringtrain with each
# ring.compression in COMPRESSIONS, alternated, for each seed in SEEDS;
# one JSON line per run, appended to $RESULTS (bench-results/accuracy.jsonl),
# then the mean test accuracy of each setting over the seeds. On loopback:
# the wire changes speed, not results (samples/s here are not comparable;
# see bench-netlab-train.sh for speed).
#
#   scripts/bench-accuracy.sh          # SEEDS="1 2" COMPRESSIONS="none bf16 powersgd:4"
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset
build_release
peers=${RINGTRAIN_PEERS:-../shared/bench/peers}
results=${RESULTS:-bench-results/accuracy.jsonl}
mkdir -p "$(dirname "$results")"
lines=()
# 2 epochs of 60000 samples at a global batch of 256.
steps=$((2 * 60000 / 256))
for seed in ${SEEDS:-1 2}; do
  line=$(.venv/bin/python "$peers/ddp_train.py" --world 4 --model cnn --batch 64 --epochs 2 --seed "$seed" 2>/dev/null | tail -n 1)
  line=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(json.dumps({"seed": int(sys.argv[2]), "setting": "ddp", "test_accuracy": r["test_accuracy"], "steps": r["steps"]}))' "$line" "$seed")
  echo "$line"; lines+=("$line")
  for c in ${COMPRESSIONS:-none bf16 powersgd:4}; do
    line=$(target/release/ringtrain bench train --world 4 --model cnn --batch 64 --steps "$steps" \
      --set "ring.compression=$c" --set "seed=$seed" | tail -n 1)
    line=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(json.dumps({"seed": int(sys.argv[2]), "setting": sys.argv[3], "test_accuracy": r["test_accuracy"], "steps": r["steps"]}))' "$line" "$seed" "$c")
    echo "$line"; lines+=("$line")
  done
done
printf '%s\n' "${lines[@]}" >>"$results"
python3 - "${lines[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
by = {}
for r in rows:
    by.setdefault(r["setting"], []).append(r["test_accuracy"])
ddp = statistics.mean(by["ddp"])
for s, v in by.items():
    print(f"{s}: mean test accuracy {statistics.mean(v):.4f} over {len(v)} seeds "
          f"({(statistics.mean(v) - ddp) * 100:+.2f} pp against DDP)")
PY
