#!/usr/bin/env bash
# An emulated multi-host lab on one machine: W network namespaces on one
# bridge, each rank's link shaped with tc (a rate limit and a netem delay on
# the egress of its interface, so every byte between two ranks crosses one
# shaped link, as between two hosts behind a switch).
#
#   scripts/netlab.sh up W RATE_MBIT DELAY_MS   # namespaces rtlab0..rtlab{W-1}
#   scripts/netlab.sh exec R CMD...             # run CMD as rank R (in rtlabR)
#   scripts/netlab.sh down                      # removes every rtlab namespace and the bridge
#   scripts/netlab.sh addr R                    # rank R's address (10.77.0.R+1)
#   scripts/netlab.sh delay MS                  # the delay the running lab really adds
#
# Delay needs netem (CONFIG_NET_SCH_NETEM); where the kernel lacks it (as on
# this project's CI machine), the rate is shaped by tbf and no delay is added,
# which `delay` reports and the benchmarks record.
# Rank R lives in namespace rtlab$R with address 10.77.0.$((R+1))/24 on eth0;
# the bridge rtlab-br holds 10.77.0.254 in the root namespace. Needs root
# (or CAP_NET_ADMIN) and iproute2; `down` is safe to run at any time.
# Callers that bring a lab up should trap `down` on EXIT (bench-netlab.sh does).
set -euo pipefail

PREFIX=rtlab
BRIDGE=rtlab-br
SUBNET=10.77.0

addr() { echo "$SUBNET.$(( $1 + 1 ))"; }

down() {
  local ns
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  local ipt
  for ipt in iptables iptables-legacy; do
    command -v "$ipt" >/dev/null || continue
    while "$ipt" -D FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null; do :; done
  done
  # Root-side veth ends die with their namespace peers; any stragglers:
  for l in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${PREFIX}v[0-9]+$" || true); do
    ip link del "$l" 2>/dev/null || true
  done
}

up() {
  local world=$1 rate=$2 delay=$3 r ns
  [[ "$world" =~ ^[0-9]+$ && "$world" -ge 1 && "$world" -le 64 ]] || { echo "netlab: W must be 1..64, not '$world'" >&2; exit 2; }
  [[ "$rate" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "netlab: RATE_MBIT must be a number, not '$rate'" >&2; exit 2; }
  [[ "$delay" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "netlab: DELAY_MS must be a number, not '$delay'" >&2; exit 2; }
  command -v ip >/dev/null && command -v tc >/dev/null || { echo "netlab: needs iproute2 (ip, tc)" >&2; exit 2; }
  down
  ip link add "$BRIDGE" type bridge
  ip addr add "$SUBNET.254/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # A Docker engine sets FORWARD to DROP, and bridged frames pass through
  # it (br_netfilter): let the lab's bridge forward to itself.
  local ipt
  for ipt in iptables iptables-legacy; do
    command -v "$ipt" >/dev/null || continue
    "$ipt" -S FORWARD >/dev/null 2>&1 || continue
    "$ipt" -I FORWARD -i "$BRIDGE" -o "$BRIDGE" -j ACCEPT 2>/dev/null || true
  done
  for r in $(seq 0 $(( world - 1 ))); do
    ns=$PREFIX$r
    ip netns add "$ns"
    ip link add "${PREFIX}v$r" type veth peer name eth0 netns "$ns"
    ip link set "${PREFIX}v$r" master "$BRIDGE" up
    # IPv4 only: Gloo takes the interface's first address, and an IPv6
    # link-local one has no route between namespaces.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1 || true
    ip -n "$ns" addr add "$(addr "$r")/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    shape "$ns" "$rate" "$delay"
  done
  echo "netlab: $world ranks at ${rate} Mbit/s, delay $(delay_applied "$delay"): $(addr 0) .. $(addr $(( world - 1 )))" >&2
}

# Rate and delay on what a rank sends: netem where the kernel has it (its
# queue holds a few bandwidth-delay products, so TCP sees the rate, not
# drops); else a token bucket (tbf) for the rate alone, and no added delay.
shape() {
  local ns=$1 rate=$2 delay=$3
  if ip netns exec "$ns" tc qdisc add dev eth0 root netem delay "${delay}ms" rate "${rate}mbit" limit 100000 2>/dev/null; then
    return
  fi
  # Burst: at least one GSO packet (64 KiB) and 1 ms at the rate.
  local burst=$(( rate * 1000 / 8 ))
  [ "$burst" -ge 262144 ] || burst=262144
  ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "${rate}mbit" burst "$burst" latency 100ms
}

# What delay the lab really adds: "N ms" with netem, "none (no netem in this
# kernel)" otherwise.
delay_applied() {
  if ip netns exec "${PREFIX}0" tc qdisc show dev eth0 2>/dev/null | grep -q netem; then
    echo "$1 ms"
  else
    echo "none (this kernel has no netem; rate only, by tbf)"
  fi
}

case "${1:-}" in
  up) [ $# -eq 4 ] || { echo "usage: $0 up W RATE_MBIT DELAY_MS" >&2; exit 2; }; up "$2" "$3" "$4" ;;
  down) down ;;
  exec) [ $# -ge 3 ] || { echo "usage: $0 exec R CMD..." >&2; exit 2; }; r=$2; shift 2; exec ip netns exec "$PREFIX$r" "$@" ;;
  addr) addr "$2" ;;
  delay) delay_applied "$2" ;;
  *) echo "usage: $0 up W RATE_MBIT DELAY_MS | exec R CMD... | addr R | down" >&2; exit 2 ;;
esac
