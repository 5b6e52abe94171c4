//! Many connections at once, against the real `sv2-tpd` binary and the mock node: a burst
//! of 1,000 honest clients (every pool and JDC reconnecting after a restart) is served,
//! not cut off by `max_pending_handshakes`; and while one address holds 1,000 silent
//! sockets (and more), a client from another address still gets its template at once.

mod support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use support::daemon_proc::{DaemonProcess, CHILD_PATIENCE};
use support::stream_check::CheckedClient;
use support::tp::{next_tip, prev_hash};
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::admission::{places_per_group, WAITING_PER_PLACE};
use sv2_tpd::sv2::TdpClient;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const CLIENTS: usize = 1_000;

/// One test at a time: each one's thousand connections are the load it measures under.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Raises this process's descriptor limit (which the daemon inherits) to at least
/// `want`: the clients and the daemon's sockets need one each.
fn raise_fd_limit(want: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the kernel to fill in.
    assert_eq!(
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
        0,
        "getrlimit"
    );
    if limit.rlim_cur >= want {
        return;
    }
    limit.rlim_cur = want;
    limit.rlim_max = limit.rlim_max.max(want);
    // SAFETY: as above; raising the hard limit needs root, the soft one does not.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        panic!(
            "cannot raise RLIMIT_NOFILE to {want}: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn start(dir: &tempfile::TempDir) -> (MockNode, DaemonProcess) {
    raise_fd_limit(4 * CLIENTS as u64);
    let socket = dir.path().join("node.sock");
    let node = MockNode::start(&socket, MockOptions::default()).expect("mock starts");
    let daemon = DaemonProcess::start(&socket, &dir.path().join("tpd"), &[]);
    (node, daemon)
}

const REASONS: [&str; 5] = [
    "max_clients",
    "per_ip",
    "evicted",
    "handshake_timeout",
    "handshake_failed",
];

fn refused(m: &support::daemon_proc::Metrics, reason: &str) -> f64 {
    m.value("sv2_tpd_connections_refused_total", &[("reason", reason)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_clients_connecting_at_once_all_get_a_template() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (node, daemon) = start(&dir);
    let (addr, authority) = (daemon.sv2_addr.unwrap(), daemon.authority.unwrap());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            tokio::spawn(async move {
                let c = TdpClient::connect_with_timeout(addr, authority, CHILD_PATIENCE)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let mut c = CheckedClient::new(c);
                c.setup_connection()
                    .await
                    .map_err(|e| format!("SetupConnection: {e}"))?;
                c.send_constraints(100, 10)
                    .await
                    .map_err(|e| format!("constraints: {e}"))?;
                next_tip(&mut c).await;
                Ok::<_, String>((c, started.elapsed()))
            })
        })
        .collect();
    let mut served = Vec::with_capacity(CLIENTS);
    let mut failures = Vec::new();
    for client in clients {
        match client.await {
            Ok(Ok(done)) => served.push(done),
            Ok(Err(e)) => failures.push(e),
            Err(e) => failures.push(format!("client task: {e}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {CLIENTS} clients failed, e.g. {:?}; refused: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)],
        REASONS.map(|r| (r, refused(&daemon.scrape(), r)))
    );
    let mut times: Vec<Duration> = served.iter().map(|(_, t)| *t).collect();
    times.sort();
    let m = daemon.wait_for_metrics("every client set up", |m| {
        m.value("sv2_tpd_clients_connected", &[]) >= CLIENTS as f64
    });
    for reason in REASONS {
        assert_eq!(refused(&m, reason), 0.0, "{reason}: {m:?}");
    }
    // All of them are served from here on: each gets the next tip.
    let mined = node.mine_block();
    for (c, _) in &mut served {
        let (_, p) = next_tip(c).await;
        assert_eq!(prev_hash(&p), mined);
    }
    println!(
        "{CLIENTS} clients at once: first template after {:.0} ms (p50 {:.0} ms, last \
         {:.0} ms), none evicted",
        times[0].as_secs_f64() * 1e3,
        times[CLIENTS / 2].as_secs_f64() * 1e3,
        times[CLIENTS - 1].as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_address_gets_its_template_while_one_holds_a_thousand_silent_sockets() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (_node, daemon) = start(&dir);
    stall_then_serve_another_address(&daemon, 0).await;
    // The silent sockets beyond those that may wait were evicted, the others waited
    // without a setup place.
    let m = daemon.scrape();
    assert_eq!(m.value("sv2_tpd_handshakes_pending", &[]), 0.0, "{m:?}");
    daemon.wait_for_log("newcomers now evict connections of the address with the most");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_address_gets_its_template_while_one_stalls_a_thousand_handshakes() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (_node, daemon) = start(&dir);
    // The first 32 of act 1's 64 bytes: spoken, but not enough to count as heard.
    stall_then_serve_another_address(&daemon, 32).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_address_gets_its_template_while_one_stalls_after_a_whole_act_one() {
    // A whole act 1: these are heard, get setup places (their address half of them) and
    // then stall until `handshake_timeout`.
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let (_node, daemon) = start(&dir);
    stall_then_serve_another_address(&daemon, 64).await;
}

/// 1,100 sockets from 127.0.0.1 (a thousand, and a hundred more than may wait for the 64
/// setup places) each send `bytes` of a Noise act 1 and then nothing; a client from
/// 127.0.0.2 must still get its template within 1 s.
async fn stall_then_serve_another_address(daemon: &DaemonProcess, bytes: usize) {
    let (addr, authority) = (daemon.sv2_addr.unwrap(), daemon.authority.unwrap());
    let stalled_count = CLIENTS + 100;
    let mut stalled = Vec::with_capacity(stalled_count);
    for _ in 0..stalled_count {
        let mut s = TcpStream::connect(addr).await.expect("a stalling socket");
        // The daemon may already have closed this one, or evicted it for a newer one.
        let _ = s.write_all(&vec![0x5a; bytes]).await;
        stalled.push(s);
    }
    // Those holding a setup place do not wait; the rest beyond the list were refused.
    let in_setup = if bytes == 64 { places_per_group(64) } else { 0 };
    let waiting = (64 * WAITING_PER_PLACE + in_setup) as f64;
    daemon.wait_for_metrics("stalled sockets beyond the waiting list refused", |m| {
        refused(m, "evicted") >= stalled_count as f64 - waiting
            && m.value("sv2_tpd_handshakes_pending", &[]) >= in_setup as f64
    });
    let asked = Instant::now();
    let other: IpAddr = "127.0.0.2".parse().unwrap();
    let mut c = CheckedClient::new(
        TdpClient::connect_from(other, addr, authority, CHILD_PATIENCE)
            .await
            .expect("connect from 127.0.0.2"),
    );
    c.setup_connection().await.expect("SetupConnection");
    c.send_constraints(100, 10).await.expect("constraints");
    next_tip(&mut c).await;
    let took = asked.elapsed();
    println!(
        "with {stalled_count} sockets from 127.0.0.1 stalled after {bytes} bytes of act 1, \
         a client from 127.0.0.2 got its template {:.0} ms after connecting",
        took.as_secs_f64() * 1e3
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    drop(stalled);
}
