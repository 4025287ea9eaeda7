#!/usr/bin/env bash
# End-to-end test of the Docker deployment (deploy/docker-compose.yml):
# build the image, start a coordinator and 3 workers, submit a short
# Fashion-MNIST job from the host over gRPC, check its result, every process's
# /metrics and the coordinator's logs, then `down -v` and check that nothing of
# the project is left.
#
#   tests/deploy/compose-e2e.sh                    # SKIPPED where no Docker engine answers (a failure under CI)
#   E2E_KILL_WORKER=0 tests/deploy/compose-e2e.sh  # without the step that docker-kills a worker mid-job
#
# Knobs: E2E_WORKERS (3), E2E_STEPS (60), E2E_KILL_STEPS (600), E2E_BUILD=0
# (use target/release/ringtrain as it is), E2E_KEEP=1 (leave the project up),
# E2E_TIMEOUT_S (per wait, 300). Networking: only loopback (ports published on
# 127.0.0.1) and the private network compose creates.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TEST_NAME=e2e
source tests/shell/lib.sh

WORKERS=${E2E_WORKERS:-3}
STEPS=${E2E_STEPS:-60}
KILL_STEPS=${E2E_KILL_STEPS:-600}
TIMEOUT_S=${E2E_TIMEOUT_S:-300}
DATASET=${RINGTRAIN_DATASET:-/usr/share/datasets/fashion-mnist}

# --- Is there a Docker engine and a compose? ------------------------------
command -v docker >/dev/null 2>&1 || skip "no docker command"
if ! info=$(timeout 20 docker info 2>&1); then
  skip "no Docker engine answers ($(printf '%s\n' "$info" | grep -m1 -iE 'error|cannot|denied' || echo 'docker info failed'))"
fi
if docker compose version >/dev/null 2>&1; then
  COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  COMPOSE=(docker-compose)
else
  skip "a Docker engine answers, but neither 'docker compose' nor 'docker-compose' is installed"
fi
command -v python3 >/dev/null 2>&1 || skip "python3 (to read JSON) is missing"

PROJECT=ringtrain-e2e-$$
export COMPOSE_PROJECT_NAME=$PROJECT
export RINGTRAIN_HOST_IP=127.0.0.1
# A free loopback port for the coordinator's gRPC API (read back with `port`).
RINGTRAIN_HOST_PORT=$(free_port)
export RINGTRAIN_HOST_PORT
export RINGTRAIN_DATASET=$DATASET
export RINGTRAIN_LOG_FORMAT=text
FILE=$ROOT/deploy/docker-compose.yml
compose() { "${COMPOSE[@]}" -f "$FILE" -p "$PROJECT" "$@"; }

up=0
cleanup() {
  [ "$up" = 1 ] || return 0
  if [ "$failed" -gt 0 ]; then
    say "--- last logs ---"
    compose logs --no-color --tail=40 >&2 2>&1 || true
  fi
  if [ "${E2E_KEEP:-0}" = 1 ]; then
    say "E2E_KEEP=1: project $PROJECT left up (${COMPOSE[*]} -f $FILE -p $PROJECT down -v)"
  else
    compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || true
  fi
  [ -z "${TLS:-}" ] || rm -rf "$TLS"
}

# host:port on the host for SERVICE's PORT (replica INDEX).
published() {
  local hp
  hp=$(compose port --index "${3:-1}" "$1" "$2" 2>/dev/null | tail -1)
  [ -n "$hp" ] && [ "${hp##*:}" != 0 ] && echo "$hp"
}

# --- Build -----------------------------------------------------------------
prepare_e2e
BIN=$ROOT/target/release/ringtrain
[ -x "$BIN" ] || must "no $BIN"

t=$SECONDS
deploy/base-image.sh || must "deploy/base-image.sh"
deploy/stage.sh || must "deploy/stage.sh"
IMAGE=${RINGTRAIN_IMAGE:-ringtrain:latest}
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
say "${COMPOSE[*]} build"
# The docker CLI sends the 350 MB context faster than docker-compose v1's own client.
COMPOSE_DOCKER_CLI_BUILD=${COMPOSE_DOCKER_CLI_BUILD:-1} compose build --quiet coordinator >&2 ||
  must "${COMPOSE[*]} build"
# The image this build replaced (a new binary): drop it unless something still uses it.
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
ok "image built ($((SECONDS - t))s, $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}'))"

# --- Up ----------------------------------------------------------------------
t=$SECONDS
up=1
compose up -d --no-build --scale worker="$WORKERS" >&2 || must "${COMPOSE[*]} up"
project_filter=(--filter "label=com.docker.compose.project=$PROJECT")
healthy() {
  local n
  n=$(docker ps -q "${project_filter[@]}" --filter health=healthy | wc -l)
  [ "$n" -eq $((WORKERS + 1)) ]
}
wait_for "$TIMEOUT_S" "$((WORKERS + 1)) healthy containers" healthy ||
  must "containers not healthy: $(docker ps -a "${project_filter[@]}" --format '{{.Names}} {{.Status}}' | tr '\n' ';')"
ok "coordinator and $WORKERS workers healthy ($((SECONDS - t))s)"

GRPC=$(published coordinator 50051) || must "coordinator gRPC port not published"
URL=https://$GRPC
# The host-side client takes the certificates and admin token that the
# one-shot certs service wrote into the tls volume.
TLS=$(mktemp -d)
docker cp "$(compose ps -q coordinator)":/var/lib/ringtrain/tls/. "$TLS/" >/dev/null ||
  must "copying the TLS dir out of the coordinator's container"
export RINGTRAIN_TLS_DIR=$TLS
[ -s "$TLS/token" ] && [ -s "$TLS/client.pem" ] && ok "certs service made the TLS dir" || bad "certs service made the TLS dir"
"$BIN" health "$GRPC" >/dev/null && ok "ringtrain health $GRPC from the host (mutual TLS)" || bad "ringtrain health $GRPC"
if env -u RINGTRAIN_TLS_DIR "$BIN" status --coordinator "$URL" --insecure >/dev/null 2>&1; then
  bad "a plaintext client was let in"
else
  ok "a plaintext client is refused"
fi

# The coordinator's own count of heartbeating workers.
metric_sum() { fetch "http://$1/metrics" | awk -v m="$2" '$1 == m || index($1, m "{") == 1 {s += $2} END {print s + 0}'; }
workers_alive() {
  local hp n
  hp=$(published coordinator 9090) || return 1
  n=$(metric_sum "$hp" ringtrain_workers_alive)
  [ "${n%.*}" -ge "$WORKERS" ]
}
wait_for 60 "$WORKERS workers registered" workers_alive &&
  ok "$WORKERS workers registered with the coordinator" ||
  bad "$WORKERS workers registered with the coordinator"

# --- A short job, submitted from the host -------------------------------------
t=$SECONDS
out=$(timeout "$TIMEOUT_S" "$BIN" submit examples/fashion-mlp.toml --coordinator "$URL" --watch --json \
  --set max_steps="$STEPS" --set eval_every_steps=30 --set workers="$WORKERS" \
  --set dataset.path=/usr/share/datasets/fashion-mnist 2>/dev/null) || true
line=$(printf '%s\n' "$out" | grep '^{' | tail -1 || true)
say "result: ${line:-<none>}"
if printf '%s' "$line" | python3 -c '
import json, sys
v = json.load(sys.stdin)
assert v["state"] == "succeeded", v
assert isinstance(v["test_accuracy"], (int, float)) and 0.5 < v["test_accuracy"] <= 1, v
assert v["steps"] >= int(sys.argv[1]), v
' "$STEPS" 2>/dev/null; then
  ok "job succeeded with a test accuracy ($((SECONDS - t))s)"
else
  bad "job did not succeed with a test accuracy"
fi

# --- Every process's /metrics ---------------------------------------------------
# grep reads it all: with -q it would stop early, and under pipefail the
# fetch that lost its reader fails the pipeline once /metrics outgrows a pipe.
has_metric() { fetch "http://$1/metrics" | grep "^$2" >/dev/null; }
if hp=$(published coordinator 9090) && has_metric "$hp" ringtrain_job_steps_total; then
  ok "coordinator /metrics has ringtrain_job_steps_total"
else
  bad "coordinator /metrics has ringtrain_job_steps_total"
fi
for i in $(seq 1 "$WORKERS"); do
  if hp=$(published worker 9091 "$i") && has_metric "$hp" ringtrain_worker_steps_total; then
    ok "worker $i /metrics has ringtrain_worker_steps_total"
  else
    bad "worker $i /metrics has ringtrain_worker_steps_total"
  fi
done

# --- The coordinator's logs carry the step lines ------------------------------
# (ANSI colours stripped, should a terminal-less process still write them.)
steps_logged=$(compose logs --no-color coordinator 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep -cE ' step .*step=[0-9]+' || true)
if [ "$steps_logged" -ge 1 ]; then
  ok "coordinator logs carry $steps_logged step lines"
else
  bad "coordinator logs carry step lines"
fi

# --- Optional: kill a worker mid-job; the job still finishes -------------------
if [ "${E2E_KILL_WORKER:-1}" = 1 ]; then
  t=$SECONDS
  log=$(mktemp)
  timeout "$TIMEOUT_S" "$BIN" submit examples/fashion-mlp.toml --coordinator "$URL" --watch --json \
    --set max_steps="$KILL_STEPS" --set eval_every_steps=0 --set workers="$WORKERS" \
    --set dataset.path=/usr/share/datasets/fashion-mnist >"$log" 2>/dev/null &
  submit_pid=$!
  before=$(metric_sum "$(published coordinator 9090)" ringtrain_job_steps_total)
  progressed() {
    local now
    now=$(metric_sum "$(published coordinator 9090)" ringtrain_job_steps_total)
    python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) + float(sys.argv[3]) else 1)' \
      "$now" "$before" "$((KILL_STEPS / 5))"
  }
  if wait_for "$TIMEOUT_S" "the long job to make progress" progressed; then
    victim=$(compose ps -q worker | sed -n 2p)
    docker kill "$victim" >/dev/null && say "killed worker container ${victim:0:12} mid-job"
    job_done() { ! kill -0 "$submit_pid" 2>/dev/null; }
    wait_for "$TIMEOUT_S" "the job to end" job_done || kill "$submit_pid" 2>/dev/null || true
    wait "$submit_pid" 2>/dev/null || true
    line=$(grep '^{' "$log" | tail -1 || true)
    say "result after the kill: ${line:-<none>}"
    if printf '%s' "$line" | python3 -c 'import json, sys; v = json.load(sys.stdin); assert v["state"] == "succeeded", v' 2>/dev/null; then
      ok "job finished after a worker was killed ($((SECONDS - t))s)"
    else
      bad "job finished after a worker was killed"
    fi
  else
    kill "$submit_pid" 2>/dev/null || true
    bad "the long job made no progress"
  fi
  rm -f "$log"
fi

# --- Down: nothing of the project is left ---------------------------------------
if [ "${E2E_KEEP:-0}" != 1 ]; then
  compose down -v --remove-orphans --timeout 10 >/dev/null 2>&1 || bad "${COMPOSE[*]} down -v"
  up=0
  left=$(docker ps -aq "${project_filter[@]}" | wc -l)
  vols=$(docker volume ls -q "${project_filter[@]}" | wc -l)
  nets=$(docker network ls -q "${project_filter[@]}" | wc -l)
  if [ "$left" = 0 ] && [ "$vols" = 0 ] && [ "$nets" = 0 ]; then
    ok "down -v left no containers, volumes or networks"
  else
    bad "down -v left $left containers, $vols volumes, $nets networks"
  fi
fi
finish
