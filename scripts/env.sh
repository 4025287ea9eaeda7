# Sourced by every script: installs what a fresh machine lacks (Python venv
# with the torch wheel tch links against, the Fashion-MNIST package) and sets
# the build environment. protoc needs nothing: it comes from a crate.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TORCH_VERSION=2.13.0
export LIBTORCH_USE_PYTORCH=1
export PATH="$ROOT/.venv/bin:$PATH"
export RINGTRAIN_DATA=${RINGTRAIN_DATA:-/usr/share/datasets/fashion-mnist}

ensure_venv() {
  if ! "$ROOT/.venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "== installing torch==$TORCH_VERSION into .venv (one time, ~5 GB)" >&2
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH_VERSION" numpy
  fi
}

ensure_dataset() {
  if ! ls "$RINGTRAIN_DATA"/train-images-idx3-ubyte* >/dev/null 2>&1; then
    echo "== installing Fashion-MNIST (Debian package dataset-fashion-mnist)" >&2
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
}

build_release() {
  (cd "$ROOT" && cargo build --release --quiet)
}
