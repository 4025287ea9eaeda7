#!/usr/bin/env bash
# A real Prometheus (Debian's `prometheus` package, installed when missing)
# scrapes a local run (`ringtrain local`: a coordinator and workers as
# processes on loopback), and the training metrics are read back through
# Prometheus's HTTP API. Everything listens on 127.0.0.1 only.
#
#   tests/deploy/prometheus-local.sh      # PROM_WORKERS (2), PROM_STEPS (1000)
#
# Also checks deploy/prometheus.yml (the compose cluster's config) with promtool.
# Prints `SKIPPED: <reason>` where Prometheus cannot be installed (a failure
# under CI).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TEST_NAME=prometheus-local
source tests/shell/lib.sh
WORKERS=${PROM_WORKERS:-2}
STEPS=${PROM_STEPS:-1000}
BIN=$ROOT/target/release/ringtrain

source scripts/env.sh
ensure_dataset
if [ "${PROM_BUILD:-1}" = 1 ]; then
  ensure_venv
  build_release
fi
[ -x "$BIN" ] || must "no $BIN"
command -v python3 >/dev/null || skip "python3 (to read JSON) is missing"
ensure_debs prometheus || skip "cannot install Debian's prometheus package"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-prom.XXXXXX")
prom_pid=""
local_pid=""
cleanup() {
  # Only the processes this script started, by their pid.
  for pid in $local_pid $prom_pid; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $local_pid $prom_pid; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$failed" -gt 0 ]; then
    say "--- prometheus log ---"
    tail -20 "$tmp/prometheus.log" >&2 2>/dev/null || true
    say "--- ringtrain local ---"
    tail -20 "$tmp/local.log" >&2 2>/dev/null || true
  fi
  rm -rf "$tmp"
}

# The compose cluster's config is valid Prometheus configuration.
if promtool check config deploy/prometheus.yml >/dev/null 2>&1; then
  ok "promtool check config deploy/prometheus.yml"
else
  bad "promtool check config deploy/prometheus.yml: $(promtool check config deploy/prometheus.yml 2>&1 | tail -1)"
fi

# Prometheus first, with its targets in a file filled in once the processes
# are up (file_sd reloads it on change), so no step of the job goes unscraped.
port=$(free_port)
PROM=http://127.0.0.1:$port
echo '[]' >"$tmp/targets.json"
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: ringtrain-local
    file_sd_configs:
      - files: ["$tmp/targets.json"]
        refresh_interval: 1s
EOF
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
  --web.listen-address="127.0.0.1:$port" >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
prom_ready() { python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/-/ready", timeout=2)' "$PROM"; }
wait_for 60 "Prometheus on 127.0.0.1:$port" prom_ready && ok "Prometheus $(prometheus --version 2>&1 | head -1 | awk '{print $3}') ready on 127.0.0.1:$port" || {
  must "Prometheus did not start"
}

# The local run, in the background.
"$BIN" local examples/fashion-mlp.toml --run-dir "$tmp/run" --json --workers "$WORKERS" \
  --set max_steps="$STEPS" --set eval_every_steps=100 >"$tmp/local.out" 2>"$tmp/local.log" &
local_pid=$!
all_ready() {
  [ -f "$tmp/run/logs/coordinator.ready" ] || return 1
  local i
  for i in $(seq 0 $((WORKERS - 1))); do [ -f "$tmp/run/logs/worker-$i.ready" ] || return 1; done
}
wait_for 120 "the coordinator and $WORKERS workers" all_ready || {
  must "ringtrain local did not start"
}
python3 - "$tmp/run" "$WORKERS" >"$tmp/targets.json.new" <<'EOF'
import json, sys
run, n = sys.argv[1], int(sys.argv[2])
out = [{"targets": [json.load(open(f"{run}/logs/coordinator.ready"))["metrics"]], "labels": {"role": "coordinator"}}]
for i in range(n):
    out.append({"targets": [json.load(open(f"{run}/logs/worker-{i}.ready"))["metrics"]], "labels": {"role": "worker"}})
print(json.dumps(out))
EOF
mv "$tmp/targets.json.new" "$tmp/targets.json"
ok "ringtrain local up: $(python3 -c 'import json,sys; print(", ".join(t["targets"][0] for t in json.load(open(sys.argv[1]))))' "$tmp/targets.json")"

# query EXPR: the value of a one-element instant vector (nothing when empty).
query() {
  python3 - "$PROM" "$1" <<'EOF'
import json, sys, urllib.parse, urllib.request
url = sys.argv[1] + "/api/v1/query?" + urllib.parse.urlencode({"query": sys.argv[2]})
v = json.load(urllib.request.urlopen(url, timeout=5))
assert v["status"] == "success", v
r = v["data"]["result"]
if r:
    print(r[0]["value"][1])
EOF
}
at_least() {
  local v
  v=$(query "$1")
  [ -n "$v" ] && python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)' "$v" "$2"
}

# Every target scraped (at some point: a fast job may already be over).
wait_for 60 "Prometheus to scrape all $((WORKERS + 1)) targets" at_least 'count(max_over_time(up{job="ringtrain-local"}[10m]) == 1)' $((WORKERS + 1)) &&
  ok "Prometheus scrapes the coordinator and $WORKERS workers" || bad "Prometheus scrapes every target"
wait_for 120 "a training step in Prometheus" at_least 'max(max_over_time(ringtrain_job_steps_total[10m]))' 1 &&
  ok "ringtrain_job_steps_total read back through the HTTP API" ||
  bad "ringtrain_job_steps_total read back through the HTTP API"

# The job's own end.
job_done() { ! kill -0 "$local_pid" 2>/dev/null; }
wait_for 300 "the job to end" job_done || bad "the job did not end in time"
rc=0
wait "$local_pid" || rc=$?
local_pid=""
line=$(grep '^{' "$tmp/local.out" | tail -1 || true)
if [ "$rc" = 0 ] && printf '%s' "$line" | python3 -c 'import json, sys; v = json.load(sys.stdin); assert v["state"] == "succeeded", v' 2>/dev/null; then
  ok "local job succeeded: $line"
  # The last scrape after the final step may not have happened; most steps have.
  n=$(query 'max(max_over_time(ringtrain_job_steps_total[10m]))')
  say "Prometheus recorded ${n:-0} of $STEPS steps"
else
  bad "local job: exit $rc, ${line:-no result line}"
fi

# Recorded series survive their targets: the workers' counters and the loss.
if at_least 'count(max_over_time(ringtrain_worker_steps_total[10m]))' "$WORKERS"; then
  ok "ringtrain_worker_steps_total recorded for $WORKERS workers (max $(query 'max(max_over_time(ringtrain_worker_steps_total[10m]))'))"
else
  bad "ringtrain_worker_steps_total recorded for $WORKERS workers"
fi
if at_least 'count(max_over_time(ringtrain_job_loss[10m]))' 1 && at_least 'sum(max_over_time(ringtrain_allreduce_seconds_total[10m]))' 0.000001; then
  ok "ringtrain_job_loss and ringtrain_allreduce_seconds_total recorded"
else
  bad "ringtrain_job_loss and ringtrain_allreduce_seconds_total recorded"
fi
# The histograms, and the dashboard's p95 step time over them.
if at_least 'sum(max_over_time(ringtrain_step_seconds_count[10m]))' 1 &&
  at_least 'count(max_over_time(ringtrain_step_phase_seconds_count[10m]) > 0)' 4 &&
  at_least 'sum(max_over_time(ringtrain_ring_wait_seconds_count[10m]))' 1 &&
  at_least 'sum(max_over_time(ringtrain_rpc_seconds_count{method="ReportStep"}[10m]))' 1 &&
  at_least 'count(max_over_time(ringtrain_step_seconds_bucket{le="+Inf"}[10m]))' "$WORKERS"; then
  ok "histograms recorded: step, 4 phases, ring wait, ReportStep RPC (p95 step $(query 'histogram_quantile(0.95, sum by (le) (increase(ringtrain_step_seconds_bucket[10m])))') s)"
else
  bad "histograms recorded: ringtrain_step_seconds, ringtrain_step_phase_seconds, ringtrain_ring_wait_seconds, ringtrain_rpc_seconds"
fi
finish
