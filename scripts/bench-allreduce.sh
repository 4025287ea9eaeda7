#!/usr/bin/env bash
# Side-by-side all-reduce benchmark: Gloo (the peer, shared/bench/peers) and
# ringtrain, alternating in one run on this machine, then the ratio
# gloo_median / ringtrain_median (>1 means ringtrain is faster).
# Usage: scripts/bench-allreduce.sh [ELEMENTS] [REPS] [WORLDS...]
#   extra ringtrain flags via RINGTRAIN_BENCH_FLAGS, e.g. "--transport grpc".
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
for w in $worlds; do
  gloo=$(.venv/bin/python "$peers/gloo_allreduce.py" --world "$w" --elements "$elements" --reps "$reps" 2>/dev/null | tail -n 1)
  ours=$(target/release/ringtrain bench allreduce --world "$w" --elements "$elements" --reps "$reps" ${RINGTRAIN_BENCH_FLAGS:-} | tail -n 1)
  echo "$gloo"
  echo "$ours"
  python3 - "$gloo" "$ours" <<'PY'
import json, sys
g, o = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"world={g['world']} elements={g['elements']}: {o['impl']}/{g['impl']} speedup = {g['median_s'] / o['median_s']:.2f}x")
PY
done
