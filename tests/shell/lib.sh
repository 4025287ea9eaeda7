# shellcheck shell=bash
# The one helper of the shell tests (tests/deploy/*.sh): counted checks, a
# skip that fails under CI, polling with a deadline, a free port, fetching a
# URL, and a summary plus the script's own cleanup at exit.
#
#   TEST_NAME=e2e
#   source "$ROOT/tests/shell/lib.sh"
#   cleanup() { ...; }        # optional: runs once at exit, before the summary
#   ok "it works" / bad "it does not" / must "a check the rest needs"
#   finish                    # exit 0 when every check passed

T0=$SECONDS
passed=0
failed=0

say() { echo "$TEST_NAME: $*" >&2; }
ok() {
  passed=$((passed + 1))
  say "ok: $*"
}
bad() {
  failed=$((failed + 1))
  say "FAIL: $*"
}
# A failed check that makes the rest pointless.
must() {
  bad "$*"
  finish
}

# The test cannot do its real check here: SKIPPED (exit 0), except under CI,
# whose machine has everything, where it is a failure naming the reason.
skip() {
  trap - EXIT INT TERM
  case "${CI:-}" in
    "" | 0 | false)
      echo "SKIPPED: $TEST_NAME: $*"
      exit 0
      ;;
    *)
      echo "FAILED: $TEST_NAME cannot do its real check under CI: $*"
      exit 1
      ;;
  esac
}

cleanup() { :; }

finish() {
  trap - EXIT INT TERM
  cleanup
  echo "$TEST_NAME took $((SECONDS - T0))s"
  echo "$TEST_NAME: $passed passed, $failed failed"
  [ "$failed" = 0 ] && exit 0 || exit 1
}
trap finish EXIT
trap 'bad interrupted; finish' INT TERM

# wait_for SECONDS WHAT CMD...: polls CMD every half second until it
# succeeds, or says what it gave up on and fails.
wait_for() {
  local limit=$1 what=$2 deadline=$((SECONDS + $1))
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      say "gave up after ${limit}s waiting for $what"
      return 1
    fi
    sleep 0.5
  done
}

# A free TCP port on 127.0.0.1.
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# fetch URL: the body on stdout; fails on an HTTP error.
fetch() {
  if command -v curl >/dev/null 2>&1; then
    curl -fsS --max-time 5 "$1"
  else
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
  fi
}

# The end-to-end tests' preparation, from the repository root: the dataset
# in $DATASET if it is missing, and (unless E2E_BUILD=0) the venv and the
# release binary the images are built from.
prepare_e2e() {
  [ -d "$DATASET" ] && ls "$DATASET"/train-images-idx3-ubyte* >/dev/null 2>&1 || {
    source scripts/env.sh
    ensure_dataset
  }
  if [ "${E2E_BUILD:-1}" = 1 ]; then
    source scripts/env.sh
    ensure_venv
    say "cargo build --release"
    build_release || must "cargo build --release"
  fi
}
