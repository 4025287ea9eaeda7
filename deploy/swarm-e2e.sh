#!/usr/bin/env bash
# End-to-end test of the Docker Swarm deployment (deploy/stack.yml) on the
# local engine: a single-node swarm (`docker swarm init` on loopback unless
# the engine already is a swarm manager), the image tests/deploy/compose-e2e.sh
# builds (rebuilt here only when missing or older than target/release/ringtrain),
# certificates made on the host and given to the services as Docker secrets,
# `docker stack deploy` of a coordinator and 3 worker replicas on an overlay
# network. A job submitted from the host; mid-job `docker service scale` to 4
# workers (the 4th must register and join the ring) and one worker task's
# container `docker kill`ed (Swarm must replace it, the new worker register);
# the job must still succeed, with its checkpoint in the shared volume. Then
# `docker stack rm`, the volume removed, the swarm left if this script made it,
# and a check that nothing named after the stack remains.
#
#   deploy/swarm-e2e.sh              # SKIPPED where no Docker engine answers (a failure under CI)
#
# Knobs: E2E_WORKERS (3; scaled to one more), E2E_STEPS (400), E2E_BUILD=0
# (use target/release/ringtrain as it is, no cargo build), E2E_KEEP=1 (leave
# the stack, and a swarm made here, up), E2E_TIMEOUT_S (per wait, 300).
# Networking: the swarm's control plane on 127.0.0.1; the coordinator's gRPC
# port published in host mode (Swarm binds every address; mutual TLS only).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TEST_NAME=swarm-e2e
source tests/shell/lib.sh

WORKERS=${E2E_WORKERS:-3}
SCALED=$((WORKERS + 1))
STEPS=${E2E_STEPS:-400}
TIMEOUT_S=${E2E_TIMEOUT_S:-300}
DATASET=${RINGTRAIN_DATASET:-/usr/share/datasets/fashion-mnist}
IMAGE=${RINGTRAIN_IMAGE:-ringtrain:latest}
BIN=$ROOT/target/release/ringtrain

# --- Is there a Docker engine that can be a swarm manager? ------------------
command -v docker >/dev/null 2>&1 || skip "no docker command"
if ! info=$(timeout 20 docker info 2>&1); then
  skip "no Docker engine answers ($(printf '%s\n' "$info" | grep -m1 -iE 'error|cannot|denied' || echo 'docker info failed'))"
fi
docker stack --help >/dev/null 2>&1 || skip "this docker CLI has no 'stack' command"
command -v python3 >/dev/null 2>&1 || skip "python3 (to read JSON) is missing"
SWARM_BEFORE=$(docker info --format '{{.Swarm.LocalNodeState}}')
case $SWARM_BEFORE in
  inactive) ;;
  active)
    [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ] ||
      skip "this engine is a swarm worker node: stacks are deployed from a manager"
    ;;
  *) skip "the engine's swarm state is '$SWARM_BEFORE' (neither inactive nor an active manager)" ;;
esac
# Made by `swarm init`, left behind by `swarm leave`: dropped at the end when
# it was not there before.
GWBRIDGE_BEFORE=$(docker network ls -q --filter name='^docker_gwbridge$')

STACK=ringtrain-swarm-$$
TMP=$(mktemp -d "${TMPDIR:-/tmp}/ringtrain-swarm.XXXXXX")
inited=0   # this script ran `docker swarm init`
deployed=0 # the stack may exist
torn=0     # teardown ran

# The services' task containers, all or one service's.
stack_containers() { docker ps -q "$@" --filter "label=com.docker.stack.namespace=$STACK"; }
worker_containers() { docker ps -q --filter "label=com.docker.swarm.service.name=${STACK}_worker" "$@"; }
# Anything named after the stack: "KIND NAME" lines.
leftovers() {
  docker ps -a --filter "name=$STACK" --format 'container {{.Names}}'
  docker volume ls --filter "name=$STACK" --format 'volume {{.Name}}'
  docker network ls --filter "name=$STACK" --format 'network {{.Name}}'
  if [ "$(docker info --format '{{.Swarm.ControlAvailable}}')" = true ]; then
    docker service ls --filter "name=$STACK" --format 'service {{.Name}}'
    docker secret ls --filter "name=$STACK" --format 'secret {{.Name}}'
  fi
}

# Removes the stack, its volume and a swarm made here; CHECK=1 counts the
# result as checks (the normal end), otherwise it only cleans up.
teardown() {
  local check=${1:-0} n
  [ "$torn" = 0 ] || return 0
  torn=1
  if [ "$deployed" = 1 ]; then
    docker stack rm "$STACK" >/dev/null 2>&1 || true
    # Tasks stop asynchronously (stop_grace_period); the volume goes once
    # no container holds it.
    gone() { [ -z "$(docker ps -aq --filter "label=com.docker.stack.namespace=$STACK")" ]; }
    wait_for 90 "the stack's containers to go" gone || true
    stack_volumes() { docker volume ls -q --filter "label=com.docker.stack.namespace=$STACK"; }
    vols_gone() {
      stack_volumes | xargs -r docker volume rm >/dev/null 2>&1 || true
      [ -z "$(stack_volumes)" ]
    }
    wait_for 30 "the stack's volume to go" vols_gone || true
    nets_gone() { [ -z "$(docker network ls -q --filter "name=$STACK")" ]; }
    wait_for 30 "the stack's network to go" nets_gone || true
  fi
  if [ "$inited" = 1 ]; then
    docker swarm leave --force >/dev/null 2>&1 || true
    if [ -z "$GWBRIDGE_BEFORE" ]; then
      docker network rm docker_gwbridge >/dev/null 2>&1 || true
    fi
  fi
  rm -rf "$TMP"
  [ "$check" = 1 ] || return 0
  n=$(leftovers | wc -l)
  if [ "$n" = 0 ]; then
    ok "nothing named after $STACK remains (containers, volumes, networks, services, secrets)"
  else
    bad "left behind: $(leftovers | tr '\n' ';')"
  fi
  local now gw
  now=$(docker info --format '{{.Swarm.LocalNodeState}}')
  gw=$(docker network ls -q --filter name='^docker_gwbridge$')
  # (In a swarm found active, docker_gwbridge is the swarm's own: left as it is.)
  if [ "$now" = "$SWARM_BEFORE" ] && { [ "$inited" = 0 ] || [ -n "$GWBRIDGE_BEFORE" ] || [ -z "$gw" ]; }; then
    ok "the engine's swarm state is as found ($now)"
  else
    bad "the engine's swarm state was '$SWARM_BEFORE', is '$now' (docker_gwbridge before: ${GWBRIDGE_BEFORE:-none}, now: ${gw:-none})"
  fi
}

cleanup() {
  [ -z "${submit_pid:-}" ] || kill "$submit_pid" 2>/dev/null || true
  if [ "$failed" -gt 0 ] && [ "$deployed" = 1 ] && [ "$torn" = 0 ]; then
    say "--- last logs ---"
    for s in coordinator worker; do
      docker service ps --no-trunc --format '{{.Name}} {{.CurrentState}} {{.Error}}' "${STACK}_$s" >&2 2>&1 || true
      docker service logs --no-task-ids --tail 30 "${STACK}_$s" >&2 2>&1 || true
    done
  fi
  if [ "${E2E_KEEP:-0}" = 1 ] && [ "$torn" = 0 ]; then
    say "E2E_KEEP=1: stack $STACK left up (docker stack rm $STACK; docker volume rm ${STACK}_checkpoints$([ "$inited" = 1 ] && echo '; docker swarm leave --force'))"
    return 0
  fi
  teardown 0
}

# --- The image: reused when it holds the current binary ------------------------
prepare_e2e
[ -x "$BIN" ] || must "no $BIN"

# The image's /opt/ringtrain/bin/ringtrain is deploy/stage.sh's copy of $BIN:
# debug info stripped (STRIP=0: as it is). Current when its hash is either.
image_current() {
  local in_image want
  in_image=$(docker run --rm --network none --entrypoint sha256sum "$IMAGE" /opt/ringtrain/bin/ringtrain 2>/dev/null) || return 1
  in_image=${in_image%% *}
  [ -n "$in_image" ] || return 1
  want=$(sha256sum <"$BIN")
  [ "$in_image" = "${want%% *}" ] && return 0
  command -v strip >/dev/null 2>&1 || return 1
  strip --strip-debug -o "$TMP/ringtrain.stripped" "$BIN" 2>/dev/null || return 1
  want=$(sha256sum <"$TMP/ringtrain.stripped")
  rm -f "$TMP/ringtrain.stripped"
  [ "$in_image" = "${want%% *}" ]
}
t=$SECONDS
if image_current; then
  ok "image $IMAGE holds the current binary: reused ($((SECONDS - t))s)"
else
  # As tests/deploy/compose-e2e.sh builds it (its compose build is this docker build).
  say "$IMAGE missing or older than $BIN: building it"
  deploy/base-image.sh || must "deploy/base-image.sh"
  deploy/stage.sh || must "deploy/stage.sh"
  previous=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
  docker build --quiet -t "$IMAGE" -f deploy/Dockerfile deploy >/dev/null || must "docker build"
  if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE")" ]; then
    docker rmi "$previous" >/dev/null 2>&1 || true
  fi
  image_current && ok "image $IMAGE built ($((SECONDS - t))s)" || must "the built image does not hold $BIN"
fi

# --- Swarm, certificates, stack -------------------------------------------------
if [ "$SWARM_BEFORE" = inactive ]; then
  # Loopback only: a one-node swarm that nothing else can join.
  docker swarm init --advertise-addr 127.0.0.1 --listen-addr 127.0.0.1:2377 >/dev/null ||
    must "docker swarm init"
  inited=1
  ok "single-node swarm initialised on 127.0.0.1"
else
  say "the engine already is a swarm manager: using it, and leaving it a swarm"
fi

# The workers dial the coordinator by its service name; the host by 127.0.0.1.
export RINGTRAIN_TLS_DIR=$TMP/tls
"$BIN" certs init "$RINGTRAIN_TLS_DIR" --host coordinator >/dev/null 2>&1 || must "ringtrain certs init"
RINGTRAIN_HOST_PORT=$(free_port)
export RINGTRAIN_HOST_PORT RINGTRAIN_DATASET=$DATASET RINGTRAIN_IMAGE=$IMAGE RINGTRAIN_WORKERS=$WORKERS
export RINGTRAIN_LOG_FORMAT=text
GRPC=127.0.0.1:$RINGTRAIN_HOST_PORT
URL=https://$GRPC

t=$SECONDS
deployed=1
# No registry: the tasks run the local image as it is.
out=$(docker stack deploy --resolve-image never -c deploy/stack.yml "$STACK" 2>&1) ||
  must "docker stack deploy: $out"
healthy() { [ "$(stack_containers --filter health=healthy | wc -l)" -eq $((WORKERS + 1)) ]; }
wait_for "$TIMEOUT_S" "$((WORKERS + 1)) healthy tasks" healthy ||
  must "tasks not healthy: $(docker ps -a --filter "label=com.docker.stack.namespace=$STACK" --format '{{.Names}} {{.Status}}' | tr '\n' ';')"
ok "stack deployed: coordinator and $WORKERS worker tasks healthy on the overlay network ($((SECONDS - t))s)"

# Keys arrive as secrets, readable by the image's user alone.
c=$(worker_containers | head -1)
modes=$(docker exec "$c" stat -c '%n %a %u' /run/secrets/ca.pem /run/secrets/worker.pem /run/secrets/worker.key 2>&1 | tr '\n' ' ')
case $modes in
  *"ca.pem 444 10001"*"worker.pem 444 10001"*"worker.key 400 10001"*) ok "worker TLS files are secrets, the key 0400 for uid 10001" ;;
  *) bad "worker TLS files as secrets: $modes" ;;
esac

"$BIN" health "$GRPC" >/dev/null 2>&1 && ok "ringtrain health $GRPC from the host (mutual TLS)" || bad "ringtrain health $GRPC"
if env -u RINGTRAIN_TLS_DIR "$BIN" status --coordinator "http://$GRPC" --insecure >/dev/null 2>&1; then
  bad "a plaintext client was let in"
else
  ok "a plaintext client is refused"
fi

# From the coordinator's own view, through its API.
status_json() { "$BIN" status --json --coordinator "$URL" "$@" 2>/dev/null; }
alive_workers() {
  status_json | python3 -c 'import json, sys; print(sum(1 for w in json.load(sys.stdin)["workers"] if w["alive"]))'
}
alive_at_least() { [ "$(alive_workers)" -ge "$1" ]; }
wait_for 120 "$WORKERS workers registered" alive_at_least "$WORKERS" &&
  ok "$WORKERS workers registered with the coordinator" ||
  must "$WORKERS workers registered with the coordinator (alive: $(alive_workers || echo '?'))"

# --- A job from the host; scale and kill mid-job -------------------------------
t=$SECONDS
log=$TMP/submit.log
timeout "$((TIMEOUT_S * 2))" "$BIN" submit examples/fashion-mlp.toml --coordinator "$URL" --watch --json \
  --set max_steps="$STEPS" --set eval_every_steps="$STEPS" --set workers="$WORKERS" \
  --set max_workers="$SCALED" --set dataset.path=/usr/share/datasets/fashion-mnist >"$log" 2>&1 &
submit_pid=$!
JOB=
# job_field KEY: the job's KEY from `ringtrain status JOB --json`.
job_field() {
  status_json "$JOB" | python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}
job_known() {
  JOB=$(status_json | python3 -c 'import json, sys; print(json.load(sys.stdin)["jobs"][0]["job"])') && [ -n "$JOB" ]
}
at_step() { [ "$(job_field steps)" -ge "$1" ]; }
running() { [ "$(job_field state)" = running ]; }
wait_for 60 "the job to be accepted" job_known || must "the job was not accepted: $(tail -3 "$log" | tr '\n' ' ')"
wait_for "$TIMEOUT_S" "the job to reach step 10" at_step 10 || must "the job made no progress"
say "job $JOB running; scaling to $SCALED workers at step $(job_field steps)/$STEPS"

docker service scale --detach "${STACK}_worker=$SCALED" >/dev/null 2>&1 || bad "docker service scale"
wait_for "$TIMEOUT_S" "$SCALED workers registered" alive_at_least "$SCALED" &&
  ok "scaled to $SCALED workers mid-job: $SCALED registered" ||
  bad "$SCALED workers registered after scaling (alive: $(alive_workers || echo '?'))"
ring_is() { [ "$(job_field ring_workers)" -eq "$1" ]; }
if wait_for "$TIMEOUT_S" "the ring to grow to $SCALED" ring_is "$SCALED" && running; then
  ok "the running job's ring grew to $SCALED workers (step $(job_field steps)/$STEPS)"
else
  bad "the running job's ring grew to $SCALED workers (state $(job_field state), ring $(job_field ring_workers))"
fi

victim=$(worker_containers | head -1)
step=$(job_field steps || echo "?")
docker kill "$victim" >/dev/null || bad "docker kill $victim"
say "killed worker task container ${victim:0:12} at step $step/$STEPS"
replaced() {
  local now
  now=$(worker_containers --filter health=healthy)
  [ "$(printf '%s\n' "$now" | grep -c .)" -eq "$SCALED" ] && ! printf '%s\n' "$now" | grep -q "^${victim:0:12}"
}
if wait_for "$TIMEOUT_S" "Swarm to replace the killed task" replaced; then
  why=$(docker service ps --no-trunc --filter desired-state=shutdown --format '{{.Error}}' "${STACK}_worker" | grep -m1 . || true)
  ok "Swarm replaced the killed task: $SCALED healthy worker tasks again (${why:-no error recorded})"
else
  bad "Swarm replaced the killed task: $(docker service ps --format '{{.Name}} {{.CurrentState}}' "${STACK}_worker" | tr '\n' ';')"
fi
wait_for "$TIMEOUT_S" "the new worker to register" alive_at_least "$SCALED" &&
  ok "the replacement worker registered: $SCALED alive" ||
  bad "the replacement worker registered (alive: $(alive_workers || echo '?'))"

submit_done() { ! kill -0 "$submit_pid" 2>/dev/null; }
wait_for "$((TIMEOUT_S * 2))" "the job to end" submit_done || kill "$submit_pid" 2>/dev/null || true
wait "$submit_pid" 2>/dev/null || true
line=$(grep '^{' "$log" | tail -1 || true)
say "result: ${line:-<none>}"
if printf '%s' "$line" | python3 -c '
import json, sys
v = json.load(sys.stdin)
assert v["state"] == "succeeded", v
assert v["steps"] >= int(sys.argv[1]), v
assert isinstance(v["test_accuracy"], (int, float)) and 0.5 < v["test_accuracy"] <= 1, v
' "$STEPS" 2>/dev/null; then
  ok "job succeeded through the scale and the kill, with a test accuracy ($((SECONDS - t))s)"
else
  bad "job succeeded through the scale and the kill (submit said: $(grep -v '^{' "$log" | tail -2 | tr '\n' ' '))"
fi
# Generations: the first ring, the 4th joining, re-formed without the killed one, (its replacement joining).
gen=$(printf '%s' "$line" | python3 -c 'import json, sys; print(json.load(sys.stdin)["ring_generation"])' 2>/dev/null || echo 0)
[ "$gen" -ge 3 ] && ok "the ring was re-formed $((gen - 1)) times (generation $gen)" ||
  bad "the ring re-formed for the scale and the kill (generation $gen, want >= 3)"
ckpt=$(printf '%s' "$line" | python3 -c 'import json, sys; print(json.load(sys.stdin)["checkpoint_dir"] or "")' 2>/dev/null || true)
coord=$(stack_containers --filter "label=com.docker.swarm.service.name=${STACK}_coordinator" | head -1)
if [ -n "$ckpt" ] && [ -n "$coord" ] && docker exec "$coord" test -s "$ckpt/checkpoint.json"; then
  ok "checkpoint in the shared volume ($ckpt)"
else
  bad "checkpoint in the shared volume (${ckpt:-no checkpoint_dir})"
fi

# --- Down: the engine as found -------------------------------------------------------
if [ "${E2E_KEEP:-0}" != 1 ]; then
  teardown 1
fi
finish
