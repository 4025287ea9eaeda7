#!/usr/bin/env bash
# Reruns every benchmark behind docs/performance.md and rewrites it (with
# docs/performance.png): the all-reduce on loopback and over the emulated
# multi-host lab against Gloo, and training against PyTorch DDP. Not part of
# the test run: ~35 minutes on 2 cores, and the lab needs root.
#
#   scripts/bench-all.sh            # BENCH_WORLDS ("2 4 8" on the lab), RATE (1000), ROUNDS (2)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset
ensure_report_py
build_release
out=bench-results
mkdir -p "$out"
: >"$out/loopback.jsonl"
: >"$out/netlab.jsonl"
: >"$out/train.jsonl"
: >"$out/accuracy.jsonl"
rounds=${ROUNDS:-2}

echo "== all-reduce on loopback (vs Gloo)" >&2
for flags in "" "--shared-memory false"; do
  RESULTS=$out/loopback.jsonl RINGTRAIN_BENCH_FLAGS="$flags" ROUNDS=$((rounds + 1)) \
    scripts/bench-allreduce.sh 25000000 10 2 4
done

echo "== all-reduce over the lab (vs Gloo)" >&2
RESULTS=$out/netlab.jsonl ROUNDS=$rounds REPS=5 scripts/bench-netlab.sh ${BENCH_WORLDS:-2 4 8}

echo "== training on loopback (vs DDP)" >&2
report=$(ROUNDS=$((rounds + 1)) scripts/bench-train.sh 4 60 cnn 64 | tail -n 3)
echo "$report"
python3 - "$report" "$out/train.jsonl" <<'PY'
import json, re, sys
text, path = sys.argv[1], sys.argv[2]
m = re.search(r"world=(\d+) model=(\w+).*ddp median ([\d.]+) samples/s, ringtrain median ([\d.]+) samples/s, ringtrain/ddp = ([\d.]+)x", text)
c = re.search(r"compute ceiling .*: ([\d.]+) samples/s", text)
j = re.search(r"ddp median ([\d.]+) s, ringtrain median ([\d.]+) s, ddp/ringtrain = ([\d.]+)x", text)
with open(path, "a") as f:
    if m:
        row = {"kind": "steady state, samples/s, loopback", "world": int(m[1]), "model": m[2],
               "ddp": float(m[3]), "ours": float(m[4]), "ratio": float(m[5])}
        if c:
            row["ceiling"] = float(c[1])
        f.write(json.dumps(row) + "\n")
    if j:
        f.write(json.dumps({"kind": "fixed 60-step job end to end, seconds (ratio: DDP time / ours)",
                            "world": int(m[1]) if m else 4, "model": "cnn", "ddp": float(j[1]),
                            "ours": float(j[2]), "ratio": float(j[3])}) + "\n")
PY

echo "== training over the lab (vs DDP)" >&2
RESULTS=$out/train.jsonl ROUNDS=$rounds scripts/bench-netlab-train.sh 4 40 cnn 64

echo "== accuracy of each gradient compressor, 2 epochs (vs DDP)" >&2
RESULTS=$out/accuracy.jsonl scripts/bench-accuracy.sh

.venv/bin/python scripts/perf-report.py "$out" docs
