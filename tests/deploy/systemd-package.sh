#!/usr/bin/env bash
# The Debian package under real systemd: a container with systemd as its init (the
# local Debian image from podman-setup.sh; --privileged, without which systemd cannot
# set up the unit's namespaces: 226/NAMESPACE), the package installed with dpkg -i, the
# regtest node's socket directory mounted where Bitcoin Core's unit keeps it
# (/var/lib/bitcoind), and then the README's steps:
#   the chain set in /etc/sv2-tpd/sv2-tpd.toml, `systemctl start sv2-tpd` -> active,
#   a Template Distribution client (`sv2-tpd watch`, from the host through the
#   published loopback port) gets a template, `systemctl stop` -> a clean exit (status
#   0), `systemd-analyze security sv2-tpd` printed, a purge that keeps the key, and
#   one with SV2TPD_PURGE_KEYS=yes that does not.
#
#   bash tests/deploy/systemd-package.sh [PACKAGE.deb]    (default: tests/build-deb.sh)
# Needs BITCOIN_NODE; run as root (rootful Podman).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

deb=$(realpath "${1:-$(bash "$REPO/tests/build-deb.sh")}")
[ -f "$deb" ] || fail "no package at $deb"
work=$(mktemp -d)
name="sv2-tpd-systemd-$$"
cleanup() {
    pm rm -f -v -t 0 "$name" >/dev/null 2>&1 || true
    node_stop
    rm -rf "$work"
}
trap cleanup EXIT

node_start "$work/bitcoin"
sv2_port=$(free_port)
inside() { pm exec "$name" "$@"; }

say "starting systemd in $SYSTEMD_IMAGE"
pm run -d --name "$name" --privileged --systemd=always \
    -v "$deb:/tmp/sv2-tpd.deb:ro" \
    -v "$NODE_DATADIR/regtest:/var/lib/bitcoind/regtest" \
    -p "127.0.0.1:$sv2_port:18447" \
    "$SYSTEMD_IMAGE" >/dev/null
booted() { [[ "$(inside systemctl is-system-running)" =~ ^(running|degraded)$ ]]; }
wait_for 120 "systemd to boot" booted

# Bitcoin Core's user and group, which the unit joins (SupplementaryGroups=bitcoin),
# and the node's socket opened to that group as deploy/bitcoind.service.d does.
inside groupadd --system bitcoin
node_share_socket "$(inside getent group bitcoin | cut -d: -f3)"

say "dpkg -i $(basename "$deb")"
inside dpkg -i /tmp/sv2-tpd.deb >&2
inside id sv2-tpd >&2
owner=$(inside stat -c '%U:%G %a' /etc/sv2-tpd /etc/sv2-tpd/sv2-tpd.toml | tr '\n' ' ')
[ "$owner" = "root:sv2-tpd 750 root:sv2-tpd 640 " ] ||
    fail "configuration directory and file are $owner, not root:sv2-tpd 750 and 640"
inside test -f /usr/share/man/man1/sv2-tpd.1.gz
inside test -f /usr/share/bash-completion/completions/sv2-tpd

# The README's configuration step: the chain, and (in a container, for the published
# port) the SV2 address.
inside sed -i 's/^chain = "main"$/chain = "regtest"/' /etc/sv2-tpd/sv2-tpd.toml
inside sh -c 'echo "sv2_bind = \"0.0.0.0\"" >>/etc/sv2-tpd/sv2-tpd.toml'

say "systemctl enable --now sv2-tpd"
inside systemctl enable --now sv2-tpd
wait_for 60 "the authority key" inside test -s /var/lib/sv2-tpd/authority.key
inside systemctl is-active sv2-tpd >/dev/null || fail "sv2-tpd is not active: $(inside systemctl status sv2-tpd)"
key=$(inside sv2-tpd --config /etc/sv2-tpd/sv2-tpd.toml --datadir /var/lib/sv2-tpd keys show)
key_mode=$(inside stat -c '%U %a' /var/lib/sv2-tpd/authority.key)
[ "$key_mode" = "sv2-tpd 600" ] || fail "authority key is $key_mode, not sv2-tpd 600"

healthy() { inside sv2-tpd --config /etc/sv2-tpd/sv2-tpd.toml status; }
wait_for 60 "sv2-tpd status to report healthy" healthy
messages=$(watch_template "127.0.0.1:$sv2_port" "$key") || fail "no template from the unit: $messages"
echo "$messages" | grep -q '"type":"NewTemplate"' || fail "no NewTemplate in: $messages"
echo "$messages" | grep -q '"type":"SetNewPrevHash"' || fail "no SetNewPrevHash in: $messages"
say "a client got a template through 127.0.0.1:$sv2_port"

say "systemctl stop sv2-tpd"
inside systemctl stop sv2-tpd
result=$(inside systemctl show -p Result -p ExecMainStatus -p ActiveState --value sv2-tpd | tr '\n' ' ')
[ "$result" = "success 0 inactive " ] || fail "after stop: Result, status, state = $result"
say "stopped cleanly (Result=success, exit status 0)"
journal=$(inside journalctl -u sv2-tpd --no-pager -o cat)
echo "$journal" >&2
# A hardening directive the container's kernel or mounts cannot honour is logged by
# systemd (and with most, the unit fails to start); none may be.
if echo "$journal" | grep -iE 'not supported|ignoring|failed to (set up|apply)'; then
    fail "systemd could not apply every directive of the unit (lines above)"
fi
say "every hardening directive of the unit applied inside the container"

echo "--- systemd-analyze security sv2-tpd"
inside systemd-analyze security --no-pager sv2-tpd
score=$(inside systemd-analyze security --no-pager sv2-tpd | grep -o 'Overall exposure level for sv2-tpd.service: .*')
echo "systemd-analyze security: $score"

say "dpkg --purge sv2-tpd (without SV2TPD_PURGE_KEYS)"
inside dpkg --purge sv2-tpd >&2
inside test -s /var/lib/sv2-tpd/authority.key || fail "purge removed the authority key"
if inside test -e /etc/sv2-tpd; then fail "purge left /etc/sv2-tpd"; fi
say "dpkg -i, then SV2TPD_PURGE_KEYS=yes dpkg --purge sv2-tpd"
inside dpkg -i /tmp/sv2-tpd.deb >/dev/null
inside env SV2TPD_PURGE_KEYS=yes dpkg --purge sv2-tpd >&2
if inside test -e /var/lib/sv2-tpd; then fail "SV2TPD_PURGE_KEYS=yes kept /var/lib/sv2-tpd"; fi
say "passed"
