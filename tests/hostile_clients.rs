//! Hostile clients at the connection layer, against the real `sv2-tpd` binary and the mock
//! node: silent sockets beyond `max_clients`, random bytes, a frame header announcing 16 MB,
//! and garbage after a valid handshake. In each case a pool connected beside them keeps
//! getting every new tip, a newcomer pool still gets in, and the daemon's memory stays
//! bounded. The figures printed here are the ones in docs/robustness.md.

mod support;

use std::time::{Duration, Instant};

use support::daemon_proc::{DaemonProcess, CHILD_PATIENCE};
use support::stream_check::CheckedClient;
use support::tp::{closed_by_server, next_tip, prev_hash};
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::admission::WAITING_PER_PLACE;
use sv2_tpd::sv2::TdpClient;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MAX_CLIENTS: usize = 50;
const MAX_PENDING: usize = 16;
/// Memory the attacks below may add to the daemon; far above what they cost, far below
/// what an unbounded buffer per connection would.
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// Mines a block and checks every pool gets its tip.
async fn every_pool_gets_the_next_tip(node: &MockNode, pools: &mut [&mut CheckedClient]) {
    let mined = node.mine_block();
    for pool in pools.iter_mut() {
        let (_, p) = next_tip(pool).await;
        assert_eq!(prev_hash(&p), mined);
    }
}

/// Bytes from a small deterministic generator.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Waits (bounded) until the server closes `socket`.
async fn socket_closed_by_server(socket: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + CHILD_PATIENCE;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(200), socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_do_not_cost_a_pool_its_tips() {
    let dir = tempfile::tempdir().unwrap();
    let node = MockNode::start(&dir.path().join("node.sock"), MockOptions::default()).unwrap();
    let max_clients = MAX_CLIENTS.to_string();
    let max_pending = MAX_PENDING.to_string();
    let daemon = DaemonProcess::start(
        node.socket_path(),
        &dir.path().join("tpd"),
        &[
            "--max-clients",
            &max_clients,
            "--max-pending-handshakes",
            &max_pending,
            "--handshake-timeout",
            "5",
        ],
    );
    let addr = daemon.sv2_addr.unwrap();
    let mut steady = daemon.client().await;
    next_tip(&mut steady).await;
    let rss_before = daemon.rss_kib();

    // 1. max_clients + 300 silent TCP connections: more than may wait for the
    // max_pending setup places (16 each).
    let mut silent = Vec::new();
    for _ in 0..MAX_CLIENTS + 300 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let asked = Instant::now();
    let mut newcomer = daemon.client().await;
    next_tip(&mut newcomer).await;
    let newcomer_latency = asked.elapsed();
    every_pool_gets_the_next_tip(&node, &mut [&mut steady, &mut newcomer]).await;
    let waiting = (MAX_PENDING * WAITING_PER_PLACE) as f64;
    let evicted = daemon.wait_for_metrics("evictions", |m| {
        m.value(
            "sv2_tpd_connections_refused_total",
            &[("reason", "evicted")],
        ) >= silent.len() as f64 - waiting
    });
    assert!(evicted.value("sv2_tpd_handshakes_pending", &[]) <= MAX_PENDING as f64);
    let rss_silent = daemon.rss_kib();

    // 2. Random bytes, and 3. a frame header announcing 16 MB, before any handshake.
    let mut raw = Vec::new();
    for i in 0..20 {
        let mut socket = TcpStream::connect(addr).await.unwrap();
        let bytes = if i % 2 == 0 {
            noise(i, 4096)
        } else {
            let mut header = vec![0, 0, 0x76, 0xff, 0xff, 0xff];
            header.extend(noise(i, 1024));
            header
        };
        // The server may close first.
        let _ = socket.write_all(&bytes).await;
        raw.push(socket);
    }
    for socket in &mut raw {
        assert!(
            socket_closed_by_server(socket).await,
            "a garbage connection stayed open"
        );
    }

    // 4. A valid handshake and setup, then garbage (unencrypted, and a 16 MB header).
    for i in 0..10u64 {
        let mut bad = CheckedClient::new(
            TdpClient::connect(addr, daemon.authority.unwrap())
                .await
                .unwrap(),
        );
        bad.setup_connection().await.unwrap();
        if i % 2 == 0 {
            bad.send_constraints(100, 10).await.unwrap();
        }
        let mut bytes = vec![0, 0, 0x70, 0xff, 0xff, 0xff];
        bytes.extend(noise(i + 100, 70_000));
        let _ = bad.send_raw_bytes(&bytes).await;
        assert!(
            closed_by_server(&mut bad).await,
            "garbage after the handshake was not refused"
        );
    }

    // Through all of it, both pools got every tip, and still do.
    every_pool_gets_the_next_tip(&node, &mut [&mut steady, &mut newcomer]).await;
    every_pool_gets_the_next_tip(&node, &mut [&mut steady, &mut newcomer]).await;
    let rss_after = daemon.rss_kib();
    let m = daemon.scrape();
    assert_eq!(m.value("sv2_tpd_clients_connected", &[]), 2.0, "{m:?}");
    eprintln!(
        "hostile connections: newcomer pool's first template after {:.0} ms with {} silent \
         sockets open; RSS {rss_before} KiB before, {rss_silent} KiB with the silent \
         sockets, {rss_after} KiB after all cases; refused {:?}",
        newcomer_latency.as_secs_f64() * 1000.0,
        silent.len(),
        [
            "max_clients",
            "per_ip",
            "evicted",
            "handshake_timeout",
            "handshake_failed"
        ]
        .map(|r| m.value("sv2_tpd_connections_refused_total", &[("reason", r)]) as u64),
    );
    assert!(
        rss_after < rss_before + RSS_BOUND_KIB,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    // Refusals are summed up, not logged one line each.
    let warnings = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\""))
        .count();
    assert!(
        warnings < 30,
        "{warnings} warning lines for {} hostile connections",
        silent.len() + raw.len() + 10
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_ip_cap_is_off_for_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let node = MockNode::start(&dir.path().join("node.sock"), MockOptions::default()).unwrap();
    let daemon = DaemonProcess::start(
        node.socket_path(),
        &dir.path().join("tpd"),
        &["--max-clients-per-ip", "1"],
    );
    let mut a = daemon.client().await;
    let mut b = daemon.client().await;
    next_tip(&mut a).await;
    next_tip(&mut b).await;
    every_pool_gets_the_next_tip(&node, &mut [&mut a, &mut b]).await;
}
