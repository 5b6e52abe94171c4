#!/usr/bin/env bash
# The container image, built from the repository's Dockerfile with Podman (its FROM
# images are the local ones podman-setup.sh tagged; the Rust toolchain in the builder is
# this machine's) and run as the Dockerfile's header documents, against a real regtest
# node's socket:
#   the authority key is created in the /data volume, a Template Distribution client
#   (`sv2-tpd watch` from the host) gets a template through the published port, the
#   HEALTHCHECK turns healthy, and `podman stop` ends the daemon with exit code 0.
#
#   bash tests/deploy/container-image.sh
# Needs BITCOIN_NODE; run as root (rootful Podman).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

image=localhost/sv2-tpd:ci
work=$(mktemp -d)
name="sv2-tpd-image-$$"
volume="sv2-tpd-data-$$"
cleanup() {
    pm rm -f -v -t 0 "$name" >/dev/null 2>&1 || true
    pm volume rm -f "$volume" >/dev/null 2>&1 || true
    node_stop
    rm -rf "$work"
}
trap cleanup EXIT

# --format docker: the OCI format has no HEALTHCHECK. The build stage's cargo registry
# and target directory are cache mounts, kept by Podman under $SV2TPD_CACHE.
say "podman build -t $image . (the Dockerfile's cargo build --release --locked)"
started=$SECONDS
pm build --format docker --network host -t "$image" "$REPO" >&2
say "image built in $((SECONDS - started))s"
# Earlier builds' images, now untagged, would pile up in the cache (the build cache
# mounts are not images and stay).
pm image prune -f >/dev/null

node_start "$work/bitcoin"
# The node's group: a gid with no name here, standing in for the header's
# "$(getent group bitcoin | cut -d: -f3)".
node_gid=10998
node_share_socket "$node_gid"
sv2_port=$(free_port)
metrics_port=$(free_port)

# The header's docker run, for regtest: its port, and loopback-only ports on the host.
say "podman run (as the Dockerfile's header documents)"
pm run -d --name "$name" \
    --group-add "$node_gid" \
    -v "$volume:/data" \
    -v "$NODE_DATADIR:/bitcoin:ro" \
    -e SV2TPD_CHAIN=regtest \
    -p "127.0.0.1:$sv2_port:18447" -p "127.0.0.1:$metrics_port:9842" \
    "$image" >/dev/null

running() { [ "$(pm inspect -f '{{.State.Running}}' "$name")" = true ]; }
key_made() { pm exec "$name" test -s /data/authority.key; }
wait_for 60 "the authority key in /data" key_made
running || fail "the container exited: $(pm logs "$name" 2>&1)"
key=$(pm exec "$name" sv2-tpd keys show)
say "authority key created: $key"

# Podman runs HEALTHCHECKs from systemd timers, and this machine has no systemd:
# `podman healthcheck run` runs the image's HEALTHCHECK command the same way.
wait_for 90 "the HEALTHCHECK to pass" pm healthcheck run "$name"
health=$(pm inspect -f '{{.State.Health.Status}}' "$name" 2>/dev/null ||
    pm inspect -f '{{.State.Healthcheck.Status}}' "$name")
[ "$health" = healthy ] || fail "health is $health after a passing check"
say "HEALTHCHECK: $health"

messages=$(watch_template "127.0.0.1:$sv2_port" "$key") || fail "no template: $messages"
echo "$messages" | grep -q '"type":"NewTemplate"' || fail "no NewTemplate in: $messages"
echo "$messages" | grep -q '"type":"SetNewPrevHash"' || fail "no SetNewPrevHash in: $messages"
curl -sf "http://127.0.0.1:$metrics_port/metrics" | grep -q '^sv2_tpd_node_connected{node="default"} 1' ||
    fail "metrics not published on 127.0.0.1:$metrics_port"
say "a client got a template through 127.0.0.1:$sv2_port"

say "podman stop"
pm stop -t 30 "$name" >/dev/null
code=$(pm inspect -f '{{.State.ExitCode}}' "$name")
pm logs "$name" >&2 2>&1 | tail -n 5 >&2 || true
[ "$code" = 0 ] || fail "the daemon exited with $code on podman stop"
say "passed (exit code 0 on stop)"
