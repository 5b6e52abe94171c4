//! Several nodes (real node only): how much sooner miners hear of a block when the daemon
//! follows a second node that hears of blocks first. Two unpeered regtest nodes on one
//! chain; each block is built off both (`generateblock` without submitting), handed to
//! B, and to A 100 ms later. Two daemons run side by side on the same blocks: one on A
//! alone, one on A and B; each has one client, timed from the hand-over to B until its
//! `SetNewPrevHash` for the block.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bitcoin::BlockHash;
use serde_json::json;
use sv2_tpd::sv2::TdpMessage;
use tokio::sync::mpsc;

use crate::support::tp::{client_at, next_tip, prev_hash};
use crate::support::BitcoinNode;
use crate::{ms, pct, spawn_listener, DaemonProcess};

/// How long after B node A gets each block.
const LAG: Duration = Duration::from_millis(100);

/// Quiet time before each round, so the previous block's templates are done.
const QUIET: Duration = Duration::from_millis(300);

fn start_node() -> anyhow::Result<BitcoinNode> {
    let binary = crate::support::bitcoin_node_binary().context("no bitcoin-node")?;
    Ok(BitcoinNode::start_with_args(&binary, &["-checkmempool=0"])?)
}

fn submit(node: &BitcoinNode, hex: &str) -> anyhow::Result<()> {
    let answer = node.rpc("submitblock", json!([hex]))?;
    if !answer.is_null() {
        bail!("submitblock: {answer}");
    }
    Ok(())
}

/// Runs the comparison over `rounds` blocks and adds its table to `report`.
pub async fn run(report: &mut String, dir: &Path, rounds: usize) -> anyhow::Result<()> {
    let (a, b) = (start_node()?, start_node()?);
    a.generate(101)?;
    for height in 1..=a.block_count()? {
        let hash = a.block_hash(height)?;
        submit(
            &b,
            a.rpc("getblock", json!([hash.to_string(), 0]))?
                .as_str()
                .unwrap_or(""),
        )?;
    }
    let entry =
        |name: &str, node: &BitcoinNode| format!("{name}=unix:{}", node.socket_path().display());
    let settings = |nodes: String| format!("template_interval=600,nodes={nodes}");
    let only_a = DaemonProcess::start(
        &a.socket_path(),
        &dir.join("nodes-a"),
        &settings(entry("a", &a)),
    )?;
    let both = DaemonProcess::start(
        &a.socket_path(),
        &dir.join("nodes-ab"),
        &settings(format!("{};{}", entry("a", &a), entry("b", &b))),
    )?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for (i, daemon) in [&only_a, &both].into_iter().enumerate() {
        let mut c = client_at(daemon.addr, daemon.key, 100, 10).await;
        next_tip(&mut c).await;
        handles.push(spawn_listener(c, i, tx.clone()).await);
    }
    let mut figures = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        tokio::time::sleep(QUIET).await;
        while rx.try_recv().is_ok() {}
        let made = a.rpc(
            "generateblock",
            json!([
                crate::support::op_true::op_true_address().to_string(),
                [],
                false
            ]),
        )?;
        let hex = made["hex"].as_str().context("block hex")?.to_string();
        let hash: BlockHash = made["hash"].as_str().context("block hash")?.parse()?;
        let started = Instant::now();
        submit(&b, &hex)?;
        let to_a = async {
            tokio::time::sleep_until(tokio::time::Instant::from_std(started + LAG)).await;
            submit(&a, &hex)
        };
        let heard = async {
            let mut at = [None, None];
            while at.iter().any(Option::is_none) {
                let (i, when, msg) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                    .await
                    .context("no SetNewPrevHash for the block")?
                    .context("listeners ended")?;
                if let TdpMessage::SetNewPrevHash(p) = msg {
                    if prev_hash(&p) == hash && at[i].is_none() {
                        at[i] = Some(when.duration_since(started));
                    }
                }
            }
            anyhow::Ok(at)
        };
        let (sent, at) = tokio::join!(to_a, heard);
        sent?;
        for (figures, at) in figures.iter_mut().zip(at?) {
            figures.extend(at);
        }
    }
    for h in handles {
        h.abort();
    }
    writeln!(
        report,
        "\n### Several nodes: each block reaches node B {} ms before node A ({rounds} rounds, bitcoin-node 31.99, unpeered)\n",
        LAG.as_millis()
    )?;
    writeln!(
        report,
        "| daemon | new block at B → SetNewPrevHash p50 | p99 |\n|---|---:|---:|"
    )?;
    for (name, samples) in ["node A alone", "nodes A + B"]
        .iter()
        .zip(figures.iter_mut())
    {
        samples.sort();
        writeln!(
            report,
            "| {name} | {} | {} |",
            ms(pct(samples, 0.5)),
            ms(pct(samples, 0.99))
        )?;
    }
    Ok(())
}
