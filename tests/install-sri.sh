#!/usr/bin/env bash
# Installs the Stratum Reference Implementation peers used by tests/interop_pool.rs and
# tests/interop_jdc.rs:
#   - pool_sv2 0.7.0 (the SRI pool, a Template Distribution client of sv2-tpd; with its
#     embedded JDS, the upstream of the JDC that falls back to solo mining)
#   - jd_client_sv2 0.6.0 (the SRI job-declaration client; solo mining on sv2-tpd templates)
#   - mining_device from integration_tests_sv2 0.6.0 (the SRI CPU miner, an SV2 mining client)
# into a cache outside the repository, and prints the directory holding the binaries.
#
# Already-installed binaries are reused: cargo install skips a crate whose recorded
# version and features match. The build directory is kept in the cache too, so a rebuild
# after a toolchain change only recompiles what changed.
#
# Debug profile on purpose: compiling is the slow part on small CI machines, and regtest
# difficulty is low enough that an unoptimised CPU miner still finds blocks quickly.
set -euo pipefail

cache="${SV2TPD_CACHE:-$HOME/.cache/sv2-tpd}/sri"
root="$cache"
target_dir="$cache/target"
mkdir -p "$root/bin"

install_one() {
    local crate="$1" version="$2"
    shift 2
    if ! cargo install --locked --debug \
        --root "$root" --target-dir "$target_dir" \
        "$crate" --version "=$version" "$@" >&2; then
        echo "install-sri: cargo install $crate $version failed" >&2
        exit 1
    fi
}

install_one pool_sv2 0.7.0 --bin pool_sv2
install_one jd_client_sv2 0.6.0 --bin jd_client_sv2
install_one integration_tests_sv2 0.6.0 --bin mining_device

for bin in pool_sv2 jd_client_sv2 mining_device; do
    if [ ! -x "$root/bin/$bin" ]; then
        echo "install-sri: $root/bin/$bin missing after install" >&2
        exit 1
    fi
done

echo "$root/bin"
