#!/usr/bin/env bash
# The emulated multi-host lab (scripts/netlab.sh) does what the benchmarks
# rely on: ranks in their own namespaces reach each other by address, a link
# carries about its set rate (not loopback speed), the ring's ranks there stay
# on TCP (no shared memory across namespaces) and sum right, and `down`
# leaves nothing behind. SKIPPED without root or iproute2 (a failure under CI).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TEST_NAME=netlab
source tests/shell/lib.sh
source scripts/env.sh
BIN=$ROOT/target/release/ringtrain
[ -x "$BIN" ] || must "no $BIN"
[ "$(id -u)" = 0 ] || skip "network namespaces need root"
command -v ip >/dev/null && command -v tc >/dev/null || skip "iproute2 (ip, tc) is missing"
cleanup() { scripts/netlab.sh down; }
check() {
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}

RATE=200
scripts/netlab.sh up 2 "$RATE" 0.1
# 20 MB from rank 0 to rank 1 over the shaped link.
scripts/netlab.sh exec 1 python3 -c "
import socket
s = socket.socket(); s.bind(('$(scripts/netlab.sh addr 1)', 5999)); s.listen(); c, _ = s.accept(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    n += len(b)
print(n)" >"${TMPDIR:-/tmp}/netlab-got.$$" &
server=$!
secs=$(scripts/netlab.sh exec 0 python3 -c "
import socket, time
deadline = time.time() + 10
while True:
    try:
        s = socket.create_connection(('$(scripts/netlab.sh addr 1)', 5999), timeout=2); break
    except OSError:
        if time.time() > deadline: raise
        time.sleep(0.05)
b = b'x' * (1 << 20); t = time.time()
for _ in range(20): s.sendall(b)
s.shutdown(socket.SHUT_WR); s.recv(1); print(time.time() - t)")
wait "$server"
got=$(cat "${TMPDIR:-/tmp}/netlab-got.$$"); rm -f "${TMPDIR:-/tmp}/netlab-got.$$"
check "rank 1 got every byte rank 0 sent across namespaces" [ "$got" = $((20 << 20)) ]
mbit=$(python3 -c "print(round(20 * 8 * 1.048576 / $secs))")
echo "netlab: 20 MiB at a ${RATE} Mbit/s setting: ${mbit} Mbit/s"
check "the link carries about its rate (${mbit} of ${RATE} Mbit/s)" [ "$mbit" -ge $((RATE * 70 / 100)) -a "$mbit" -le $((RATE * 110 / 100)) ]

out=$("$BIN" bench allreduce --world 2 --elements 250000 --reps 2 --netlab | tail -n 1)
check "the ring runs across the lab and sums right" grep -q '"netlab":true' <<<"$out"
check "ranks in different namespaces stay on TCP" grep -q '"impl":"ringtrain-tcp-aead"' <<<"$out"

scripts/netlab.sh down
check "down removes every namespace" bash -c '! ip netns list | grep -q "^rtlab"'
check "down removes the bridge" bash -c '! ip link show rtlab-br >/dev/null 2>&1'
finish
