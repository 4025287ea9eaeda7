#!/usr/bin/env bash
# Runs every test: unit tests beside the code and the end-to-end tests in
# tests/ (real ringtrain processes), then the shell tests in tests/deploy/:
# Prometheus against a local run, the Python client (clients/python) against
# a local cluster, the Kubernetes manifests rendered and
# schema-checked offline, the docker-compose and Docker Swarm deployments (SKIPPED
# where no Docker engine answers; under CI, which has everything, a test that
# cannot do its real check fails instead). Installs what is missing first.
# Long soak and benchmark runs are not here: see README ("Benchmarks").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
ensure_venv
ensure_dataset
# Chart text in metrics.png (a test checks charts with and without a font),
# and English text for the transformer (examples/text-gpt.toml).
ensure_debs fonts-dejavu-core fortunes
echo "== build" >&2
cargo build --release --quiet
echo "== tests" >&2
# Two test threads: the end-to-end tests start whole clusters, and more at
# once on 2 cores only adds scheduling noise to their deadlines.
cargo test --release --workspace -- --test-threads=2
echo "== Prometheus scraping a local run" >&2
tests/deploy/prometheus-local.sh
echo "== Python client" >&2
tests/deploy/python-client.sh
echo "== the emulated multi-host lab (network namespaces)" >&2
tests/deploy/netlab.sh
echo "== Kubernetes manifests render and validate" >&2
tests/deploy/k8s-render.sh
echo "== docker-compose end to end" >&2
tests/deploy/compose-e2e.sh
echo "== Docker Swarm end to end" >&2
tests/deploy/swarm-e2e.sh
