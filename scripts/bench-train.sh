#!/usr/bin/env bash
# Side-by-side training throughput: PyTorch DDP over Gloo (the peer,
# shared/bench/peers/ddp_train.py) and ringtrain on the same workload, in one
# run on this machine, then the ratio ringtrain/DDP of samples per second.
# Usage: scripts/bench-train.sh [WORLD] [STEPS] [MODEL] [BATCH]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset
build_release
world=${1:-4}
steps=${2:-60}
model=${3:-cnn}
batch=${4:-64}
peers=${RINGTRAIN_PEERS:-../shared/bench/peers}
ddp=$(.venv/bin/python "$peers/ddp_train.py" --world "$world" --model "$model" --batch "$batch" --epochs 0 --steps "$steps" 2>/dev/null | tail -n 1)
ours=$(target/release/ringtrain bench train --world "$world" --model "$model" --batch "$batch" --steps "$steps" | tail -n 1)
echo "$ddp"
echo "$ours"
python3 - "$ddp" "$ours" <<'PY'
import json, sys
d, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"world={d['world']} model={d['model']} batch={d['batch_per_rank']}: ringtrain/ddp samples/s = {o['samples_per_s'] / d['samples_per_s']:.2f}x")
PY
