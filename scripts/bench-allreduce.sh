#!/usr/bin/env bash
# Side-by-side all-reduce benchmark: Gloo (the peer, shared/bench/peers) and
# ringtrain, alternating in one run on this machine, then the ratio
# gloo_median / ringtrain_median (>1 means ringtrain is faster).
# Usage: scripts/bench-allreduce.sh [ELEMENTS] [REPS] [WORLDS...]
#   extra ringtrain flags via RINGTRAIN_BENCH_FLAGS, e.g. "--transport grpc";
#   ROUNDS (default 3) alternating rounds per world size, since one round on a
#   noisy machine says little: the ratio printed is of the medians over rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
build_release
elements=${1:-25000000}
reps=${2:-10}
shift $(( $# > 2 ? 2 : $# )) || true
worlds=${*:-2 4}
peers=${RINGTRAIN_PEERS:-../shared/bench/peers}
rounds=${ROUNDS:-3}
for w in $worlds; do
  lines=()
  for r in $(seq "$rounds"); do
    gloo=$(.venv/bin/python "$peers/gloo_allreduce.py" --world "$w" --elements "$elements" --reps "$reps" 2>/dev/null | tail -n 1)
    ours=$(target/release/ringtrain bench allreduce --world "$w" --elements "$elements" --reps "$reps" ${RINGTRAIN_BENCH_FLAGS:-} | tail -n 1)
    echo "$gloo"
    echo "$ours"
    lines+=("$gloo" "$ours")
  done
  python3 - "${lines[@]}" <<'PY'
import json, os, statistics, sys
rows = [json.loads(a) for a in sys.argv[1:]]
gloo = [r["median_s"] for r in rows if r["impl"] == "gloo"]
ours = [r["median_s"] for r in rows if r["impl"] != "gloo"]
impl = next(r["impl"] for r in rows if r["impl"] != "gloo")
g, o = statistics.median(gloo), statistics.median(ours)
print(f"world={rows[0]['world']} elements={rows[0]['elements']} rounds={len(gloo)}: "
      f"gloo median {g*1000:.1f} ms, {impl} median {o*1000:.1f} ms, speedup = {g / o:.2f}x")
if os.environ.get("RESULTS"):
    with open(os.environ["RESULTS"], "a") as f:
        f.write(json.dumps({"impl": impl, "world": rows[0]["world"], "bytes": rows[0]["bytes"],
                            "rounds": len(gloo), "gloo_median_s": g, "median_s": o,
                            "speedup_vs_gloo": g / o}) + "\n")
PY
done
