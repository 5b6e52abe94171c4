#!/usr/bin/env bash
# Builds the Debian package (metadata in Cargo.toml, [package.metadata.deb]) and prints
# the path of the .deb. cargo-deb comes from tests/install-cargo-deb.sh's cache.
#
#   bash tests/build-deb.sh [BINARY]
# BINARY is a release build of sv2-tpd to package (CI passes the one the Dockerfile
# built); without it, `cargo build --release --locked` makes one, in a target directory
# kept under $SV2TPD_CACHE so that only sv2-tpd itself recompiles from one run to the
# next.
#
# Staged under target/deb-assets/ first, from the binary and deploy/:
#   units/sv2-tpd.service   deploy/sv2-tpd.service running /usr/bin/sv2-tpd
#   units/sv2-tpd.sysusers  deploy/sv2-tpd.sysusers (cargo-deb adds systemd-sysusers
#                           to the postinst)
#   completions for bash, zsh and fish, and the manual page, from the binary itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

cargo_deb=$(bash tests/install-cargo-deb.sh)
cache="${SV2TPD_CACHE:-$HOME/.cache/sv2-tpd}"
if [ -n "${1:-}" ]; then
    # cargo-deb packages <target dir>/release/sv2-tpd: a staging target directory.
    export CARGO_TARGET_DIR="$cache/deb-staging"
    mkdir -p "$CARGO_TARGET_DIR/release"
    install -m 0755 "$1" "$CARGO_TARGET_DIR/release/sv2-tpd"
else
    export CARGO_TARGET_DIR="$cache/deb-target"
    cargo build --release --locked --bin sv2-tpd >&2
fi
binary="$CARGO_TARGET_DIR/release/sv2-tpd"

assets=target/deb-assets
rm -rf "$assets"
mkdir -p "$assets/units"
sed '/^ExecStart=/s#/usr/local/bin/sv2-tpd#/usr/bin/sv2-tpd#' deploy/sv2-tpd.service \
    >"$assets/units/sv2-tpd.service"
grep -q '^ExecStart=/usr/bin/sv2-tpd ' "$assets/units/sv2-tpd.service" ||
    { echo "build-deb: the unit's ExecStart= was not rewritten" >&2; exit 1; }
cp deploy/sv2-tpd.sysusers "$assets/units/sv2-tpd.sysusers"
"$binary" completions bash >"$assets/sv2-tpd.bash"
"$binary" completions zsh >"$assets/_sv2-tpd"
"$binary" completions fish >"$assets/sv2-tpd.fish"
"$binary" man | gzip -9n >"$assets/sv2-tpd.1.gz"

out="$CARGO_TARGET_DIR/debian"
mkdir -p "$out"
deb=$("$cargo_deb" --no-build --fast --output "$out" | tail -n 1)
[ -f "$deb" ] || { echo "build-deb: cargo-deb printed no package path ($deb)" >&2; exit 1; }
echo "$deb"
