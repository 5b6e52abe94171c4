//! Several real regtest `bitcoin-node`s behind one sv2-tpd (the real binary): peered and
//! unpeered, one killed with -9 while clients mine, a block found on one node's template
//! reaching both, and a node reached over TCP through `socat`.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use bitcoin::BlockHash;
use serde_json::json;
use support::daemon_proc::{DaemonProcess, Metrics};
use support::tp::*;
use support::BitcoinNode;

/// Starts a node for `test` with `args`, or ends the test when there is none (outside CI).
fn node(test: &str, args: &[&str]) -> Option<BitcoinNode> {
    let Some(binary) = support::bitcoin_node_binary() else {
        support::bitcoin_node::report_skipped(test);
        return None;
    };
    Some(BitcoinNode::start_with_args(&binary, args).expect("bitcoin-node starts"))
}

/// Hands every block of `from` that `to` lacks to `to` (`submitblock`), as a peer would.
fn copy_chain(from: &BitcoinNode, to: &BitcoinNode) {
    let top = from.block_count().expect("height");
    let start = to.block_count().expect("height") + 1;
    for height in start..=top {
        let hash = from.block_hash(height).expect("hash");
        let hex = from
            .rpc("getblock", json!([hash.to_string(), 0]))
            .expect("getblock");
        let answer = to.rpc("submitblock", json!([hex])).expect("submitblock");
        assert!(answer.is_null(), "block {height} taken: {answer}");
    }
    assert_eq!(
        to.best_block_hash().unwrap(),
        from.best_block_hash().unwrap()
    );
}

/// Two nodes on one chain (101 blocks, out of IBD), not peered.
fn two_nodes(test: &str, b_args: &[&str]) -> Option<(BitcoinNode, BitcoinNode)> {
    let a = node(test, &[])?;
    let b = node(test, b_args)?;
    a.generate(101).expect("blocks");
    copy_chain(&a, &b);
    Some((a, b))
}

fn endpoint(name: &str, node: &BitcoinNode) -> String {
    format!("{name}=unix:{}", node.socket_path().display())
}

fn daemon_on(dir: &std::path::Path, nodes: &[String]) -> DaemonProcess {
    let mut args: Vec<&str> = Vec::new();
    for n in nodes {
        args.push("--node");
        args.push(n);
    }
    let daemon = DaemonProcess::start(std::path::Path::new("/nonexistent"), dir, &args);
    daemon.wait_for_health(200);
    daemon
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peered_nodes_blocks_from_either_reach_every_client_once() {
    let Some((a, b)) = two_nodes("peered_nodes", &["-listen=1", "-bind=127.0.0.1"]) else {
        return;
    };
    a.rpc(
        "addnode",
        json!([format!("127.0.0.1:{}", b.p2p_port()), "onetry"]),
    )
    .expect("addnode");
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_on(dir.path(), &[endpoint("a", &a), endpoint("b", &b)]);
    let mut clients = vec![daemon.client().await, daemon.client().await];
    for c in &mut clients {
        next_pair_tip(c).await;
    }
    for round in 0..4 {
        let (miner, other) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let hash = miner.generate_empty().expect("block");
        for c in &mut clients {
            assert_eq!(next_pair_tip(c).await, hash, "round {round}");
        }
        // Both nodes report it before the next block: the second report sends nothing
        // (a second pair for the same tip fails the stream checker).
        let height = miner.block_count().unwrap();
        daemon.wait_for_node_at("a", height);
        daemon.wait_for_node_at("b", height);
        assert_eq!(other.best_block_hash().unwrap(), hash, "peered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpeered_nodes_the_first_to_have_a_block_serves_it_the_second_sends_nothing() {
    let Some((a, b)) = two_nodes("unpeered_first", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_on(dir.path(), &[endpoint("a", &a), endpoint("b", &b)]);
    let mut c = daemon.client().await;
    next_pair_tip(&mut c).await;

    // A block made elsewhere (built on a, not submitted) reaches b first.
    let made = a
        .rpc(
            "generateblock",
            json!([support::op_true_address().to_string(), [], false]),
        )
        .expect("generateblock without submitting");
    let hex = made["hex"].as_str().expect("block hex").to_string();
    let hash: BlockHash = made["hash"].as_str().expect("hash").parse().expect("hash");
    let height = a.block_count().unwrap() + 1;
    let answer = b
        .rpc("submitblock", json!([hex.clone()]))
        .expect("submitblock");
    assert!(answer.is_null(), "b takes it: {answer}");
    assert_eq!(next_pair_tip(&mut c).await, hash);
    let m = daemon.wait_for_node_at("b", height);
    assert!(m.serving("b"), "b built the pair");

    // Then a has it too: nothing new is sent; the next message is the next block's pair.
    let answer = a.rpc("submitblock", json!([hex])).expect("submitblock");
    assert!(answer.is_null(), "a takes it: {answer}");
    let m = daemon.wait_for_node_at("a", height);
    assert!(m.serving("b"));
    let next = b.generate_empty().expect("block");
    assert_eq!(next_pair_tip(&mut c).await, next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_with_the_tip_killed_the_other_serves_the_next_block_at_once() {
    let Some((a, b)) = two_nodes("kill_failover", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_on(dir.path(), &[endpoint("a", &a), endpoint("b", &b)]);
    let mut clients = vec![daemon.client().await, daemon.client().await];
    for c in &mut clients {
        next_pair_tip(c).await;
    }
    // Kill the node that serves (whichever reported the shared start tip first).
    let m = daemon.scrape();
    let (dead, dead_name, alive, alive_name) = match m.serving("a") {
        true => (&a, "a", &b, "b"),
        false => (&b, "b", &a, "a"),
    };
    dead.kill9().expect("kill -9");
    daemon.wait_for_metrics("the dead node down, the other serving", |m| {
        m.value("sv2_tpd_node_connected", &[("node", dead_name)]) == 0.0 && m.serving(alive_name)
    });
    let mined = Instant::now();
    let hash = alive.generate_empty().expect("block");
    for c in &mut clients {
        assert_eq!(next_pair_tip(c).await, hash);
    }
    println!(
        "serving node killed: the other's next block -> the last client's SetNewPrevHash: \
         {:.1} ms (RPC included)",
        mined.elapsed().as_secs_f64() * 1000.0
    );
    assert_eq!(daemon.health(), 200);
    let (_, status) = daemon.http_get("/status");
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    let entry = |name: &str| {
        status["nodes"]
            .as_array()
            .and_then(|n| n.iter().find(|e| e["name"] == name).cloned())
            .expect("node in status")
    };
    assert_eq!(entry(dead_name)["connected"], false, "{status}");
    assert_eq!(entry(alive_name)["serving"], true, "{status}");

    // The node is back (on whatever its disk kept), catches up, and is used again.
    dead.restart().expect("restarts");
    copy_chain(alive, dead);
    daemon.wait_for_metrics("the node back and current", |m| {
        m.value("sv2_tpd_node_connected", &[("node", dead_name)]) == 1.0
            && m.value("sv2_tpd_node_tip_current", &[("node", dead_name)]) == 1.0
    });
    let next = dead.generate_empty().expect("block");
    for c in &mut clients {
        assert_eq!(next_pair_tip(c).await, next);
    }
    let m = daemon.wait_for_node_at(dead_name, dead.block_count().unwrap());
    assert!(m.serving(dead_name), "it serves again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_on_one_nodes_template_lands_in_both_chains_and_counts_once() {
    let Some((a, b)) = two_nodes("solve_both", &[]) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let daemon = daemon_on(dir.path(), &[endpoint("a", &a), endpoint("b", &b)]);
    let mut c = daemon.client().await;
    let (t, p) = next_tip(&mut c).await;
    let (solution, hash) = solve(
        &t,
        &p,
        &build_coinbase(&t, &support::op_true_script(), true),
    );
    c.submit_solution(solution).await.unwrap();
    let accepted = |m: &Metrics, node: &str| {
        m.value(
            "sv2_tpd_node_block_submits_total",
            &[("node", node), ("result", "accepted")],
        )
    };
    let m = daemon.wait_for_metrics("the block in both nodes", |m| {
        m.value("sv2_tpd_blocks_found_total", &[]) == 1.0
            && accepted(m, "a") + accepted(m, "b") == 2.0
    });
    for node in ["a", "b"] {
        assert_eq!(
            m.value(
                "sv2_tpd_node_block_submits_total",
                &[("node", node), ("result", "accepted")]
            ),
            1.0,
            "each node's verdict counted"
        );
    }
    assert_eq!(a.best_block_hash().unwrap(), hash);
    assert_eq!(b.best_block_hash().unwrap(), hash);
    let log = daemon.log_text();
    assert!(log.contains("block accepted by the node"), "a's verdict");
    assert!(log.contains("the node has the block"), "b's verdict");
    assert_eq!(next_pair_tip(&mut c).await, hash, "one pair for it");
}

/// `socat` forwarding a loopback TCP port to a unix socket; killed on drop.
struct Tunnel(Child);

impl Drop for Tunnel {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reached_over_tcp_through_socat_works_like_a_unix_socket_node() {
    let Some(a) = node("tcp_node", &[]) else {
        return;
    };
    a.generate(101).expect("blocks");
    let port = support::bitcoin_node::free_local_port().expect("port");
    let child = Command::new("socat")
        .arg(format!(
            "TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,nodelay"
        ))
        .arg(format!("UNIX-CONNECT:{}", a.socket_path().display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("socat runs (apt-get install socat)");
    let _tunnel = Tunnel(child);
    let dir = tempfile::tempdir().unwrap();
    // The daemon retries until socat listens.
    let daemon = daemon_on(dir.path(), &[format!("far=tcp:127.0.0.1:{port}")]);
    let mut c = daemon.client().await;
    assert_eq!(next_pair_tip(&mut c).await, a.best_block_hash().unwrap());
    let started = Instant::now();
    let hash = a.generate_empty().expect("block");
    let (t, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), hash);
    println!(
        "over TCP: new block -> SetNewPrevHash {:.1} ms (RPC included)",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let (solution, found) = solve(
        &t,
        &p,
        &build_coinbase(&t, &support::op_true_script(), true),
    );
    c.submit_solution(solution).await.unwrap();
    daemon.wait_for_metrics("the block found over TCP", |m| {
        m.value("sv2_tpd_blocks_found_total", &[]) == 1.0
    });
    assert_eq!(a.best_block_hash().unwrap(), found);
    let m = daemon.scrape();
    assert_eq!(m.value("sv2_tpd_node_connected", &[("node", "far")]), 1.0);
}
