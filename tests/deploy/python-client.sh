#!/usr/bin/env bash
# The Python client (clients/python, `ringtrain-client`) against a real local
# cluster: a coordinator and 2 workers as processes on loopback, over mutual
# TLS made by `ringtrain certs init`. Installs the client into .venv the way
# the README says (`pip install ./clients/python`: stubs generated from
# proto/ringtrain.proto at build time), runs the README quick start's CLI
# submission, then pytest in clients/python/tests (submit, watch, metrics,
# status, cancel, refusals, a TorchScript module, the README's Python quick
# start) with the cluster's address and TLS dir in RINGTRAIN_TEST_*.
#
#   tests/deploy/python-client.sh        # PYCLIENT_BUILD=0: no venv/cargo step
#
# Everything listens on 127.0.0.1 only. Prints `SKIPPED: <reason>` where
# there is no .venv (a failure under CI).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TEST_NAME=python-client
source tests/shell/lib.sh
WORKERS=2
BIN=$ROOT/target/release/ringtrain
PY=$ROOT/.venv/bin/python

source scripts/env.sh
ensure_dataset
if [ "${PYCLIENT_BUILD:-1}" = 1 ]; then
  ensure_venv
  build_release
fi
[ -x "$BIN" ] || must "no $BIN"
[ -x "$PY" ] || skip "no $PY (scripts/env.sh ensure_venv makes it)"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-pyclient.XXXXXX")
pids=""
cleanup() {
  # Only the processes this script started, by their pid.
  for pid in $pids; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in $pids; do
    wait "$pid" 2>/dev/null || true
  done
  if [ "$failed" -gt 0 ]; then
    for log in "$tmp"/*.log; do
      [ -f "$log" ] || continue
      say "--- $(basename "$log") ---"
      tail -20 "$log" >&2 || true
    done
  fi
  rm -rf "$tmp"
}

# The client, as a user installs it.
if "$PY" -m pip install --quiet --disable-pip-version-check ./clients/python >"$tmp/pip.log" 2>&1; then
  ok "pip install ./clients/python ($("$PY" -c 'import importlib.metadata as m; print("ringtrain-client", m.version("ringtrain-client"))'))"
else
  tail -5 "$tmp/pip.log" >&2
  must "pip install ./clients/python (see above)"
fi

# The cluster: certificates, a coordinator, 2 workers.
"$BIN" certs init "$tmp/tls" >/dev/null || must "ringtrain certs init"
"$BIN" coordinator --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$tmp/data" \
  --tls-dir "$tmp/tls" --ready-file "$tmp/coordinator.ready" >"$tmp/coordinator.log" 2>&1 &
pids="$pids $!"
wait_for 60 "the coordinator" test -f "$tmp/coordinator.ready" || must "the coordinator did not start"
addr=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["grpc"])' "$tmp/coordinator.ready")
for i in $(seq 0 $((WORKERS - 1))); do
  "$BIN" worker --coordinator "https://$addr" --listen 127.0.0.1:0 --ring-listen 127.0.0.1:0 \
    --metrics-listen 127.0.0.1:0 --advertise-host 127.0.0.1 --tls-dir "$tmp/tls" \
    --ready-file "$tmp/worker-$i.ready" >"$tmp/worker-$i.log" 2>&1 &
  pids="$pids $!"
done
all_ready() {
  local i
  for i in $(seq 0 $((WORKERS - 1))); do [ -f "$tmp/worker-$i.ready" ] || return 1; done
}
wait_for 60 "$WORKERS workers to register" all_ready || must "the workers did not register"
ok "coordinator on $addr (mutual TLS) and $WORKERS workers up"

# The README quick start's CLI submission, against the same cluster.
if RINGTRAIN_COORDINATOR="https://$addr" RINGTRAIN_TLS_DIR="$tmp/tls" \
  "$BIN" submit examples/fashion-mlp.toml --watch --json >"$tmp/cli.out" 2>"$tmp/cli.log" &&
  grep '^{' "$tmp/cli.out" | tail -1 | python3 -c 'import json, sys; v = json.load(sys.stdin); assert v["state"] == "succeeded", v'; then
  ok "ringtrain submit examples/fashion-mlp.toml --watch: $(grep '^{' "$tmp/cli.out" | tail -1 |
    python3 -c 'import json, sys; v = json.load(sys.stdin); print(v["state"], "after", v["steps"], "steps, test accuracy", v["test_accuracy"])')"
else
  bad "ringtrain submit examples/fashion-mlp.toml --watch: $(tail -1 "$tmp/cli.log" 2>/dev/null)"
fi

# The Python client's tests (from the checkout's root: the installed
# package, not the source folder, is what they import).
if RINGTRAIN_TEST_COORDINATOR="$addr" RINGTRAIN_TEST_TLS_DIR="$tmp/tls" \
  "$ROOT/.venv/bin/pytest" -q -rs -p no:cacheprovider clients/python/tests; then
  ok "pytest clients/python/tests"
else
  bad "pytest clients/python/tests"
fi
finish
