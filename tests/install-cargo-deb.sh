#!/usr/bin/env bash
# Installs cargo-deb (which builds the Debian package, see tests/build-deb.sh) into a
# cache outside the repository and prints the path of its binary. An installed binary
# of the same version is reused, so only the first run compiles it (about 2 minutes on
# 2 cores).
set -euo pipefail

version=3.8.0
root="${SV2TPD_CACHE:-$HOME/.cache/sv2-tpd}/cargo-deb-$version"
if [ ! -x "$root/bin/cargo-deb" ]; then
    if ! cargo install --locked --root "$root" --target-dir "$root/target" \
        cargo-deb --version "=$version" >&2; then
        echo "install-cargo-deb: cargo install cargo-deb $version failed" >&2
        exit 1
    fi
    rm -rf "$root/target"
fi
echo "$root/bin/cargo-deb"
