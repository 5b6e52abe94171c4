#!/usr/bin/env bash
# Builds Bitcoin Core's `bitcoin-node` with IPC enabled from the source vendored in the
# crates.io package libbitcoinkernel-sys 0.4.1 (Bitcoin Core 31.99), into a cache outside
# the repository, and prints the binary's path on stdout.
#
# Reuses the cached binary when present. BITCOIN_NODE=/path overrides everything (for
# example an official release binary). Needs: cmake libboost-dev libevent-dev capnproto
# libcapnp-dev pkg-config (installed by .ci/run) and cargo (to fetch the crate).
set -euo pipefail

if [[ -n "${BITCOIN_NODE:-}" ]]; then
  [[ -x "$BITCOIN_NODE" ]] || { echo "BITCOIN_NODE=$BITCOIN_NODE is not executable" >&2; exit 1; }
  echo "$BITCOIN_NODE"
  exit 0
fi

version=0.4.1
cache="${SV2TPD_CACHE:-$HOME/.cache/sv2-tpd}/bitcoin-node-kernel-sys-$version"
bin="$cache/bin/bitcoin-node"
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

log() { echo "build-bitcoin-node: $*" >&2; }

# Fetch the crate through cargo (the registry is the only source we can reach).
fetch_dir="$cache/fetch"
mkdir -p "$fetch_dir/src"
cat > "$fetch_dir/Cargo.toml" <<TOML
[package]
name = "fetch-bitcoin-source"
version = "0.0.0"
edition = "2021"
publish = false
[dependencies]
libbitcoinkernel-sys = "=$version"
TOML
echo "fn main() {}" > "$fetch_dir/src/main.rs"
log "fetching libbitcoinkernel-sys $version"
(cd "$fetch_dir" && cargo fetch --quiet >&2)
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/libbitcoinkernel-sys-$version/bitcoin | head -n 1)
[[ -f "$src/CMakeLists.txt" ]] || { log "Bitcoin Core source not found in the cargo registry"; exit 1; }

build="$cache/build"
jobs=$(nproc)
log "configuring $src (this takes ~25 min on 2 cores the first time)"
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release \
  -DENABLE_IPC=ON -DENABLE_WALLET=OFF -DWITH_EMBEDDED_ASMAP=OFF -DBUILD_TESTS=OFF \
  -DBUILD_GUI=OFF -DBUILD_BENCH=OFF -DBUILD_FUZZ_BINARY=OFF -DBUILD_CLI=OFF \
  -DBUILD_TX=OFF -DBUILD_UTIL=OFF -DBUILD_WALLET_TOOL=OFF -DWITH_ZMQ=OFF >&2
cmake --build "$build" --target bitcoin-node -j "$jobs" >&2
mkdir -p "$cache/bin"
cp "$(find "$build" -type f -name bitcoin-node -perm -u+x | head -n 1)" "$bin.tmp"
mv "$bin.tmp" "$bin"
log "built $bin"
echo "$bin"
