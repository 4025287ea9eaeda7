#!/usr/bin/env bash
# The main job. Installs what is missing, builds, then runs the ring
# all-reduce benchmark side by side with Gloo (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/bench-allreduce.sh "$@"
