//! Interoperability with real Stratum V2 peers, and `sv2-tpd watch`.
//!
//! - The Stratum Reference Implementation's pool (`pool_sv2` 0.7) takes its templates from
//!   `sv2-tpd run` on a real regtest `bitcoin-node`, and SRI's CPU miner (`mining_device`)
//!   mines through that pool: blocks must reach the node, paying the pool's coinbase script.
//! - `sv2-tpd watch` (the library's [`sv2_tpd::watch::run`]) against a scripted server and
//!   against the daemon on a real node.
//!
//! Tests needing the node or the SRI binaries skip with a `skipped:` notice outside CI
//! (see `tests/build-bitcoin-node.sh` and `tests/install-sri.sh`).

mod support;

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bitcoin::hashes::Hash as _;
use bitcoin::{BlockHash, ScriptBuf, WPubkeyHash};
use serde_json::Value;
use stratum_core::{
    binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned},
    template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned},
};
use support::sri::{
    assert_coinbase_pays, mine_through, sri_bin_dir, MiningDevice, Pool, PoolSettings, Sv2Tpd,
};
use support::BitcoinNode;
use sv2_tpd::{
    keys::ServerKeys,
    sv2::{serve, ServerConfig},
    template::{Constraints, EngineHandle, EngineRequest, TemplateEvent},
    watch::{self, WatchOptions},
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_util::sync::CancellationToken;

/// Blocks the miner must get into the chain through the pool.
const BLOCKS_TO_MINE: u64 = 5;
/// Only to avoid hanging when mining stalls; nothing is timed.
const MINING_PATIENCE: Duration = Duration::from_secs(180);
/// Only to avoid hanging on a bug; nothing is timed.
const PATIENCE: Duration = Duration::from_secs(60);

/// Starts a node, or returns from the test after reporting it skipped.
/// The pool's payout script: P2WPKH to a fixed key hash, unlike anything else in the test.
fn pool_payout_script() -> ScriptBuf {
    ScriptBuf::new_p2wpkh(&WPubkeyHash::from_byte_array([0x5a; 20]))
}

#[test]
fn sri_pool_and_cpu_miner_mine_blocks_through_sv2_tpd() -> anyhow::Result<()> {
    let test = "sri_pool_and_cpu_miner_mine_blocks_through_sv2_tpd";
    let Some(bin_dir) = sri_bin_dir(test) else {
        return Ok(());
    };
    let node = node_or_skip!(test, Ok(()));
    node.fund_op_true()?;

    let mut tpd = Sv2Tpd::start(&node)?;
    let workdir = tempfile::tempdir().context("creating the pool's directory")?;
    let payout = pool_payout_script();
    let mut pool = Pool::start(
        &bin_dir,
        workdir.path(),
        &PoolSettings {
            template_provider: tpd.addr,
            template_provider_authority: tpd.authority,
            coinbase_script: &payout,
            shares_per_minute: 20.0,
        },
    )?;
    let start_height = node.block_count()?;
    let mut miner = MiningDevice::start(&bin_dir, workdir.path(), &pool)?;

    let started = Instant::now();
    mine_through(
        &node,
        &mut [&mut tpd.process, &mut pool.process, &mut miner.process],
        start_height,
        BLOCKS_TO_MINE,
        MINING_PATIENCE,
        "the pool",
    )?;
    let height = node.block_count()?;
    eprintln!(
        "{} blocks mined through sv2-tpd by pool_sv2 + mining_device in {:?} \
         (pool logged {} found)",
        height - start_height,
        started.elapsed(),
        pool.blocks_found()
    );

    for h in start_height + 1..=height {
        let block = node.get_block(&node.block_hash(h)?)?;
        assert_coinbase_pays(&block, h, &payout, "the pool's script")?;
    }
    let problems = pool.template_provider_problems();
    assert!(
        problems.is_empty(),
        "the pool reported Template Provider problems:\n{}",
        problems.join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_the_new_tip_after_generatetoaddress() -> anyhow::Result<()> {
    let test = "watch_reports_the_new_tip_after_generatetoaddress";
    let started = tokio::task::block_in_place(|| -> anyhow::Result<_> {
        let Some(node) = BitcoinNode::start_if_available(test)? else {
            return Ok(None);
        };
        node.fund_op_true()?;
        let tpd = Sv2Tpd::start(&node)?;
        Ok(Some((node, tpd)))
    })?;
    let Some((node, tpd)) = started else {
        return Ok(());
    };

    let output = SharedOutput::default();
    let watcher = spawn_watch(
        WatchOptions {
            addr: tpd.addr,
            authority: tpd.authority,
            max_additional_size: 1000,
            max_additional_sigops: 10,
            json: true,
            count: None,
        },
        output.clone(),
    );
    let tip = tokio::task::block_in_place(|| node.best_block_hash())?;
    output
        .wait_for_prev_hash(&tip, &watcher)
        .await
        .context("the tip at subscription time")?;

    let mined = tokio::task::block_in_place(|| node.generate(1))?;
    let new_tip = mined
        .first()
        .context("generatetoaddress returned no hash")?;
    assert_eq!(
        *new_tip,
        tokio::task::block_in_place(|| node.best_block_hash())?
    );
    output
        .wait_for_prev_hash(new_tip, &watcher)
        .await
        .with_context(|| {
            format!(
                "the block from generatetoaddress\n{}",
                tpd.process.log_tail()
            )
        })?;
    watcher.abort();
    Ok(())
}

#[tokio::test]
async fn watch_prints_what_a_template_provider_sends() -> anyhow::Result<()> {
    let mut server = ScriptedServer::start().await?;
    let output = SharedOutput::default();
    let watcher = spawn_watch(
        WatchOptions {
            addr: server.addr,
            authority: server.keys.authority_pubkey(),
            max_additional_size: 4321,
            max_additional_sigops: 17,
            json: true,
            count: Some(2),
        },
        output.clone(),
    );

    let (constraints, events) = within("Subscribe", server.subscription()).await??;
    assert_eq!(
        constraints,
        Constraints {
            max_additional_size: 4321,
            max_additional_sigops: 17,
        }
    );
    let template = new_template(5);
    let prev = prev_hash(5, [0x11; 32]);
    events
        .send(TemplateEvent::NewTemplate(Arc::new(template)))
        .await?;
    events
        .send(TemplateEvent::SetNewPrevHash(Arc::new(prev)))
        .await?;
    within("watch to stop after 2 messages", watcher).await???;

    let lines = output.json_lines()?;
    let types: Vec<&str> = lines.iter().filter_map(|l| l["type"].as_str()).collect();
    assert_eq!(
        types,
        ["SetupConnectionSuccess", "NewTemplate", "SetNewPrevHash"]
    );
    for line in &lines {
        let ts = line["ts"].as_str().context("no ts")?;
        assert!(ts.ends_with('Z') && ts.len() == 27, "ts {ts:?}");
    }
    assert_eq!(lines[0]["used_version"], 2);
    assert_eq!(lines[1]["template_id"], 5);
    assert_eq!(lines[1]["future_template"], true);
    assert_eq!(lines[1]["coinbase_tx_value_remaining"], 5_000_000_000u64);
    assert_eq!(lines[2]["template_id"], 5);
    assert_eq!(
        lines[2]["prev_hash"],
        BlockHash::from_byte_array([0x11; 32]).to_string()
    );
    server.shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn watch_refuses_a_server_signed_by_another_authority() -> anyhow::Result<()> {
    let server = ScriptedServer::start().await?;
    let mut output = Vec::new();
    let result = watch::run(
        WatchOptions {
            addr: server.addr,
            authority: ServerKeys::ephemeral().authority_pubkey(),
            max_additional_size: 0,
            max_additional_sigops: 0,
            json: false,
            count: Some(1),
        },
        &mut output,
    )
    .await;
    let error = format!("{:#}", result.err().context("watch accepted a stranger")?);
    assert!(error.contains("certificate"), "unexpected error: {error}");
    assert!(
        output.is_empty(),
        "printed {:?}",
        String::from_utf8_lossy(&output)
    );
    Ok(())
}

async fn within<T>(what: &str, f: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(PATIENCE, f)
        .await
        .with_context(|| format!("timed out waiting for {what}"))
}

/// Runs `watch` in a task, printing into `output`.
fn spawn_watch(
    opts: WatchOptions,
    mut output: SharedOutput,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    tokio::spawn(async move { watch::run(opts, &mut output).await })
}

/// What `watch` printed, shared between the watching task and the test.
#[derive(Clone, Default)]
struct SharedOutput(Arc<Mutex<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.bytes().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOutput {
    fn bytes(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Every complete line, parsed as JSON.
    fn json_lines(&self) -> anyhow::Result<Vec<Value>> {
        let text = self.text();
        let complete = text.rsplit_once('\n').map_or("", |(lines, _)| lines);
        complete
            .lines()
            .map(|line| serde_json::from_str(line).with_context(|| format!("line {line:?}")))
            .collect()
    }

    /// Waits until a printed `SetNewPrevHash` names `hash`, failing early if `watcher` ends.
    async fn wait_for_prev_hash(
        &self,
        hash: &BlockHash,
        watcher: &tokio::task::JoinHandle<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let wanted = hash.to_string();
        let started = Instant::now();
        loop {
            let seen = self.json_lines()?.iter().any(|line| {
                line["type"] == "SetNewPrevHash" && line["prev_hash"] == wanted.as_str()
            });
            if seen {
                return Ok(());
            }
            if watcher.is_finished() {
                bail!("watch ended early; it printed:\n{}", self.text());
            }
            if started.elapsed() > PATIENCE {
                bail!(
                    "no SetNewPrevHash with prev_hash {wanted} after {PATIENCE:?}; watch printed:\n{}",
                    self.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The SV2 server with the test playing the template engine.
struct ScriptedServer {
    addr: SocketAddr,
    keys: ServerKeys,
    requests: mpsc::Receiver<EngineRequest>,
    shutdown: CancellationToken,
}

impl ScriptedServer {
    async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let keys = ServerKeys::ephemeral();
        let (engine, requests) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            ServerConfig::new(addr),
            keys,
            EngineHandle::from_channel(engine),
            shutdown.clone(),
        ));
        Ok(Self {
            addr,
            keys,
            requests,
            shutdown,
        })
    }

    /// The next client's subscription: its constraints and where its events go.
    async fn subscription(&mut self) -> anyhow::Result<(Constraints, mpsc::Sender<TemplateEvent>)> {
        match self.requests.recv().await {
            Some(EngineRequest::Subscribe {
                constraints,
                events,
            }) => Ok((constraints, events)),
            Some(other) => bail!("expected Subscribe, got {other:?}"),
            None => bail!("the server dropped the engine handle"),
        }
    }
}

fn new_template(template_id: u64) -> NewTemplateOwned {
    NewTemplateOwned {
        template_id,
        future_template: true,
        version: 0x2000_0000,
        coinbase_tx_version: 2,
        coinbase_prefix: B0255Owned::new(vec![3, 0x51, 0x02, 0x01]).expect("4 bytes fit"),
        coinbase_tx_input_sequence: u32::MAX,
        coinbase_tx_value_remaining: 5_000_000_000,
        coinbase_tx_outputs_count: 0,
        coinbase_tx_outputs: B064KOwned::new(Vec::new()).expect("empty fits"),
        coinbase_tx_locktime: 0,
        merkle_path: Seq0255Owned::new(Vec::new()).expect("empty fits"),
    }
}

fn prev_hash(template_id: u64, prev_hash: [u8; 32]) -> SetNewPrevHashOwned {
    SetNewPrevHashOwned {
        template_id,
        prev_hash: U256Owned::new(prev_hash.to_vec()).expect("32 bytes"),
        header_timestamp: 1_700_000_000,
        n_bits: 0x207f_ffff,
        target: U256Owned::new(vec![0xff; 32]).expect("32 bytes"),
    }
}
