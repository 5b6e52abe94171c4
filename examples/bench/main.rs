//! Latency and memory benchmark for a Template Provider, printing figures (not a test).
//!
//! ```text
//! cargo run --release --example bench -- --node mock --clients 1,100,1000
//! cargo run --release --example bench -- --node real --vs 127.0.0.1:8442 --vs-authority KEY
//! ```
//!
//! Runs sv2-tpd as a child process (this binary re-executed in daemon mode) beside a mock
//! or real regtest node, connects SV2 clients built on SRI's crates and measures:
//! new block → `SetNewPrevHash` at the first and the last of N clients; fee bump →
//! `NewTemplate`; `RequestTransactionData` on a large template (mock); the daemon's RSS
//! idle and with the most clients. On a real node, `tip_first.rs` adds the full-mempool
//! figures (`--mempool N`, `--mempool-rounds`, `--idle-secs`) and the constraint groups
//! at a full mempool (`groups`: 1, 4 and 8 groups); `nodes.rs` (`nodes`, real node)
//! compares one node with two when blocks reach the second first;
//! `--parts basic,mempool,groups,nodes` picks what runs. Beside each client spread goes
//! the daemon's own time to tell all of them (`sv2_tpd_pair_fanout_seconds`).
//! `--vs ADDR --vs-authority KEY [--vs-pid PID]` measures another Template Provider on the
//! same node the same way. Results go to `--out`.
//!
//! Environment: `BENCH_DAEMON_LOG=FILE` keeps the daemons' logs (level from `RUST_LOG`),
//! `BENCH_NODE_LOG=FILE` a copy of the node's `debug.log`, `BENCH_DAEMON_EXE=PATH` runs
//! another build of this benchmark as the daemon (A/B comparisons), `BENCH_PIN=1` runs the
//! clients on the last core and the daemons on the others (the node on all), so the
//! daemon's own figure is not what the clients take from it.

mod nodes;
#[path = "../../tests/support/bench_harness.rs"]
mod support;
mod tip_first;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bitcoin::Amount;
use key_utils::Secp256k1PublicKey;
use sv2_tpd::mock::{MockNode, MockOptions};
use sv2_tpd::sv2::TdpMessage;
use tokio::sync::mpsc;

use support::bitcoin_node::free_local_port;
use support::proc_status::rss_kib;
use support::stream_check::CheckedClient;
use support::tp::{client_at, next_template, next_tip, regtest_config};
use support::BitcoinNode;

/// What a benchmark run drives: the mock or a real node.
enum Node {
    Mock(MockNode),
    Real(Arc<BitcoinNode>),
}

impl Node {
    fn socket(&self) -> PathBuf {
        match self {
            Node::Mock(m) => m.socket_path().to_path_buf(),
            Node::Real(n) => n.socket_path(),
        }
    }

    fn mine(&self) -> anyhow::Result<()> {
        match self {
            Node::Mock(m) => {
                m.mine_block();
            }
            Node::Real(n) => {
                n.generate(1)?;
            }
        }
        Ok(())
    }

    fn bump_fees(&self, fee: Amount) -> anyhow::Result<()> {
        match self {
            Node::Mock(m) => {
                m.add_mempool_tx(fee);
            }
            Node::Real(n) => {
                n.send_fee_tx(fee)?;
            }
        }
        Ok(())
    }

    fn label(&self) -> &'static str {
        match self {
            Node::Mock(_) => "mock node",
            Node::Real(_) => "bitcoin-node 31.99 (regtest)",
        }
    }
}

struct Args {
    node: String,
    clients: Vec<usize>,
    rounds: usize,
    out: Option<PathBuf>,
    vs: Option<(SocketAddr, Secp256k1PublicKey, Option<u32>)>,
    parts: Parts,
    full_mempool: tip_first::FullMempoolArgs,
}

/// Which parts of the benchmark run (`--parts basic,mempool`).
struct Parts {
    /// Tips at 1..N clients, fee bumps, transaction data, RSS.
    basic: bool,
    /// The full-mempool measurements (real node only).
    mempool: bool,
    /// Several constraint groups at a full mempool (real node only).
    groups: bool,
    /// One node against two, each block reaching the second first (real node only).
    nodes: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        node: "mock".into(),
        clients: vec![1, 100, 1000],
        rounds: 20,
        out: None,
        vs: None,
        parts: Parts {
            basic: true,
            mempool: true,
            groups: true,
            nodes: true,
        },
        full_mempool: tip_first::FullMempoolArgs {
            mempool: 5_000,
            rounds: 20,
            idle: Duration::from_secs(120),
        },
    };
    let mut vs_addr = None;
    let mut vs_key = None;
    let mut vs_pid = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--node" => args.node = value()?,
            "--clients" => {
                args.clients = value()?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--clients takes numbers like 1,100,1000")?
            }
            "--rounds" => args.rounds = value()?.parse()?,
            "--parts" => {
                let parts = value()?;
                let has = |name: &str| parts.split(',').any(|p| p == name);
                args.parts = Parts {
                    basic: has("basic"),
                    mempool: has("mempool"),
                    groups: has("groups"),
                    nodes: has("nodes"),
                };
            }
            "--mempool" => args.full_mempool.mempool = value()?.parse()?,
            "--mempool-rounds" => args.full_mempool.rounds = value()?.parse()?,
            "--idle-secs" => args.full_mempool.idle = Duration::from_secs(value()?.parse()?),
            "--out" => args.out = Some(value()?.into()),
            "--vs" => vs_addr = Some(value()?.parse::<SocketAddr>()?),
            "--vs-authority" => {
                vs_key = Some(
                    value()?
                        .parse::<Secp256k1PublicKey>()
                        .map_err(|e| anyhow::anyhow!("--vs-authority: {e:?}"))?,
                )
            }
            "--vs-pid" => vs_pid = Some(value()?.parse()?),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    if let Some(addr) = vs_addr {
        let key = vs_key.context("--vs needs --vs-authority")?;
        args.vs = Some((addr, key, vs_pid));
    }
    Ok(args)
}

/// Percentile of sorted samples.
fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A table row: `label`, `clients`, and the p50 and p99 of the sorted `samples`.
fn row(report: &mut String, label: &str, clients: usize, samples: &[Duration]) -> std::fmt::Result {
    writeln!(
        report,
        "| {label} | {clients} | {} | {} |",
        ms(pct(samples, 0.5)),
        ms(pct(samples, 0.99))
    )
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// A client whose messages are forwarded, time-stamped, to the collector.
async fn spawn_listener(
    mut client: CheckedClient,
    index: usize,
    events: mpsc::UnboundedSender<(usize, Instant, TdpMessage)>,
) -> tokio::task::JoinHandle<CheckedClient> {
    tokio::spawn(async move {
        while let Ok(msg) = client.recv().await {
            if events.send((index, Instant::now(), msg)).is_err() {
                break;
            }
        }
        client
    })
}

struct TipFigures {
    first: Vec<Duration>,
    last: Vec<Duration>,
    /// From the first client's `SetNewPrevHash` to the last one's, per block.
    spread: Vec<Duration>,
    /// The daemon's own: from queueing the pair to the last session's write, per block
    /// (`sv2_tpd_pair_fanout_seconds`; ours only).
    fanout: Vec<Duration>,
}

/// Mines `rounds` blocks; for each, the time until the first and the last of `n` clients
/// got `SetNewPrevHash`.
async fn measure_tips(
    node: &Node,
    (addr, key): (SocketAddr, Secp256k1PublicKey),
    daemon: Option<&DaemonProcess>,
    n: usize,
    rounds: usize,
) -> anyhow::Result<TipFigures> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    for i in 0..n {
        let mut c = client_at(addr, key, 100, 10).await;
        next_tip(&mut c).await;
        handles.push(spawn_listener(c, i, tx.clone()).await);
    }
    eprintln!("{n} clients connected");
    let mut figures = TipFigures {
        first: Vec::new(),
        last: Vec::new(),
        spread: Vec::new(),
        fanout: Vec::new(),
    };
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(50)).await;
        while rx.try_recv().is_ok() {}
        let fanouts_before = daemon.map(DaemonProcess::pair_fanouts).transpose()?;
        let started = Instant::now();
        node.mine()?;
        let mut seen = vec![false; n];
        let mut count = 0;
        let mut first = None;
        while count < n {
            let (i, at, msg) = tokio::time::timeout(Duration::from_secs(30), rx.recv())
                .await
                .context("clients did not all get SetNewPrevHash")?
                .context("listeners ended")?;
            if matches!(msg, TdpMessage::SetNewPrevHash(_)) && !seen[i] {
                seen[i] = true;
                count += 1;
                first.get_or_insert(at);
                if count == n {
                    figures.last.push(at.duration_since(started));
                    figures
                        .spread
                        .push(at.duration_since(first.unwrap_or(started)));
                }
            }
        }
        figures
            .first
            .push(first.unwrap_or(started).duration_since(started));
        if let Some((sum, count)) = fanouts_before {
            // The last session's write ends the fan-out: it is in before the client has it.
            let (after_sum, after_count) = daemon
                .map(DaemonProcess::pair_fanouts)
                .transpose()?
                .unwrap_or_default();
            if after_count > count {
                let per_fanout = (after_sum - sum) / (after_count - count);
                figures.fanout.push(Duration::from_secs_f64(per_fanout));
            }
        }
    }
    drop(rx);
    for h in handles {
        h.abort();
    }
    figures.first.sort();
    figures.last.sort();
    figures.spread.sort();
    figures.fanout.sort();
    Ok(figures)
}

/// Time from a fee bump to the non-future `NewTemplate` (fee templates are at most one
/// per `template_interval`, 1 s here, so bumps are spaced by that).
async fn measure_fee_bumps(
    node: &Node,
    addr: SocketAddr,
    key: Secp256k1PublicKey,
    rounds: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut c = client_at(addr, key, 100, 10).await;
    next_tip(&mut c).await;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let started = Instant::now();
        node.bump_fees(Amount::from_sat(50_000))?;
        loop {
            let t = tokio::time::timeout(Duration::from_secs(30), next_template(&mut c))
                .await
                .context("no fee template")?;
            if !t.future_template {
                samples.push(started.elapsed());
                break;
            }
        }
    }
    samples.sort();
    Ok(samples)
}

/// `RequestTransactionData` round trip on the current template; returns (time, txs, bytes).
async fn measure_tx_data(
    addr: SocketAddr,
    key: Secp256k1PublicKey,
    template_id_wait: Duration,
) -> anyhow::Result<(Vec<Duration>, usize, usize)> {
    let mut c = client_at(addr, key, 100, 10).await;
    let (mut t, _) = next_tip(&mut c).await;
    // Let the fee template with the full mempool arrive.
    while let Ok(next) = tokio::time::timeout(template_id_wait, next_template(&mut c)).await {
        t = next;
    }
    let mut samples = Vec::new();
    let mut shape = (0, 0);
    for _ in 0..10 {
        let started = Instant::now();
        c.request_tx_data(t.template_id).await?;
        loop {
            match c.recv().await? {
                TdpMessage::RequestTransactionDataSuccess(s) => {
                    samples.push(started.elapsed());
                    let list: Vec<&[u8]> = s.transaction_list.iter_bytes().collect();
                    shape = (list.len(), list.iter().map(|b| b.len()).sum());
                    break;
                }
                TdpMessage::RequestTransactionDataError { error_code, .. } => {
                    bail!("transaction data refused: {error_code}")
                }
                _ => continue,
            }
        }
    }
    samples.sort();
    Ok((samples, shape.0, shape.1))
}

/// sv2-tpd as a child process: this executable re-run in daemon mode. Killed on drop.
pub struct DaemonProcess {
    child: Child,
    /// Its SV2 listener.
    pub addr: SocketAddr,
    /// Its authority public key.
    pub key: Secp256k1PublicKey,
    metrics_port: u16,
}

impl DaemonProcess {
    /// Starts sv2-tpd on the node at `socket` with its data in `datadir`; `settings` are
    /// extra config keys as `key=value,key=value`.
    pub fn start(socket: &Path, datadir: &Path, settings: &str) -> anyhow::Result<Self> {
        Self::start_logging(socket, datadir, settings, None)
    }

    /// Like [`DaemonProcess::start`]; with `json_log`, its log goes there as JSON lines at
    /// `info` (what the groups part reads the pairs' times from), whatever
    /// `BENCH_DAEMON_LOG` says.
    pub fn start_logging(
        socket: &Path,
        datadir: &Path,
        settings: &str,
        json_log: Option<&Path>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(datadir)?;
        let (port, metrics_port) = (free_local_port()?, free_local_port()?);
        // `BENCH_DAEMON_EXE` runs another build of this benchmark as the daemon (A/B).
        let exe = match std::env::var_os("BENCH_DAEMON_EXE") {
            Some(exe) => PathBuf::from(exe),
            None => std::env::current_exe()?,
        };
        let mut command = Command::new(exe);
        let stderr = match json_log {
            Some(path) => {
                command
                    .env("BENCH_DAEMON_LOG", path)
                    .env("BENCH_DAEMON_JSON", "1")
                    .env("RUST_LOG", "info");
                std::fs::File::create(path)
                    .with_context(|| format!("daemon log {}", path.display()))?
                    .into()
            }
            None => daemon_log()?,
        };
        let mut child = command
            .arg("--serve-daemon")
            .env("BENCH_SOCKET", socket)
            .env("BENCH_DATADIR", datadir)
            .env("BENCH_PORT", port.to_string())
            .env("BENCH_METRICS_PORT", metrics_port.to_string())
            .env("BENCH_SETTINGS", settings)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let key = wait_listening(addr).and_then(|()| {
            Ok(sv2_tpd::keys::load(&datadir.join("authority.key"))?.authority_pubkey())
        });
        match key {
            Ok(key) => Ok(DaemonProcess {
                child,
                addr,
                key,
                metrics_port,
            }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `sv2_tpd_node_template_builds_total`, all kinds, from its `/metrics`.
    pub fn template_builds(&self) -> anyhow::Result<f64> {
        self.metric_sum("sv2_tpd_node_template_builds_total")
    }

    /// `sv2_tpd_pair_fanout_seconds`: the sum of its observations and their count.
    pub fn pair_fanouts(&self) -> anyhow::Result<(f64, f64)> {
        Ok((
            self.metric_sum("sv2_tpd_pair_fanout_seconds_sum")?,
            self.metric_sum("sv2_tpd_pair_fanout_seconds_count")?,
        ))
    }

    /// The sum of the samples named `name` on its `/metrics`.
    fn metric_sum(&self, name: &str) -> anyhow::Result<f64> {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics_port);
        let response = minreq::get(&url).with_timeout(10).send()?;
        let lines = response.as_str()?.lines().map(|l| Ok(l.to_owned()));
        let scrape = prometheus_parse::Scrape::parse(lines)?;
        Ok(scrape
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => 0.0,
            })
            .sum())
    }
}

/// Where a daemon's log goes: the file named by `BENCH_DAEMON_LOG` (appended to, with the
/// level `RUST_LOG` sets), else nowhere.
fn daemon_log() -> anyhow::Result<Stdio> {
    let Some(path) = std::env::var_os("BENCH_DAEMON_LOG") else {
        return Ok(Stdio::null());
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("BENCH_DAEMON_LOG {}", Path::new(&path).display()))?;
    Ok(file.into())
}

/// Waits until something accepts connections at `addr`.
fn wait_listening(addr: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..400 {
        if std::net::TcpStream::connect(addr).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!("daemon did not start listening at {addr}")
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps the calling thread, and the threads it starts from now on, on `cpus`.
fn pin_to(cpus: impl Iterator<Item = usize>) -> anyhow::Result<()> {
    // SAFETY: `set` is a plain bit set the calls below only fill in and read.
    let done = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if done != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// With `BENCH_PIN`: the cores for the clients (the last one) and for the daemons (the
/// others), when there are at least two.
fn pinned_cores() -> Option<(usize, std::ops::Range<usize>)> {
    std::env::var_os("BENCH_PIN")?;
    let cores = std::thread::available_parallelism().ok()?.get();
    (cores >= 2).then(|| (cores - 1, 0..cores - 1))
}

fn serve_daemon() -> anyhow::Result<()> {
    if let Some((_, daemon_cores)) = pinned_cores() {
        pin_to(daemon_cores)?;
    }
    let socket = PathBuf::from(std::env::var("BENCH_SOCKET")?);
    let datadir = PathBuf::from(std::env::var("BENCH_DATADIR")?);
    let port = std::env::var("BENCH_PORT")?;
    let metrics_port: u16 = std::env::var("BENCH_METRICS_PORT")?.parse()?;
    let settings = std::env::var("BENCH_SETTINGS").unwrap_or_default();
    let mut extra: Vec<(&str, &str)> = vec![("max_clients", "5000")];
    for pair in settings.split(',').filter(|p| !p.is_empty()) {
        extra.push(
            pair.split_once('=')
                .context("BENCH_SETTINGS: key=value,...")?,
        );
    }
    let mut config = regtest_config(&socket, &datadir, &extra);
    config.sv2_port = port.parse()?;
    config.metrics_bind = Some(SocketAddr::from(([127, 0, 0, 1], metrics_port)));
    if std::env::var_os("BENCH_DAEMON_JSON").is_some() {
        config.log_format = sv2_tpd::logging::LogFormat::Json;
    }
    if std::env::var_os("BENCH_DAEMON_LOG").is_some() {
        sv2_tpd::logging::init(&config.log_level, config.log_format)?;
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(sv2_tpd::daemon::run(config))
}

async fn bench_target(
    report: &mut String,
    name: &str,
    node: &Node,
    (addr, key, pid): (SocketAddr, Secp256k1PublicKey, Option<u32>),
    ours: Option<&DaemonProcess>,
    args: &Args,
) -> anyhow::Result<()> {
    writeln!(report, "\n### {name} on {}\n", node.label())?;
    writeln!(
        report,
        "| measurement | clients | p50 | p99 |\n|---|---:|---:|---:|"
    )?;
    let idle_rss = pid.and_then(rss_kib);
    let mut loaded_rss = None;
    for &n in &args.clients {
        let f = measure_tips(node, (addr, key), ours, n, args.rounds).await?;
        let first = "new block → SetNewPrevHash, first client";
        row(report, first, n, &f.first)?;
        row(
            report,
            "new block → SetNewPrevHash, last client",
            n,
            &f.last,
        )?;
        if n > 1 {
            row(report, "first → last client's SetNewPrevHash", n, &f.spread)?;
        }
        if !f.fanout.is_empty() {
            let daemon = "daemon: pair queued → written to the last client";
            row(report, daemon, n, &f.fanout)?;
        }
        if n == *args.clients.iter().max().unwrap_or(&n) {
            loaded_rss = pid.and_then(rss_kib);
        }
        eprintln!("{name}: {n} clients done");
    }
    let fees = measure_fee_bumps(node, addr, key, 5).await?;
    row(report, "fee bump → NewTemplate(future=false)", 1, &fees)?;
    if let Node::Mock(m) = node {
        // More than fits in one block: the template is full-size.
        for _ in 0..8000 {
            m.add_mempool_tx(Amount::from_sat(1_000));
        }
    }
    let (tx_data, txs, bytes) = measure_tx_data(addr, key, Duration::from_millis(2500)).await?;
    writeln!(
        report,
        "| RequestTransactionData, full template ({txs} txs, {} KiB) | 1 | {} | {} |",
        bytes / 1024,
        ms(pct(&tx_data, 0.5)),
        ms(pct(&tx_data, 0.99))
    )?;
    if let (Some(idle), Some(loaded)) = (idle_rss, loaded_rss) {
        writeln!(
            report,
            "\nDaemon RSS: {:.1} MiB idle, {:.1} MiB with {} clients.",
            idle as f64 / 1024.0,
            loaded as f64 / 1024.0,
            args.clients.iter().max().unwrap_or(&0)
        )?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if std::env::args().nth(1).as_deref() == Some("--serve-daemon") {
        return serve_daemon();
    }
    let args = parse_args()?;
    let dir = tempfile::Builder::new().prefix("tpb").tempdir_in("/tmp")?;
    let node = match args.node.as_str() {
        "mock" => Node::Mock(MockNode::start(
            &dir.path().join("node.sock"),
            MockOptions::default(),
        )?),
        "real" => {
            let binary = support::bitcoin_node_binary()
                .context("no bitcoin-node: run tests/build-bitcoin-node.sh or set BITCOIN_NODE")?;
            // The node's own log times its template builds (`-debug=bench`).
            let n = BitcoinNode::start_with_args(
                &binary,
                // Mainnet's default: regtest's checks the whole mempool after each block,
                // before the node reports the tip to anyone (~35 ms at 5,000 transactions).
                &["-debug=bench", "-logtimemicros", "-checkmempool=0"],
            )?;
            n.fund_op_true()?;
            Node::Real(Arc::new(n))
        }
        other => bail!("--node is mock or real, not {other}"),
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = pinned_cores();
    if let Some((client_core, _)) = &pinned {
        pin_to(std::iter::once(*client_core))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut report = String::new();
    writeln!(
        report,
        "Machine: {} cores; `target/release/examples/bench {}`",
        cores,
        std::env::args().skip(1).collect::<Vec<_>>().join(" ")
    )?;
    if let Some((client_core, daemon_cores)) = &pinned {
        writeln!(
            report,
            "Pinned (`BENCH_PIN`): clients on core {client_core}, the daemons on {daemon_cores:?}, the node on all."
        )?;
    }
    let result = runtime.block_on(async {
        if args.parts.basic {
            let daemon = DaemonProcess::start(&node.socket(), &dir.path().join("basic"), "")?;
            let ours = (daemon.addr, daemon.key, Some(daemon.pid()));
            bench_target(&mut report, "sv2-tpd", &node, ours, Some(&daemon), &args).await?;
            drop(daemon);
            if let Some(other) = args.vs {
                let name = format!("other TP at {}", other.0);
                bench_target(&mut report, &name, &node, other, None, &args).await?;
            }
        }
        if let (true, Node::Real(real)) = (args.parts.mempool, &node) {
            let other = args
                .vs
                .map(|(addr, key, _)| tip_first::OtherTp { addr, key });
            tip_first::run(&mut report, real, dir.path(), other, &args.full_mempool).await?;
        }
        if let (true, Node::Real(real)) = (args.parts.groups, &node) {
            tip_first::run_groups(&mut report, real, dir.path(), &args.full_mempool).await?;
        }
        if let (true, Node::Real(_)) = (args.parts.nodes, &node) {
            nodes::run(&mut report, dir.path(), args.rounds).await?;
        }
        anyhow::Ok(())
    });
    result?;
    print!("{report}");
    if let Some(out) = &args.out {
        std::fs::write(out, &report).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}
