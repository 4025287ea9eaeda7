#!/usr/bin/env bash
# The Docker Swarm end-to-end test, kept beside the stack it tests
# (deploy/stack.yml) as deploy/swarm-e2e.sh; here so that tests/deploy/ lists
# every deployment test. Same knobs (E2E_*), same SKIPPED rule.
exec "$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/deploy/swarm-e2e.sh" "$@"
