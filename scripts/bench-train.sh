#!/usr/bin/env bash
# Side-by-side training throughput: PyTorch DDP over Gloo (the peer,
# shared/bench/peers/ddp_train.py) and ringtrain on the same workload, in one
# run on this machine, then the ratio ringtrain/DDP of samples per second,
# and the time each whole command takes for the same fixed job (start-up
# included).
# Each round also runs one rank alone (ddp_train.py --world 1 --threads 1):
# twice its samples/s is the compute ceiling of this 2-core machine, and the
# script prints each side's share of it.
# Both sides are timed by one clock: wall time from the first timed step's
# start on the earliest rank to the last step's end on the latest.
# Usage: scripts/bench-train.sh [WORLD] [STEPS] [MODEL] [BATCH]   (ROUNDS, default 3)
# RINGTRAIN_SET="ring.overlap=false,ring.compression=bf16" passes settings.
# With COMPARE=insecure it measures the cost of security instead: ringtrain
# with mutual TLS (the default) against ringtrain --insecure, alternated, and
# prints the ratio mtls/insecure of the medians.
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
rounds=${ROUNDS:-3}
lines=()
if [ "${COMPARE:-ddp}" = insecure ]; then
  for r in $(seq "$rounds"); do
    for mode in "" --insecure; do
      line=$(target/release/ringtrain bench train --world "$world" --model "$model" --batch "$batch" --steps "$steps" $mode | tail -n 1)
      echo "$line"
      lines+=("$line")
    done
  done
  exec python3 - "${lines[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
tls = [r["samples_per_s"] for r in rows if r["security"] == "mtls"]
plain = [r["samples_per_s"] for r in rows if r["security"] == "insecure"]
t, p = statistics.median(tls), statistics.median(plain)
r0 = rows[0]
print(f"world={r0['world']} model={r0['model']} batch={r0['batch_per_rank']} rounds={len(tls)}: "
      f"mtls median {t:.1f} samples/s, insecure median {p:.1f} samples/s, mtls/insecure = {t / p:.3f}x")
PY
fi
# Alternate the two, ROUNDS times: one run on a noisy machine says little, so
# the ratio printed is of the median samples/s over the rounds.
# Each side's whole command is timed too (start-up, data loading, every step,
# teardown): the time to finish the same fixed job end to end.
now() { date +%s.%N; }
sets=()
IFS=, read -ra kvs <<<"${RINGTRAIN_SET:-}"
for kv in "${kvs[@]}"; do sets+=(--set "$kv"); done
for r in $(seq "$rounds"); do
  one=$(.venv/bin/python "$peers/ddp_train.py" --world 1 --threads 1 --model "$model" --batch "$batch" --epochs 0 --steps "$steps" 2>/dev/null | tail -n 1)
  one=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["impl"]="one-rank"; print(json.dumps(r))' "$one")
  echo "$one"
  lines+=("$one")
  t0=$(now)
  ddp=$(.venv/bin/python "$peers/ddp_train.py" --world "$world" --model "$model" --batch "$batch" --epochs 0 --steps "$steps" 2>/dev/null | tail -n 1)
  t1=$(now)
  ours=$(target/release/ringtrain bench train --world "$world" --model "$model" --batch "$batch" --steps "$steps" "${sets[@]}" | tail -n 1)
  t2=$(now)
  with_job_s() { python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["job_s"]=float(sys.argv[3])-float(sys.argv[2]); print(json.dumps(r))' "$@"; }
  ddp=$(with_job_s "$ddp" "$t0" "$t1")
  ours=$(with_job_s "$ours" "$t1" "$t2")
  echo "$ddp"
  echo "$ours"
  lines+=("$ddp" "$ours")
done
python3 - "${lines[@]}" <<'PY'
import json, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
ceiling = 2 * statistics.median(r["samples_per_s"] for r in rows if r["impl"] == "one-rank")
rows = [r for r in rows if r["impl"] != "one-rank"]
dj = statistics.median(r["job_s"] for r in rows if r["impl"] != "ringtrain")
oj = statistics.median(r["job_s"] for r in rows if r["impl"] == "ringtrain")
print(f"fixed job end to end ({rows[0]['steps']} steps, start-up included): ddp median {dj:.1f} s, "
      f"ringtrain median {oj:.1f} s, ddp/ringtrain = {dj / oj:.2f}x")
ddp = [r["samples_per_s"] for r in rows if r["impl"] != "ringtrain"]
ours = [r["samples_per_s"] for r in rows if r["impl"] == "ringtrain"]
d, o = statistics.median(ddp), statistics.median(ours)
r0 = rows[0]
print(f"compute ceiling (2 x one rank alone, 1 thread): {ceiling:.1f} samples/s; "
      f"ddp {d / ceiling:.0%} of it, ringtrain {o / ceiling:.0%}")
print(f"world={r0['world']} model={r0['model']} batch={r0['batch_per_rank']} rounds={len(ddp)}: "
      f"ddp median {d:.1f} samples/s, ringtrain median {o:.1f} samples/s, ringtrain/ddp = {o / d:.2f}x")
PY
