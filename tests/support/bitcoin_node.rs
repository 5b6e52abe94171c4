//! A real regtest `bitcoin-node` (Bitcoin Core with IPC) run as a child process for tests.
//!
//! [`BitcoinNode`] owns a throw-away data directory, listens for IPC on
//! `<datadir>/regtest/node.sock` and answers JSON-RPC on a free local port with cookie
//! authentication. It is stopped (RPC `stop`, then SIGKILL) and its data directory removed
//! when dropped.
#![allow(dead_code)]

use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bitcoin::consensus::encode::{deserialize_hex, serialize_hex};
use bitcoin::{Address, Block, BlockHash, Transaction, Txid};
use serde_json::{json, Value};
use tempfile::TempDir;

use super::op_true::{op_true_address, CoinTracker};

/// Version of the `libbitcoinkernel-sys` crate whose Bitcoin Core source
/// `tests/build-bitcoin-node.sh` builds; part of the cache path.
const KERNEL_SYS_VERSION: &str = "0.4.1";
/// How long a node may take to become ready (generous: the machine is shared).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a node may take to exit after RPC `stop` before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one RPC round trip (generating blocks is the slowest call).
const RPC_TIMEOUT_SECS: u64 = 300;
/// Pause between readiness / exit polls.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of each log file quoted in start-up errors.
const LOG_TAIL_LINES: usize = 30;

/// Everything that can go wrong while driving a test node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node binary could not be executed.
    #[error("could not start {binary}: {source}")]
    Spawn {
        /// The binary that was run.
        binary: PathBuf,
        /// Why it failed.
        source: io::Error,
    },
    /// A file or process operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The node process exited while we waited for it to become ready.
    #[error("bitcoin-node exited before it was ready ({status}); log tail:\n{log_tail}")]
    ExitedEarly {
        /// The exit status.
        status: ExitStatus,
        /// The end of its stderr and debug.log.
        log_tail: String,
    },
    /// The node did not answer RPC or create its IPC socket in time.
    #[error("bitcoin-node not ready after {waited:?} (last problem: {last_problem}); log tail:\n{log_tail}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// The last reason it was not ready.
        last_problem: String,
        /// The end of its stderr and debug.log.
        log_tail: String,
    },
    /// The HTTP request carrying an RPC call failed.
    #[error("RPC {method}: HTTP request failed: {source}")]
    Http {
        /// The RPC method.
        method: String,
        /// Why it failed.
        source: minreq::Error,
    },
    /// The node answered an RPC call with an error.
    #[error("RPC {method} failed with code {code}: {message}")]
    Rpc {
        /// The RPC method.
        method: String,
        /// Bitcoin Core's RPC error code (e.g. -28 while warming up).
        code: i64,
        /// Bitcoin Core's message.
        message: String,
    },
    /// The node's answer did not have the expected shape.
    #[error("RPC {method}: unexpected response: {detail}")]
    BadResponse {
        /// The RPC method.
        method: String,
        /// What was wrong with it.
        detail: String,
    },
    /// No mature, unspent coin paying to the OP_TRUE script is known.
    #[error("no spendable OP_TRUE coin (call fund_op_true, or generate more blocks to mature coinbases)")]
    NoSpendableCoin,
}

/// Result of test-node operations.
pub type Result<T> = std::result::Result<T, NodeError>;

/// The `bitcoin-node` binary to test against, if there is one.
///
/// `BITCOIN_NODE` wins; otherwise the cache that `tests/build-bitcoin-node.sh` fills.
/// When neither exists this panics under CI (env `CI` set), so a missing node can never
/// silently skip the real-node tests there, and returns `None` elsewhere.
pub fn bitcoin_node_binary() -> Option<PathBuf> {
    let candidate = match std::env::var_os("BITCOIN_NODE") {
        Some(path) => PathBuf::from(path),
        None => default_cache_path()?,
    };
    if candidate.is_file() {
        return Some(candidate);
    }
    if std::env::var_os("CI").is_some() {
        panic!(
            "CI is set but there is no bitcoin-node at {} (run `bash tests/build-bitcoin-node.sh` \
             and export BITCOIN_NODE=<its output>)",
            candidate.display()
        );
    }
    None
}

/// Tells both cargo's captured output and stderr that a test did not run.
pub fn report_skipped(test: &str) {
    println!("skipped: no bitcoin-node ({test})");
    eprintln!("skipped: no bitcoin-node ({test})");
}

fn default_cache_path() -> Option<PathBuf> {
    let cache_root = match std::env::var_os("SV2TPD_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/sv2-tpd"),
    };
    Some(
        cache_root
            .join(format!("bitcoin-node-kernel-sys-{KERNEL_SYS_VERSION}"))
            .join("bin/bitcoin-node"),
    )
}

/// A running regtest `bitcoin-node` with IPC and RPC, owned by a test.
///
/// All methods take `&self`, so one node can be shared (e.g. in an `Arc`) between test
/// threads. The RPC methods block: call them from `spawn_blocking` inside async tests
/// that must keep their runtime responsive.
pub struct BitcoinNode {
    binary: PathBuf,
    extra_args: Vec<String>,
    datadir: TempDir,
    rpc_port: u16,
    p2p_port: u16,
    process: Mutex<Option<Child>>,
    pid: AtomicU32,
    next_rpc_id: AtomicU64,
    pub(super) coins: Mutex<CoinTracker>,
}

impl BitcoinNode {
    /// Starts a node from the binary found by [`bitcoin_node_binary`], or returns `None`
    /// (after printing `skipped: no bitcoin-node`) when there is none outside CI.
    pub fn start_if_available(test: &str) -> Result<Option<Self>> {
        match bitcoin_node_binary() {
            Some(binary) => Self::start(&binary).map(Some),
            None => {
                report_skipped(test);
                Ok(None)
            }
        }
    }

    /// Starts `binary` on a fresh regtest data directory and waits until it answers RPC
    /// and listens on its IPC socket.
    pub fn start(binary: &Path) -> Result<Self> {
        Self::start_with_args(binary, &[])
    }

    /// Same as [`Self::start`], with more command-line options (e.g. `-debug=bench`).
    pub fn start_with_args(binary: &Path, extra_args: &[&str]) -> Result<Self> {
        // Unix socket paths must fit in 108 bytes, so keep the data directory short.
        let datadir = tempfile::Builder::new()
            .prefix("btn-")
            .tempdir_in("/tmp")
            .map_err(|source| io_error("creating a data directory in /tmp", source))?;
        let node = Self {
            binary: binary.to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            datadir,
            rpc_port: free_local_port()?,
            p2p_port: free_local_port()?,
            process: Mutex::new(None),
            pid: AtomicU32::new(0),
            next_rpc_id: AtomicU64::new(0),
            coins: Mutex::new(CoinTracker::default()),
        };
        node.launch()?;
        Ok(node)
    }

    /// The data directory (the node's `-datadir`).
    pub fn datadir(&self) -> &Path {
        self.datadir.path()
    }

    /// The IPC unix socket, `<datadir>/regtest/node.sock`.
    pub fn socket_path(&self) -> PathBuf {
        self.network_dir().join("node.sock")
    }

    /// The node's debug log, useful when a test fails.
    pub fn debug_log_path(&self) -> PathBuf {
        self.network_dir().join("debug.log")
    }

    /// The local P2P port (listened on only when started with `-listen=1`).
    pub fn p2p_port(&self) -> u16 {
        self.p2p_port
    }

    /// The local RPC port.
    pub fn rpc_port(&self) -> u16 {
        self.rpc_port
    }

    /// The process id of the most recently started node process.
    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::SeqCst)
    }

    /// Whether the node process is currently alive.
    pub fn is_running(&self) -> bool {
        match self.process().as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Calls RPC `method` with positional (array) or named (object) `params` and returns
    /// its `result`.
    pub fn rpc(&self, method: &str, params: Value) -> Result<Value> {
        let cookie_path = self.network_dir().join(".cookie");
        let cookie = fs::read_to_string(&cookie_path).map_err(|source| {
            io_error(
                format!("reading RPC cookie {}", cookie_path.display()),
                source,
            )
        })?;
        let credentials = base64::engine::general_purpose::STANDARD.encode(cookie.trim());
        let id = self.next_rpc_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({ "jsonrpc": "1.0", "id": id, "method": method, "params": params });
        let response = minreq::post(format!("http://127.0.0.1:{}/", self.rpc_port))
            .with_header("Authorization", format!("Basic {credentials}"))
            .with_header("Content-Type", "application/json")
            .with_body(body.to_string())
            .with_timeout(RPC_TIMEOUT_SECS)
            .send()
            .map_err(|source| NodeError::Http {
                method: method.to_owned(),
                source,
            })?;
        let bad_response = |detail: String| NodeError::BadResponse {
            method: method.to_owned(),
            detail,
        };
        let text = response.as_str().map_err(|e| {
            bad_response(format!(
                "HTTP {}: body is not text: {e}",
                response.status_code
            ))
        })?;
        let mut reply: Value = serde_json::from_str(text)
            .map_err(|_| bad_response(format!("HTTP {}: {text}", response.status_code)))?;
        match reply.get("error") {
            None | Some(Value::Null) => {}
            Some(error) => {
                return Err(NodeError::Rpc {
                    method: method.to_owned(),
                    code: error["code"].as_i64().unwrap_or_default(),
                    message: error["message"].as_str().unwrap_or_default().to_owned(),
                })
            }
        }
        reply
            .get_mut("result")
            .map(Value::take)
            .ok_or_else(|| bad_response(format!("no result in {text}")))
    }

    /// Mines `count` blocks paying their coinbase to `address`; returns their hashes.
    pub fn generate_to_address(&self, count: u64, address: &Address) -> Result<Vec<BlockHash>> {
        let method = "generatetoaddress";
        let hashes = self.rpc(method, json!([count, address.to_string()]))?;
        let hashes = hashes.as_array().ok_or_else(|| NodeError::BadResponse {
            method: method.to_owned(),
            detail: format!("expected an array, got {hashes}"),
        })?;
        hashes
            .iter()
            .map(|hash| parse_hex_string(method, hash))
            .collect()
    }

    /// Mines `count` blocks paying to the OP_TRUE address, so their coinbases can later be
    /// spent without keys; returns their hashes.
    pub fn generate(&self, count: u64) -> Result<Vec<BlockHash>> {
        self.generate_to_address(count, &op_true_address())
    }

    /// Height of the active chain's tip.
    pub fn block_count(&self) -> Result<u64> {
        let method = "getblockcount";
        let count = self.rpc(method, json!([]))?;
        count.as_u64().ok_or_else(|| NodeError::BadResponse {
            method: method.to_owned(),
            detail: format!("expected a height, got {count}"),
        })
    }

    /// Hash of the active chain's tip.
    pub fn best_block_hash(&self) -> Result<BlockHash> {
        let method = "getbestblockhash";
        parse_hex_string(method, &self.rpc(method, json!([]))?)
    }

    /// Hash of the active chain's block at `height`.
    pub fn block_hash(&self, height: u64) -> Result<BlockHash> {
        let method = "getblockhash";
        parse_hex_string(method, &self.rpc(method, json!([height]))?)
    }

    /// The full block `hash`, decoded from the node's serialization.
    pub fn get_block(&self, hash: &BlockHash) -> Result<Block> {
        let method = "getblock";
        let raw = self.rpc(method, json!([hash.to_string(), 0]))?;
        decode_hex_value(method, &raw)
    }

    /// Submits `tx` to the mempool (RPC `sendrawtransaction`).
    pub fn send_raw_transaction(&self, tx: &Transaction) -> Result<Txid> {
        let method = "sendrawtransaction";
        parse_hex_string(method, &self.rpc(method, json!([serialize_hex(tx)]))?)
    }

    /// Ids of all transactions in the mempool.
    pub fn mempool_txids(&self) -> Result<Vec<Txid>> {
        let method = "getrawmempool";
        let txids = self.rpc(method, json!([]))?;
        let txids = txids.as_array().ok_or_else(|| NodeError::BadResponse {
            method: method.to_owned(),
            detail: format!("expected an array, got {txids}"),
        })?;
        txids
            .iter()
            .map(|txid| parse_hex_string(method, txid))
            .collect()
    }

    /// Writes the chainstate and block index to disk (via RPC `gettxoutsetinfo none`), so
    /// the current chain survives a later [`Self::kill9`].
    pub fn flush_to_disk(&self) -> Result<()> {
        self.rpc("gettxoutsetinfo", json!(["none"])).map(drop)
    }

    /// Kills the node with SIGKILL (no clean shutdown) and reaps it, to simulate a crash.
    /// Does nothing when it is not running.
    pub fn kill9(&self) -> Result<()> {
        let Some(mut child) = self.process().take() else {
            return Ok(());
        };
        kill_and_reap(&mut child)
    }

    /// Stops the node cleanly (RPC `stop`, SIGKILL after a timeout) and waits for it to
    /// exit. Does nothing when it is not running.
    pub fn stop(&self) -> Result<()> {
        let Some(mut child) = self.process().take() else {
            return Ok(());
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return Ok(());
        }
        // If `stop` fails the node is unhealthy; the kill below still ends it.
        let _ = self.rpc("stop", json!([]));
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => return Ok(()),
                Ok(None) => thread::sleep(POLL_INTERVAL),
                Err(source) => return Err(io_error("waiting for bitcoin-node to exit", source)),
            }
        }
        tracing::warn!(
            pid = child.id(),
            "bitcoin-node ignored RPC stop; killing it"
        );
        kill_and_reap(&mut child)
    }

    /// Starts the node again on the same data directory and ports (stopping it cleanly
    /// first if it is running) and waits until it is ready.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    fn network_dir(&self) -> PathBuf {
        self.datadir.path().join("regtest")
    }

    fn process(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock leaves the child handle intact; keep using it.
        self.process
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn stderr_path(&self) -> PathBuf {
        self.datadir.path().join("stderr.log")
    }

    /// Spawns the process and waits until it is ready.
    fn launch(&self) -> Result<()> {
        // Stale files from a killed run would make readiness look true too early.
        for stale in [self.socket_path(), self.network_dir().join(".cookie")] {
            match fs::remove_file(&stale) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(io_error(format!("removing {}", stale.display()), source))
                }
            }
        }
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .map_err(|source| io_error("creating the node's stderr log", source))?;
        let child = Command::new(&self.binary)
            .arg("-regtest")
            .arg(format!("-datadir={}", self.datadir.path().display()))
            .arg("-ipcbind=unix")
            .arg("-server")
            .arg("-rpcbind=127.0.0.1")
            .arg("-rpcallowip=127.0.0.1")
            .arg(format!("-rpcport={}", self.rpc_port))
            .arg(format!("-port={}", self.p2p_port))
            .arg("-listen=0")
            .arg("-connect=0")
            .arg("-printtoconsole=0")
            .arg("-debug=ipc")
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|source| NodeError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        self.pid.store(child.id(), Ordering::SeqCst);
        *self.process() = Some(child);
        self.wait_until_ready()
    }

    fn wait_until_ready(&self) -> Result<()> {
        let started = Instant::now();
        let mut last_problem = String::from("not polled yet");
        while started.elapsed() < READY_TIMEOUT {
            if let Some(status) = self.exit_status()? {
                self.process().take();
                return Err(NodeError::ExitedEarly {
                    status,
                    log_tail: self.log_tail(),
                });
            }
            match self.rpc("getblockchaininfo", json!([])) {
                Ok(_) if self.socket_path().exists() => return Ok(()),
                Ok(_) => last_problem = format!("{} missing", self.socket_path().display()),
                Err(problem) => last_problem = problem.to_string(),
            }
            thread::sleep(POLL_INTERVAL);
        }
        Err(NodeError::NotReady {
            waited: started.elapsed(),
            last_problem,
            log_tail: self.log_tail(),
        })
    }

    fn exit_status(&self) -> Result<Option<ExitStatus>> {
        match self.process().as_mut() {
            Some(child) => child
                .try_wait()
                .map_err(|source| io_error("polling bitcoin-node", source)),
            None => Ok(None),
        }
    }

    fn log_tail(&self) -> String {
        [self.stderr_path(), self.debug_log_path()]
            .iter()
            .map(|path| {
                let text = fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
                format!("--- {} ---\n{tail}", path.display())
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for BitcoinNode {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("stopping bitcoin-node (pid {}): {error}", self.pid());
        }
    }
}

fn kill_and_reap(child: &mut Child) -> Result<()> {
    // `Child::kill` sends SIGKILL on Unix; it fails only if the child was already reaped.
    if let Err(source) = child.kill() {
        if source.kind() != io::ErrorKind::InvalidInput {
            return Err(io_error("killing bitcoin-node", source));
        }
    }
    child
        .wait()
        .map(drop)
        .map_err(|source| io_error("reaping bitcoin-node", source))
}

/// A local TCP port that is free right now (the OS picks it).
pub fn free_local_port() -> Result<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| io_error("finding a free local port", source))
}

fn io_error(context: impl Into<String>, source: io::Error) -> NodeError {
    NodeError::Io {
        context: context.into(),
        source,
    }
}

/// Parses a JSON string holding a hex hash or id (`BlockHash`, `Txid`).
fn parse_hex_string<T: FromStr>(method: &str, value: &Value) -> Result<T>
where
    T::Err: std::fmt::Display,
{
    let text = value.as_str().ok_or_else(|| NodeError::BadResponse {
        method: method.to_owned(),
        detail: format!("expected a hex string, got {value}"),
    })?;
    text.parse().map_err(|e| NodeError::BadResponse {
        method: method.to_owned(),
        detail: format!("{text:?}: {e}"),
    })
}

/// Decodes a JSON string holding a consensus-serialized object in hex.
pub(super) fn decode_hex_value<T: bitcoin::consensus::Decodable>(
    method: &str,
    value: &Value,
) -> Result<T> {
    let text = value.as_str().ok_or_else(|| NodeError::BadResponse {
        method: method.to_owned(),
        detail: format!("expected hex, got {value}"),
    })?;
    deserialize_hex(text).map_err(|e| NodeError::BadResponse {
        method: method.to_owned(),
        detail: format!("undecodable hex: {e}"),
    })
}
