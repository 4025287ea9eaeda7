#!/usr/bin/env bash
# The main job: the training demo. Installs what is missing, builds, then
# trains the CNN on Fashion-MNIST with a coordinator and 4 workers on
# loopback (`ringtrain local`), and prints test accuracy, checkpoint and logs.
# Extra arguments go to `ringtrain local`, e.g. --workers 2 --set epochs=1.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset
build_release
exec target/release/ringtrain local --workers 4 examples/fashion-cnn.toml "$@"
