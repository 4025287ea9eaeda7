#!/usr/bin/env bash
# All-reduce over the emulated multi-host lab (scripts/netlab.sh): W ranks in
# W network namespaces behind shaped links; Gloo (shared/bench/peers) and the
# ring (f32 and each wire encoding) alternate, ROUNDS times, over the same
# links. Prints one JSON line per run and, per world, one line per
# implementation with the median over rounds:
#   impl, world, rate_mbit, delay_ms, bytes, wire_bytes, median_s, bound_s,
#   efficiency (bound_s / median_s), speedup_vs_gloo
# where bound_s = 2(W-1)/W * wire_bytes / rate, the ring's lower bound.
# Appends everything to $RESULTS (default bench-results/netlab.jsonl).
#
#   scripts/bench-netlab.sh [WORLDS...]        # default 2 4 8
#   RATE=1000 DELAY=0.1 ELEMENTS=25000000 REPS=5 ROUNDS=2 ENCODINGS="f32 bf16"
#
# Needs root (network namespaces, tc). The lab comes down on exit, Ctrl-C
# included. Where the kernel has no netem, no delay is added (rate only);
# delay_ms then records 0, what the links really had.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset >/dev/null 2>&1 || true
build_release
worlds=${*:-2 4 8}
rate=${RATE:-1000}
delay=${DELAY:-0.1}
elements=${ELEMENTS:-25000000}
reps=${REPS:-5}
rounds=${ROUNDS:-2}
encodings=${ENCODINGS:-f32 bf16}
peers=${RINGTRAIN_PEERS:-../shared/bench/peers}
results=${RESULTS:-bench-results/netlab.jsonl}
mkdir -p "$(dirname "$results")"
trap 'scripts/netlab.sh down' EXIT
trap 'exit 130' INT TERM
port=29600

gloo() {
  local w=$1 r pids=() out
  out=$(mktemp)
  port=$((port + 1))
  for r in $(seq 0 $((w - 1))); do
    scripts/netlab.sh exec "$r" env GLOO_SOCKET_IFNAME=eth0 .venv/bin/python "$peers/gloo_allreduce.py" \
      --world "$w" --rank "$r" --port "$port" --master-addr "$(scripts/netlab.sh addr 0)" \
      --elements "$elements" --reps "$reps" >"$out.$r" 2>/dev/null &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  tail -n 1 "$out.0"
  rm -f "$out" "$out".*
}

for w in $worlds; do
  scripts/netlab.sh up "$w" "$rate" "$delay"
  case $(scripts/netlab.sh delay "$delay") in none*) applied=0 ;; *) applied=$delay ;; esac
  lines=()
  for _ in $(seq "$rounds"); do
    line=$(gloo "$w"); echo "$line"; lines+=("$line")
    for enc in $encodings; do
      line=$(target/release/ringtrain bench allreduce --world "$w" --elements "$elements" --reps "$reps" \
        --encoding "$enc" --netlab | tail -n 1)
      echo "$line"; lines+=("$line")
    done
  done
  python3 - "$w" "$rate" "$applied" "$results" "${lines[@]}" <<'PY'
import json, statistics, sys
w, rate, delay, results = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
rows = [json.loads(a) for a in sys.argv[5:]]
by = {}
for r in rows:
    name = r["impl"] if r["impl"] == "gloo" else f'{r["impl"]}-{r.get("encoding", "f32")}'
    by.setdefault(name, []).append(r)
gloo = statistics.median(r["median_s"] for r in by["gloo"])
out = []
for name, rs in by.items():
    median = statistics.median(r["median_s"] for r in rs)
    enc = rs[0].get("encoding", "f32")
    wire = rs[0]["bytes"] * (2 if enc in ("bf16", "f16") else 4) // 4
    bound = 2 * (w - 1) / w * wire / (rate * 1e6 / 8)
    out.append({"impl": name, "world": w, "rate_mbit": rate, "delay_ms": delay,
                "bytes": rs[0]["bytes"], "wire_bytes": wire, "rounds": len(rs),
                "median_s": median, "bound_s": bound, "efficiency": bound / median,
                "speedup_vs_gloo": gloo / median})
with open(results, "a") as f:
    for o in out:
        print(json.dumps(o))
        f.write(json.dumps(o) + "\n")
PY
  scripts/netlab.sh down
done
