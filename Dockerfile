# syntax=docker/dockerfile:1
#
# sv2-tpd container image.
#
#   docker build -t sv2-tpd .
#   docker run -d --name sv2-tpd \
#     --group-add "$(getent group bitcoin | cut -d: -f3)" \
#     -v sv2-tpd-data:/data \
#     -v /var/lib/bitcoind:/bitcoin:ro \
#     -e SV2TPD_CHAIN=main \
#     -p 8442:8442 -p 127.0.0.1:9842:9842 \
#     sv2-tpd
#
# The container runs as the image's user sv2-tpd (uid 10001), which owns /data: the
# authority key is created there on first start, and a new named volume starts with
# that ownership. /data holds our keys and, optionally, /data/sv2-tpd.toml (a bind
# mount for /data must be writable by uid 10001).
#
# /bitcoin is the node's data directory (its IPC socket is <chain dir>/node.sock).
# --group-add gives the container the node's group, to which the drop-in in
# deploy/bitcoind.service.d/ opens the socket (and the test chains' sub-directory).
#
# The SV2TPD_* variables below make the ports reachable from outside the container;
# environment variables win over the config file, so change them with -e.

FROM rust:1-bookworm AS builder
WORKDIR /build
COPY Cargo.toml Cargo.lock ./
COPY .cargo ./.cargo
COPY schema ./schema
COPY src ./src
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked --bin sv2-tpd \
    && install -m 0755 target/release/sv2-tpd /usr/local/bin/sv2-tpd

FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 sv2-tpd \
    && useradd --system --uid 10001 --gid sv2-tpd --home-dir /data --no-create-home \
       --shell /usr/sbin/nologin sv2-tpd \
    && install -d -o sv2-tpd -g sv2-tpd -m 0700 /data \
    && install -d -m 0755 /bitcoin
COPY --from=builder /usr/local/bin/sv2-tpd /usr/local/bin/sv2-tpd

ENV SV2TPD_DATADIR=/data \
    SV2TPD_BITCOIN_DATADIR=/bitcoin \
    SV2TPD_SV2_BIND=0.0.0.0 \
    SV2TPD_METRICS_BIND=0.0.0.0:9842

USER sv2-tpd
VOLUME ["/data", "/bitcoin"]
# `sv2-tpd status` asks the daemon on its metrics address and exits 1 unless the node is
# connected and a current template exists (the same test as GET /health).
HEALTHCHECK --interval=30s --timeout=10s --start-period=2m --retries=3 \
    CMD ["/usr/local/bin/sv2-tpd", "status"]
# Stratum V2 (main, testnet4, signet, regtest) and metrics.
EXPOSE 8442 48442 38442 18447 9842
ENTRYPOINT ["/usr/local/bin/sv2-tpd"]
CMD ["run"]
