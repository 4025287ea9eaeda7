#!/usr/bin/env bash
# Training over the emulated multi-host lab: PyTorch DDP (shared/bench/peers,
# one rank per namespace) and ringtrain (worker R in namespace rtlabR)

set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset
build_release
world=${1:-4}
steps=${2:-40}
model=${3:-cnn}
batch=${4:-64}
rate=${RATE:-1000}
delay=${DELAY:-0.1}
rounds=${ROUNDS:-2}
variants=${VARIANTS:-f32-after-backward:ring.overlap=false f32:ring.overlap=true bf16:ring.compression=bf16 powersgd-4:ring.compression=powersgd:4}
peers=${RINGTRAIN_PEERS:-../shared/bench/peers}
results=${RESULTS:-bench-results/train.jsonl}
mkdir -p "$(dirname "$results")"
trap 'scripts/netlab.sh down' EXIT
trap 'exit 130' INT TERM
scripts/netlab.sh up "$world" "$rate" "$delay"
port=29700

ddp() {
  local r pids=() out
  out=$(mktemp)
  port=$((port + 1))
  for r in $(seq 0 $((world - 1))); do
    scripts/netlab.sh exec "$r" env GLOO_SOCKET_IFNAME=eth0 .venv/bin/python "$peers/ddp_train.py" \
      --world "$world" --rank "$r" --port "$port" --master-addr "$(scripts/netlab.sh addr 0)" \
      --model "$model" --batch "$batch" --epochs 0 --steps "$steps" >"$out.$r" 2>/dev/null &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  tail -n 1 "$out.0"
  rm -f "$out" "$out".*
}

lines=()
for _ in $(seq "$rounds"); do
  line=$(ddp); echo "$line"; lines+=("$line")
  for variant in $variants; do
    sets=()
    IFS=, read -ra kvs <<<"${variant#*:}"
    for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
    line=$(target/release/ringtrain bench train --netlab --world "$world" --model "$model" --batch "$batch" \
      --steps "$steps" "${sets[@]}" | tail -n 1)
    line=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["variant"]=sys.argv[2]; print(json.dumps(r))' "$line" "${variant%%:*}")
    echo "$line"; lines+=("$line")
  done
done
applied=$(case $(scripts/netlab.sh delay "$delay") in none*) echo 0 ;; *) echo "$delay" ;; esac)
python3 - "$results" "$rate" "$applied" "${lines[@]}" <<'PY'
import json, statistics, sys
results, rate, delay = sys.argv[1], float(sys.argv[2]), sys.argv[3]
rows = [json.loads(a) for a in sys.argv[4:]]
ddp = statistics.median(r["samples_per_s"] for r in rows if r["impl"] != "ringtrain")
by = {}
for r in rows:
    if r["impl"] == "ringtrain":
        by.setdefault(r["variant"], []).append(r["samples_per_s"])
with open(results, "a") as f:
    for enc, v in by.items():
        ours = statistics.median(v)
        row = {"kind": f"samples/s, lab {rate:.0f} Mbit/s {delay} ms, ring {enc}", "world": rows[0]["world"],
               "model": rows[0]["model"], "ddp": ddp, "ours": ours, "ratio": ours / ddp}
        print(f"world={row['world']} model={row['model']} lab {rate:.0f} Mbit/s, ring {enc}: "
              f"ddp median {ddp:.1f} samples/s, ringtrain median {ours:.1f} samples/s, ringtrain/ddp = {ours / ddp:.2f}x")
        f.write(json.dumps(row) + "\n")
PY
