# Sourced by every script: installs what a fresh machine lacks (Python venv
# with the torch wheel tch links against, the Fashion-MNIST package) and sets
# the build environment. protoc needs nothing: it comes from a crate.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=2.13.0
export LIBTORCH_USE_PYTORCH=1
export PATH="$ROOT/.venv/bin:$PATH"
export RINGTRAIN_DATA=${RINGTRAIN_DATA:-/usr/share/datasets/fashion-mnist}

# What tests and benchmarks import from PyPI, as (module, pip requirement).
# gRPC, protobuf, pytest and pandas: the Python client's tests
# (tests/deploy/python-client.sh).
# kubernetes-validate: the Kubernetes JSON schemas (tests/deploy/k8s-render.sh).
# tensorboard: reads jobs' event files back (tests/tests/tensorboard.rs).
PY_MODULES=(numpy safetensors grpc grpc_tools google.protobuf pytest pandas kubernetes_validate tensorboard)
PY_PACKAGES=(numpy safetensors grpcio grpcio-tools protobuf pytest pandas kubernetes-validate tensorboard)

ensure_venv() {
  if ! "$ROOT/.venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "== installing torch==$TORCH_VERSION into .venv (one time, ~5 GB)" >&2
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION"
  fi
  local imports
  imports=$(IFS=,; echo "${PY_MODULES[*]}")
  if ! "$ROOT/.venv/bin/python" -c "import $imports" 2>/dev/null; then
    echo "== installing ${PY_PACKAGES[*]} into .venv" >&2
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "${PY_PACKAGES[@]}"
  fi
}

# What only the benchmarks' report (scripts/perf-report.py) imports: not
# installed for the tests.
ensure_report_py() {
  "$ROOT/.venv/bin/python" -c "import matplotlib" 2>/dev/null ||
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check matplotlib
}

# ensure_debs PACKAGE...: installs the Debian packages not installed yet.
ensure_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== installing Debian packages: ${missing[*]}" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

ensure_dataset() {
  if ! ls "$RINGTRAIN_DATA"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    ensure_debs dataset-fashion-mnist || {
      echo "error: the Fashion-MNIST data set is missing from $RINGTRAIN_DATA, and Debian's dataset-fashion-mnist could not be installed" >&2
      return 1
    }
  fi
}

# BUILD=0: use target/release/ringtrain as it is.
build_release() {
  [ "${BUILD:-1}" = 0 ] && [ -x "$ROOT/target/release/ringtrain" ] && return 0
  (cd "$ROOT" && cargo build --release --quiet)
}
