#!/usr/bin/env bash
# Runs the `mtu` example across two network namespaces joined by a veth pair,
# once with the veth MTU at 9000 (jumbo frames) and once at 1500 (Ethernet):
# the server in one namespace, the senders in the other. Needs root (ip netns).
# Everything it creates is removed on exit.
#
#   cargo build --release -p teleport-quic --example mtu
#   sudo transport-quic/examples/mtu-netns.sh [extra arguments of the example]
#
# Environment: MTU_BIN (default target/release/examples/mtu), MTUS (default
# "9000 1500").
set -euo pipefail

BIN=${MTU_BIN:-target/release/examples/mtu}
MTUS=${MTUS:-"9000 1500"}
TAG=tpmtu$$
NS_A=${TAG}a
NS_B=${TAG}b
PORT=4500
SERVER_PID=

cleanup() {
    if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    rm -f "/tmp/$TAG.server"
}
trap cleanup EXIT INT TERM

[ -x "$BIN" ] || { echo "build first: cargo build --release -p teleport-quic --example mtu" >&2; exit 1; }

for mtu in $MTUS; do
    cleanup
    SERVER_PID=
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add "${TAG}x" type veth peer name "${TAG}y"
    ip link set "${TAG}x" netns "$NS_A"
    ip link set "${TAG}y" netns "$NS_B"
    ip -n "$NS_A" addr add 10.77.0.1/24 dev "${TAG}x"
    ip -n "$NS_B" addr add 10.77.0.2/24 dev "${TAG}y"
    for ns in "$NS_A" "$NS_B"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$NS_A" link set "${TAG}x" mtu "$mtu" up
    ip -n "$NS_B" link set "${TAG}y" mtu "$mtu" up

    ip netns exec "$NS_A" "$BIN" --listen "10.77.0.1:$PORT" >"/tmp/$TAG.server" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 50); do
        grep -q '^listening' "/tmp/$TAG.server" 2>/dev/null && break
        sleep 0.1
    done
    fingerprint=$(sed -n 's/^fingerprint //p' "/tmp/$TAG.server")
    [ -n "$fingerprint" ] || { cat "/tmp/$TAG.server" >&2; exit 1; }

    echo "== veth MTU $mtu"
    ip netns exec "$NS_B" "$BIN" --connect "10.77.0.1:$PORT" --fingerprint "$fingerprint" "$@"
done
