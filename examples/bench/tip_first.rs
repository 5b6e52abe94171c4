//! The full-mempool part of the benchmark (real node only): how long miners hash on the
//! old tip when the node's mempool is large, with tip-first on and off, and what a
//! Template Provider costs the node in template builds.
//!
//! Blocks are mined with `generateblock` and an empty transaction list, so the mempool
//! keeps its transactions and every new tip needs a full selection. The node runs with
//! `-debug=bench`: its own log tells how long each `CreateNewBlock` took and how many it
//! made, for any Template Provider. [`run_groups`] does the same with several constraint
//! groups (coinbase sizes 100, 1,100, 2,100, …), one client each: the first and the last
//! group's `SetNewPrevHash`, and, from the node's log and the daemon's, whether a full
//! build started before the last group's pair was out.

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

    /// The complete lines written since the last read.
    fn read_new(&mut self) -> anyhow::Result<String> {
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?;
        file.seek(SeekFrom::Start(self.offset))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text)?;
        // A line still being written is read next time.
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.offset += complete as u64;
        Ok(String::from_utf8_lossy(&text[..complete]).into_owned())
    }

    /// The duration of every `CreateNewBlock` logged since the last read (the node's
    /// `-debug=bench` line `CreateNewBlock() chunks: …, validity: … (total X ms)`).
    fn builds(&mut self) -> anyhow::Result<Vec<Duration>> {
        Ok(self.build_lines()?.into_iter().map(|b| b.took).collect())
    }

    /// Every `CreateNewBlock` logged since the last read: when it ended, how long it took
    /// and how many transactions it selected (the `CreateNewBlock(): … txs: N` line
    /// before it).
    fn build_lines(&mut self) -> anyhow::Result<Vec<NodeBuild>> {
        let mut builds = Vec::new();
        let mut txs = 0;
        for line in self.read_new()?.lines() {
            if let Some(rest) = line.split("CreateNewBlock(): block weight:").nth(1) {
                txs = rest
                    .split("txs: ")
                    .nth(1)
                    .and_then(|t| t.split_whitespace().next())
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
            }
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
            let ended = line
                .split_whitespace()
                .next()
                .and_then(seconds_of_day)
                .with_context(|| format!("no -logtimemicros time in: {line}"))?;
            builds.push(NodeBuild {
                ended,
                took: Duration::from_secs_f64(total / 1000.0),
                txs,
            });
        }
        Ok(builds)
    }
}

/// One `CreateNewBlock` in the node's log.
struct NodeBuild {
    /// Wall-clock seconds since midnight (UTC) when it was logged, at its end.
    ended: f64,
    took: Duration,
    /// Transactions selected: 0 for a template without mempool.
    txs: usize,
}

impl NodeBuild {
    fn started(&self) -> f64 {
        self.ended - self.took.as_secs_f64()
    }
}

/// `2026-12-07T17:20:01.123456Z` → seconds since that day's midnight (UTC); both the
/// node's `-logtimemicros` and the daemon's JSON log write this form.
fn seconds_of_day(stamp: &str) -> Option<f64> {
    let time = stamp.split('T').nth(1)?.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Coinbase size (`max_additional_size`) of group `k`: 100, 1,100, 2,100, …
fn group_size(k: usize) -> u32 {
    100 + 1000 * k as u32
}

/// Figures of one count of groups over the rounds.
#[derive(Default)]
struct GroupFigures {
    /// New block → `SetNewPrevHash` at the first group's client to have it.
    first: Vec<Duration>,
    /// … at the last group's.
    last: Vec<Duration>,
    /// New block → the last group's full template.
    last_full: Vec<Duration>,
    /// The first full build's start in the node's log less the last pair's in the
    /// daemon's log (both wall clock), per block: positive when no full build started
    /// before every pair was out.
    full_after_pairs: Vec<f64>,
    /// Templates without mempool the node built per block (less `generateblock`'s own).
    empty_builds: Vec<usize>,
    /// Full templates the node built per block.
    full_builds: Vec<usize>,
}

/// Runs the constraint-group measurements (1, 4 and 8 groups, one client each) at a full
/// mempool and appends their table to `report`.
pub async fn run_groups(
    report: &mut String,
    node: &Arc<BitcoinNode>,
    workdir: &Path,
    args: &FullMempoolArgs,
) -> anyhow::Result<()> {
    let pooled = node.mempool_txids()?.len();
    if pooled < args.mempool {
        eprintln!(
            "filling the mempool with {} transactions",
            args.mempool - pooled
        );
        let node = node.clone();
        let count = args.mempool - pooled;
        tokio::task::spawn_blocking(move || node.fill_mempool(count)).await??;
    }
    let pooled = node.mempool_txids()?.len();
    let log = workdir.join("groups-daemon.log");
    let daemon = DaemonProcess::start_logging(
        &node.socket_path(),
        &workdir.join("groups"),
        "template_interval=30,tip_first=true",
        Some(&log),
    )?;
    // A few blocks first, not counted: the node is still busy with the mempool it was
    // just given.
    measure_groups(node, &daemon, &log, 1, 5).await?;
    let mut rows = Vec::new();
    for groups in [1, 4, 8] {
        let figures = measure_groups(node, &daemon, &log, groups, args.rounds).await?;
        rows.push((groups, figures));
    }
    drop(daemon);
    writeln!(
        report,
        "\n### Constraint groups on a new block at a full mempool (bitcoin-node 31.99, \
         {pooled} mempool transactions, `generateblock` with no transactions, {} rounds, \
         one client per group, coinbase sizes 100, 1,100, 2,100, …)\n",
        args.rounds
    )?;
    writeln!(
        report,
        "| groups | SetNewPrevHash, first group p50 / p99 | last group p50 / p99 | \
         last − first p50 | last group's full template p50 | node builds per block, \
         empty / full | first full build after the last pair, min / p50 |\n\
         |---:|---:|---:|---:|---:|---:|---:|"
    )?;
    for (groups, f) in &rows {
        let mut spread: Vec<Duration> = f
            .first
            .iter()
            .zip(&f.last)
            .map(|(a, b)| b.saturating_sub(*a))
            .collect();
        spread.sort();
        let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / v.len().max(1) as f64;
        let mut gaps = f.full_after_pairs.clone();
        gaps.sort_by(f64::total_cmp);
        let gap = |p: f64| {
            let i = ((gaps.len().max(1) - 1) as f64 * p).round() as usize;
            gaps.get(i)
                .map_or("—".to_owned(), |g| format!("{:+.2} ms", g * 1000.0))
        };
        writeln!(
            report,
            "| {groups} | {} / {} | {} / {} | {} | {} | {:.1} / {:.1} | {} / {} |",
            ms(pct(&f.first, 0.5)),
            ms(pct(&f.first, 0.99)),
            ms(pct(&f.last, 0.5)),
            ms(pct(&f.last, 0.99)),
            ms(pct(&spread, 0.5)),
            ms(pct(&f.last_full, 0.5)),
            mean(&f.empty_builds),
            mean(&f.full_builds),
            gap(0.0),
            gap(0.5),
        )?;
    }
    Ok(())
}

/// Connects one client for each of `groups` groups to `daemon` and mines `rounds`
/// empty blocks, timing what the clients get and reading both logs after each.
async fn measure_groups(
    node: &Arc<BitcoinNode>,
    daemon: &DaemonProcess,
    daemon_log: &Path,
    groups: usize,
    rounds: usize,
) -> anyhow::Result<GroupFigures> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut listeners = Vec::new();
    for k in 0..groups {
        let mut client = client_at(daemon.addr, daemon.key, group_size(k), 10).await;
        next_tip(&mut client).await;
        listeners.push(spawn_listener(client, k, tx.clone()).await);
    }
    // The groups of the previous measurement are stopped (once a second) and every
    // group's first template is out.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut node_log = NodeLog::new(&node.debug_log_path());
    let mut pairs_log = NodeLog::new(daemon_log);
    let mut figures = GroupFigures::default();
    for _ in 0..rounds {
        settle(&mut rx).await;
        node_log.skip_to_end()?;
        pairs_log.skip_to_end()?;
        let started = Instant::now();
        let mined = {
            let node = node.clone();
            tokio::task::spawn_blocking(move || node.generate_empty()).await??
        };
        let got = wait_for_groups(&mut rx, mined, groups).await?;
        let first = got.iter().map(|g| g.0).min().context("no group")?;
        let last = got.iter().map(|g| g.0).max().context("no group")?;
        figures.first.push(first.duration_since(started));
        figures.last.push(last.duration_since(started));
        let last_full = got.iter().map(|g| g.1).max().context("no group")?;
        figures.last_full.push(last_full.duration_since(started));
        settle(&mut rx).await;
        let builds = node_log.build_lines()?;
        let (empty, full): (Vec<&NodeBuild>, Vec<&NodeBuild>) =
            builds.iter().partition(|b| b.txs == 0);
        // `generateblock` builds its own block without mempool, before the tip moves.
        figures.empty_builds.push(empty.len().saturating_sub(1));
        figures.full_builds.push(full.len());
        let first_full = full.iter().map(|b| b.started()).min_by(f64::total_cmp);
        if let (Some(full), Some(pair)) = (first_full, last_pair(&mut pairs_log)?) {
            figures.full_after_pairs.push(full - pair);
        }
    }
    for l in listeners {
        l.abort();
    }
    figures.first.sort();
    figures.last.sort();
    figures.last_full.sort();
    eprintln!("{groups} groups: {rounds} blocks measured");
    Ok(figures)
}

/// Waits until each of the `groups` clients has `SetNewPrevHash` for `mined` and then a
/// full template on it; returns when each arrived, by client.
async fn wait_for_groups(
    rx: &mut mpsc::UnboundedReceiver<(usize, Instant, TdpMessage)>,
    mined: BlockHash,
    groups: usize,
) -> anyhow::Result<Vec<(Instant, Instant)>> {
    let mut prev_hash_at: Vec<Option<Instant>> = vec![None; groups];
    let mut full_at: Vec<Option<Instant>> = vec![None; groups];
    while full_at.iter().any(Option::is_none) {
        let (k, at, msg) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("not every group got its pair and full template within 30 s")?
            .context("a client's connection ended")?;
        match msg {
            TdpMessage::SetNewPrevHash(p) if prev_hash(&p) == mined => {
                prev_hash_at[k].get_or_insert(at);
            }
            TdpMessage::NewTemplate(t)
                if !t.future_template
                    && t.merkle_path.iter().next().is_some()
                    && prev_hash_at[k].is_some() =>
            {
                full_at[k].get_or_insert(at);
            }
            _ => {}
        }
    }
    Ok(prev_hash_at
        .into_iter()
        .zip(full_at)
        .filter_map(|(p, f)| p.zip(f))
        .collect())
}

/// When the last tip pair in the daemon's JSON log since its last read was published
/// (wall-clock seconds of day): its `new template` line is logged just before it is
/// queued to the clients.
fn last_pair(log: &mut NodeLog) -> anyhow::Result<Option<f64>> {
    let mut last = None;
    for line in log.read_new()?.lines() {
        let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        // The daemon's JSON lines carry the event's fields beside the timestamp.
        if entry["message"] == "new template" && entry["reason"] == "tip" {
            last = entry["timestamp"]
                .as_str()
                .and_then(seconds_of_day)
                .or(last);
        }
    }
    Ok(last)
}
