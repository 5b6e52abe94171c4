//! The full-mempool part of the benchmark (real node only): how long miners hash on the
//! old tip when the node's mempool is large, with tip-first on and off, and what a
//! Template Provider costs the node in template builds.
//!
//! Blocks are mined with `generateblock` and an empty transaction list, so the mempool
//! keeps its transactions and every new tip needs a full selection. The node runs with
//! `-debug=bench`: its own log tells how long each `CreateNewBlock` took and how many it
//! made, for any Template Provider.

use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bitcoin::BlockHash;
use key_utils::Secp256k1PublicKey;
use sv2_tpd::sv2::TdpMessage;
use tokio::sync::mpsc;

use crate::support::tp::{client_at, next_tip, prev_hash};
use crate::support::BitcoinNode;
use crate::{ms, pct, spawn_listener, DaemonProcess};

/// How long a client must have heard nothing before a round starts: the previous block's
/// templates (and the node's work for them) are done.
const QUIET: Duration = Duration::from_millis(300);

/// What this part of the benchmark does.
pub struct FullMempoolArgs {
    /// Transactions put in the mempool.
    pub mempool: usize,
    /// Blocks mined per measurement.
    pub rounds: usize,
    /// Length of each idle window counting node template builds.
    pub idle: Duration,
}

/// Another Template Provider on the same node.
pub struct OtherTp {
    pub addr: SocketAddr,
    pub key: Secp256k1PublicKey,
}

/// Figures of one Template Provider over `rounds` empty blocks.
#[derive(Default)]
struct BlockFigures {
    /// New block → `SetNewPrevHash` at the client.
    prev_hash: Vec<Duration>,
    /// New block → the client holds a template with the mempool's transactions for the
    /// new tip (a full future template with its `SetNewPrevHash`, or the full
    /// non-future template after the empty pair).
    full: Vec<Duration>,
    /// The node's longest `CreateNewBlock` after each block (the full selection).
    node_full_build: Vec<Duration>,
    /// `CreateNewBlock` calls after each block, less `generateblock`'s own.
    builds_per_block: Vec<usize>,
}

/// Runs the full-mempool measurements and appends their tables to `report`.
pub async fn run(
    report: &mut String,
    node: &Arc<BitcoinNode>,
    workdir: &Path,
    other: Option<OtherTp>,
    args: &FullMempoolArgs,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    let on = DaemonProcess::start(
        &node.socket_path(),
        &workdir.join("tip-first-on"),
        "template_interval=30,tip_first=true",
    )?;
    // The reference point: the same daemon, the same kind of block, an empty mempool
    // (one ordinary block takes what earlier parts left in it).
    let emptied = {
        let node = node.clone();
        tokio::task::spawn_blocking(move || node.generate(1)).await?
    };
    emptied.context("emptying the mempool")?;
    let left = node.mempool_txids()?.len();
    let empty = measure_blocks(node, (on.addr, on.key), Some(&on), args.rounds, false).await?;
    rows.push(("sv2-tpd, tip_first = true", left, empty));
    eprintln!("filling the mempool with {} transactions", args.mempool);
    let filled = {
        let node = node.clone();
        let count = args.mempool;
        tokio::task::spawn_blocking(move || node.fill_mempool(count)).await?
    };
    filled.context("filling the mempool")?;
    let pooled = node.mempool_txids()?.len();
    let full_on = measure_blocks(node, (on.addr, on.key), Some(&on), args.rounds, true).await?;
    rows.push(("sv2-tpd, tip_first = true", pooled, full_on));
    let mut idle_rows = Vec::new();
    if !args.idle.is_zero() {
        for clients in [1, 100] {
            let builds = idle_builds(node, on.addr, on.key, clients, args.idle, Some(&on)).await?;
            idle_rows.push(("sv2-tpd, tip_first = true", clients, builds));
        }
    }
    drop(on);
    let off = DaemonProcess::start(
        &node.socket_path(),
        &workdir.join("tip-first-off"),
        "template_interval=30,tip_first=false",
    )?;
    let full_off = measure_blocks(node, (off.addr, off.key), Some(&off), args.rounds, true).await?;
    rows.push(("sv2-tpd, tip_first = false", pooled, full_off));
    drop(off);
    if let Some(other) = other {
        let figures =
            measure_blocks(node, (other.addr, other.key), None, args.rounds, true).await?;
        rows.push(("other TP", pooled, figures));
        if !args.idle.is_zero() {
            for clients in [1, 100] {
                let builds =
                    idle_builds(node, other.addr, other.key, clients, args.idle, None).await?;
                idle_rows.push(("other TP", clients, builds));
            }
        }
    }
    if let Some(keep) = std::env::var_os("BENCH_NODE_LOG") {
        std::fs::copy(node.debug_log_path(), &keep).context("copying the node's log")?;
    }
    write_tables(report, &rows, &idle_rows, args)
}

fn write_tables(
    report: &mut String,
    rows: &[(&str, usize, BlockFigures)],
    idle_rows: &[(&str, usize, IdleBuilds)],
    args: &FullMempoolArgs,
) -> anyhow::Result<()> {
    writeln!(
        report,
        "\n### New block at a full mempool (bitcoin-node 31.99, blocks by `generateblock` \
         with no transactions, {} rounds, 1 client)\n",
        args.rounds
    )?;
    writeln!(
        report,
        "| Template Provider | mempool txs | new block → SetNewPrevHash p50 / p99 | \
         new block → full template p50 / p99 | node's full build p50 | template builds per block |\n\
         |---|---:|---:|---:|---:|---:|"
    )?;
    for (name, pooled, f) in rows {
        let full = if f.full.is_empty() {
            "—".to_owned()
        } else {
            format!("{} / {}", ms(pct(&f.full, 0.5)), ms(pct(&f.full, 0.99)))
        };
        let builds = f.builds_per_block.iter().sum::<usize>() as f64
            / f.builds_per_block.len().max(1) as f64;
        writeln!(
            report,
            "| {name} | {pooled} | {} / {} | {full} | {} | {builds:.1} |",
            ms(pct(&f.prev_hash, 0.5)),
            ms(pct(&f.prev_hash, 0.99)),
            ms(pct(&f.node_full_build, 0.5)),
        )?;
    }
    if rows.iter().any(|r| r.0 == "other TP") {
        writeln!(
            report,
            "\nThe other TP stays connected while sv2-tpd is measured, sharing the node \
             and the cores; sv2-tpd's builds per block are its own count, the other's come \
             from the node's log."
        )?;
    }
    let p50 = |i: usize| rows.get(i).map(|r| pct(&r.2.prev_hash, 0.5));
    if let (Some(empty), Some(on), Some(off)) = (p50(0), p50(1), p50(2)) {
        writeln!(
            report,
            "\nAt the full mempool, tip-first puts `SetNewPrevHash` out {:.1}× sooner than \
             waiting for the full template ({} vs {}); {:+.2} ms against the empty mempool.",
            off.as_secs_f64() / on.as_secs_f64().max(1e-9),
            ms(on),
            ms(off),
            (on.as_secs_f64() - empty.as_secs_f64()) * 1000.0,
        )?;
    }
    if idle_rows.is_empty() {
        return Ok(());
    }
    writeln!(
        report,
        "\n### Node template builds with a full mempool and no new block \
         (template_interval = 30 s)\n"
    )?;
    writeln!(
        report,
        "| Template Provider | clients | builds per minute (node log) | builds per minute (daemon metric) |\n\
         |---|---:|---:|---:|"
    )?;
    for (name, clients, b) in idle_rows {
        let metric = b
            .metric_per_minute
            .map_or("—".to_owned(), |m| format!("{m:.1}"));
        writeln!(
            report,
            "| {name} | {clients} | {:.1} | {metric} |",
            b.node_per_minute
        )?;
    }
    Ok(())
}

/// Mines `rounds` empty blocks and times what one client receives for each. Builds per
/// block come from the daemon's own count when it is ours (`daemon`), else from the
/// node's log (which then also holds whatever else uses the node).
async fn measure_blocks(
    node: &Arc<BitcoinNode>,
    (addr, key): (SocketAddr, Secp256k1PublicKey),
    daemon: Option<&DaemonProcess>,
    rounds: usize,
    expect_full: bool,
) -> anyhow::Result<BlockFigures> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut client = client_at(addr, key, 100, 10).await;
    next_tip(&mut client).await;
    let listener = spawn_listener(client, 0, tx).await;
    let mut figures = BlockFigures::default();
    let mut log = NodeLog::new(&node.debug_log_path());
    for _ in 0..rounds {
        settle(&mut rx).await;
        log.skip_to_end()?;
        let counted_before = daemon.map(DaemonProcess::template_builds).transpose()?;
        let started = Instant::now();
        let mined = {
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.generate_empty()).await??
        };
        let (prev_hash_at, full_at) = wait_for_tip(&mut rx, mined, expect_full).await?;
        figures.prev_hash.push(prev_hash_at.duration_since(started));
        if let Some(full_at) = full_at {
            figures.full.push(full_at.duration_since(started));
        }
        settle(&mut rx).await;
        let builds = log.builds()?;
        figures
            .node_full_build
            .push(builds.iter().copied().max().unwrap_or_default());
        let counted_after = daemon.map(DaemonProcess::template_builds).transpose()?;
        let per_block = match counted_before.zip(counted_after) {
            Some((before, after)) => (after - before) as usize,
            // Less `generateblock`'s own.
            None => builds.len().saturating_sub(1),
        };
        figures.builds_per_block.push(per_block);
    }
    listener.abort();
    figures.prev_hash.sort();
    figures.full.sort();
    figures.node_full_build.sort();
    eprintln!("{rounds} blocks measured at {addr}");
    Ok(figures)
}

/// Waits until the client has `SetNewPrevHash` for `mined` and, when `expect_full`, a
/// template with transactions on it; returns when each arrived.
async fn wait_for_tip(
    rx: &mut mpsc::UnboundedReceiver<(usize, Instant, TdpMessage)>,
    mined: BlockHash,
    expect_full: bool,
) -> anyhow::Result<(Instant, Option<Instant>)> {
    // Template id → whether it carries transactions.
    let mut with_txs = std::collections::HashMap::new();
    let mut prev_hash_at = None;
    let mut full_at = None;
    while prev_hash_at.is_none() || (expect_full && full_at.is_none()) {
        let (_, at, msg) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("no SetNewPrevHash / full template within 30 s")?
            .context("the client's connection ended")?;
        match msg {
            TdpMessage::NewTemplate(t) => {
                let full = t.merkle_path.iter().next().is_some();
                with_txs.insert(t.template_id, full);
                if full && !t.future_template && prev_hash_at.is_some() {
                    full_at.get_or_insert(at);
                }
            }
            TdpMessage::SetNewPrevHash(p) if prev_hash(&p) == mined => {
                prev_hash_at = Some(at);
                if with_txs.get(&p.template_id) == Some(&true) {
                    full_at.get_or_insert(at);
                }
            }
            _ => {}
        }
    }
    let prev_hash_at = prev_hash_at.context("no SetNewPrevHash")?;
    Ok((prev_hash_at, full_at.filter(|_| expect_full)))
}

/// Drains messages until none came for [`QUIET`].
async fn settle(rx: &mut mpsc::UnboundedReceiver<(usize, Instant, TdpMessage)>) {
    while let Ok(Some(_)) = tokio::time::timeout(QUIET, rx.recv()).await {}
}

/// Template builds while no block comes, per minute.
struct IdleBuilds {
    node_per_minute: f64,
    metric_per_minute: Option<f64>,
}

/// Connects `clients` clients with equal constraints and counts the node's template
/// builds over `window` (and the daemon's own count when it is ours).
async fn idle_builds(
    node: &Arc<BitcoinNode>,
    addr: SocketAddr,
    key: Secp256k1PublicKey,
    clients: usize,
    window: Duration,
    ours: Option<&DaemonProcess>,
) -> anyhow::Result<IdleBuilds> {
    let mut connected = Vec::with_capacity(clients);
    for _ in 0..clients {
        let mut c = client_at(addr, key, 100, 10).await;
        next_tip(&mut c).await;
        connected.push(c);
    }
    // Whatever the clients' arrival caused is done before the window opens.
    tokio::time::sleep(QUIET).await;
    let mut log = NodeLog::new(&node.debug_log_path());
    log.skip_to_end()?;
    let metric_before = ours.map(DaemonProcess::template_builds).transpose()?;
    eprintln!("counting node template builds for {window:?} with {clients} clients");
    tokio::time::sleep(window).await;
    let builds = log.builds()?.len();
    let metric_after = ours.map(DaemonProcess::template_builds).transpose()?;
    let per_minute = |n: f64| n * 60.0 / window.as_secs_f64();
    Ok(IdleBuilds {
        node_per_minute: per_minute(builds as f64),
        metric_per_minute: metric_before
            .zip(metric_after)
            .map(|(before, after)| per_minute(after - before)),
    })
}

/// Reads the node's `debug.log` from where it was last read.
struct NodeLog {
    path: std::path::PathBuf,
    offset: u64,
}

impl NodeLog {
    fn new(path: &Path) -> Self {
        NodeLog {
            path: path.to_path_buf(),
            offset: 0,
        }
    }

    fn skip_to_end(&mut self) -> anyhow::Result<()> {
        self.offset = std::fs::metadata(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?
            .len();
        Ok(())
    }

    /// The duration of every `CreateNewBlock` logged since the last read (the node's
    /// `-debug=bench` line `CreateNewBlock() chunks: …, validity: … (total X ms)`).
    fn builds(&mut self) -> anyhow::Result<Vec<Duration>> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        // A line still being written is read next time.
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        let mut builds = Vec::new();
        for line in String::from_utf8_lossy(&text[..complete]).lines() {
            if !line.contains("CreateNewBlock() chunks:") {
                continue;
            }
            let Some(total) = line
                .split("(total ")
                .nth(1)
                .and_then(|rest| rest.split("ms").next())
                .and_then(|ms| ms.trim().parse::<f64>().ok())
            else {
                bail!("unexpected CreateNewBlock line in the node's log: {line}");
            };
            builds.push(Duration::from_secs_f64(total / 1000.0));
        }
        Ok(builds)
    }
}
