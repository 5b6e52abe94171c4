# Shared by the scripts in tests/deploy/: the Podman set-up they run in, a regtest
# bitcoin-node, and waiting for conditions. Sourced, not run.
#
# Everything persistent lives under $SV2TPD_CACHE (default ~/.cache/sv2-tpd): Podman's
# image store and build cache, the base root file systems, cargo-deb.

SV2TPD_CACHE="${SV2TPD_CACHE:-$HOME/.cache/sv2-tpd}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PODMAN_DIR="$SV2TPD_CACHE/podman"
# The Debian release of the Dockerfile's FROM lines and of the systemd test's base.
DEBIAN_SUITE=bookworm
SYSTEMD_IMAGE=localhost/sv2-tpd-ci/debian-systemd:$DEBIAN_SUITE

say() { echo "[$(date -u +%H:%M:%S) ${0##*/}] $*" >&2; }
fail() {
    say "FAILED: $*"
    exit 1
}

# Podman with this repository's configuration (containers.conf, storage.conf written by
# podman-setup.sh) instead of the machine's.
pm() {
    CONTAINERS_CONF="$PODMAN_DIR/containers.conf" \
        CONTAINERS_STORAGE_CONF="$PODMAN_DIR/storage.conf" \
        TMPDIR="$PODMAN_DIR/tmp" podman "$@"
}

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every half second until it succeeds;
# fails after SECONDS (a bound for a broken set-up, not a timing assumption).
wait_for() {
    local limit="$1" what="$2"
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "gave up after ${limit}s waiting for $what"
        sleep 0.5
    done
}

# A free TCP port on 127.0.0.1.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- regtest bitcoin-node -------------------------------------------------------------

# node_start DATADIR: starts $BITCOIN_NODE on regtest with its IPC socket at
# DATADIR/regtest/node.sock and RPC on a free loopback port, and mines one block (a
# fresh chain is in initial block download, for which the daemon has no template).
node_start() {
    NODE_DATADIR="$1"
    [ -x "${BITCOIN_NODE:-}" ] || fail "BITCOIN_NODE (${BITCOIN_NODE:-unset}) is not an executable"
    mkdir -p "$NODE_DATADIR"
    NODE_RPC_PORT=$(free_port)
    "$BITCOIN_NODE" -regtest -datadir="$NODE_DATADIR" -ipcbind=unix -server \
        -rpcbind=127.0.0.1 -rpcallowip=127.0.0.1 -rpcport="$NODE_RPC_PORT" \
        -port="$(free_port)" -listen=0 -connect=0 -printtoconsole=0 \
        >"$NODE_DATADIR/stdout.log" 2>&1 &
    NODE_PID=$!
    wait_for 120 "the node's RPC" node_rpc getblockchaininfo
    wait_for 60 "the node's IPC socket" test -S "$(node_socket)"
    local descriptor
    descriptor=$(node_rpc getdescriptorinfo '["raw(51)"]' | jq -r .descriptor)
    node_rpc generatetodescriptor "[1, \"$descriptor\"]" >/dev/null
    say "bitcoin-node $NODE_PID: regtest at height $(node_rpc getblockcount), socket $(node_socket)"
}

node_socket() { echo "$NODE_DATADIR/regtest/node.sock"; }

# node_rpc METHOD [JSON_PARAMS]: the call's result, as JSON.
node_rpc() {
    local cookie
    cookie=$(cat "$NODE_DATADIR/regtest/.cookie") || return 1
    curl -sf --user "$cookie" -H 'content-type: application/json' \
        --data "{\"jsonrpc\":\"1.0\",\"id\":0,\"method\":\"$1\",\"params\":${2:-[]}}" \
        "http://127.0.0.1:$NODE_RPC_PORT/" | jq -ce .result
}

# Mines one block to OP_TRUE, so the daemon sends a new tip.
node_mine() {
    local descriptor
    descriptor=$(node_rpc getdescriptorinfo '["raw(51)"]' | jq -r .descriptor)
    node_rpc generatetodescriptor "[1, \"$descriptor\"]" >/dev/null
}

node_stop() {
    [ -n "${NODE_PID:-}" ] || return 0
    node_rpc stop >/dev/null 2>&1 || kill "$NODE_PID" 2>/dev/null || true
    wait "$NODE_PID" 2>/dev/null || true
    NODE_PID=
}

# Opens the node's socket (and the regtest directory holding it) to group GID, as
# deploy/bitcoind.service.d/sv2-tpd-socket.conf does for the `bitcoin` group.
node_share_socket() {
    local gid="$1"
    chgrp "$gid" "$NODE_DATADIR" "$NODE_DATADIR/regtest" "$(node_socket)"
    chmod g+x "$NODE_DATADIR" "$NODE_DATADIR/regtest"
    chmod g+rw "$(node_socket)"
}

# watch_template ADDR KEY: one NewTemplate and its SetNewPrevHash from the Template
# Provider at ADDR (authority public key KEY), as a pool receives them; prints them.
watch_template() {
    local sv2_tpd="${SV2_TPD_TEST_BIN:-$REPO/target/debug/sv2-tpd}"
    timeout 60 "$sv2_tpd" watch --tp "$1" --authority "$2" --json --count 2
}
