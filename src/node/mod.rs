//! Client for Bitcoin Core's IPC `Mining` interface.
//!
//! [`NodeClient::connect`] opens the node's unix socket, runs the libmultiprocess
//! bootstrap on a dedicated IPC thread and detects the interface line. Every call that may
//! be outstanding at once runs on its own node-side thread (borrowed from a pool), so a
//! `submitSolution` never queues behind a blocking `waitTipChanged`. Templates live in the node;
//! a [`Template`] holds a reference and releases it when the last clone drops.

mod endpoint;
mod error;
mod ipc;
pub mod schema;
mod socket_check;
mod types;

use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bitcoin::consensus::{deserialize, serialize};
use bitcoin::{Block, Transaction};
use tokio::sync::watch;

pub use endpoint::{Endpoint, ExpectedChain, NodeSpec};
pub use error::NodeError;
pub use types::{CoinbaseTemplate, CreateOptions, NodeLine, SubmitVerdict, TemplateData, Tip};

use error::is_unimplemented;
use ipc::{timed, timed_raw, Jobs};

/// Deadline of calls that are not waits when none is configured (`node_call_timeout`).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's socket for `chain_subdir` under `datadir`, as Bitcoin Core places it:
/// `<datadir>/<subdir>/node.sock` (no subdir for mainnet).
pub fn default_socket_path(datadir: &Path, chain_subdir: Option<&str>) -> PathBuf {
    match chain_subdir {
        Some(sub) => datadir.join(sub).join("node.sock"),
        None => datadir.join("node.sock"),
    }
}

/// A connection to the node's `Mining` interface. Cheap to clone and `Send`.
#[derive(Clone, Debug)]
pub struct NodeClient {
    jobs: Jobs,
    line: watch::Receiver<NodeLine>,
    closed: watch::Receiver<bool>,
}

impl NodeClient {
    /// Connects to the node at `socket`, bootstraps, and detects its interface line.
    /// A v30 node is refused with [`NodeError::UnsupportedVersion`]. Calls that are not
    /// waits get [`DEFAULT_CALL_TIMEOUT`] (see [`NodeClient::connect_with_timeout`]).
    pub async fn connect(socket: &Path) -> Result<Self, NodeError> {
        Self::connect_with_timeout(&Endpoint::from(socket), DEFAULT_CALL_TIMEOUT).await
    }

    /// Like [`NodeClient::connect`], with every call that is not a wait (everything but
    /// `createNewBlock`, `waitTipChanged` and `makeMining`) failing with
    /// [`NodeError::Timeout`] when the node has not answered within `call_timeout`.
    pub async fn connect_with_timeout(
        endpoint: &Endpoint,
        call_timeout: Duration,
    ) -> Result<Self, NodeError> {
        let connected = ipc::connect(endpoint, call_timeout).await?;
        let client = Self {
            jobs: connected.jobs,
            line: connected.line,
            closed: connected.closed,
        };
        tracing::info!(%endpoint, line = client.line().label(), "connected to the node");
        Ok(client)
    }

    /// The interface line: v31.0 or v31.99 from connect; v32 once a submit was answered
    /// by `submitSolution @10` (nothing is sent to find out).
    pub fn line(&self) -> NodeLine {
        *self.line.borrow()
    }

    /// Follows the interface line (it changes once, to v32, when a submit shows it).
    pub fn lines(&self) -> watch::Receiver<NodeLine> {
        self.line.clone()
    }

    /// Whether `other` is this very connection.
    pub fn same_connection(&self, other: &NodeClient) -> bool {
        self.jobs.same_connection(&other.jobs)
    }

    /// Whether `template` was made over this very connection.
    pub fn made(&self, template: &Template) -> bool {
        self.jobs.same_connection(template.jobs())
    }

    /// True once the IPC connection has ended.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves when the IPC connection ends (node stopped, crashed, restarted).
    pub async fn closed(&self) {
        let mut closed = self.closed.clone();
        let _ = closed.wait_for(|c| *c).await;
    }

    /// The current chain tip, `None` before the node has one.
    pub async fn tip(&self) -> Result<Option<Tip>, NodeError> {
        self.get_tip(true).await
    }

    /// [`NodeClient::tip`] without the call deadline, for a caller that applies its own
    /// and keeps the one call pending when it passes (the liveness probe), rather than
    /// abandoning it and sending another to a node that does not answer.
    pub async fn tip_unbounded(&self) -> Result<Option<Tip>, NodeError> {
        self.get_tip(false).await
    }

    async fn get_tip(&self, bounded: bool) -> Result<Option<Tip>, NodeError> {
        self.jobs
            .run(move |s| async move {
                let worker = s.worker();
                let mut request = s.mining.get_tip_request();
                request.get().init_context().set_thread(worker.thread());
                let response = match bounded {
                    true => {
                        s.call(Some(&worker), "getTip", request.send().promise)
                            .await?
                    }
                    false => timed("getTip", request.send().promise).await?,
                };
                let results = response
                    .get()
                    .map_err(|e| NodeError::from_capnp("getTip", e))?;
                ipc::optional_block_ref("getTip", results.get_has_result(), results.get_result())
            })
            .await
    }

    /// Whether the node runs a test chain (`isTestChain`): false only on mainnet.
    pub async fn is_test_chain(&self) -> Result<bool, NodeError> {
        self.jobs
            .run(|s| async move {
                let worker = s.worker();
                let mut request = s.mining.is_test_chain_request();
                request.get().init_context().set_thread(worker.thread());
                let response = s
                    .call(Some(&worker), "isTestChain", request.send().promise)
                    .await?;
                response
                    .get()
                    .map(|r| r.get_result())
                    .map_err(|e| NodeError::from_capnp("isTestChain", e))
            })
            .await
    }

    /// Whether the node is still in initial block download.
    pub async fn is_initial_block_download(&self) -> Result<bool, NodeError> {
        self.jobs
            .run(|s| async move {
                let worker = s.worker();
                let mut request = s.mining.is_initial_block_download_request();
                request.get().init_context().set_thread(worker.thread());
                let response = s
                    .call(
                        Some(&worker),
                        "isInitialBlockDownload",
                        request.send().promise,
                    )
                    .await?;
                response
                    .get()
                    .map(|r| r.get_result())
                    .map_err(|e| NodeError::from_capnp("isInitialBlockDownload", e))
            })
            .await
    }

    /// Waits until the tip is no longer `current` or `timeout` passed; returns the tip
    /// then (the same one on timeout). `None` when interrupted or the node shuts down.
    /// Runs on a node thread of its own, like every call.
    pub async fn wait_tip_changed(
        &self,
        current: bitcoin::BlockHash,
        timeout: std::time::Duration,
    ) -> Result<Option<Tip>, NodeError> {
        self.jobs
            .run(move |s| async move {
                let worker = s.worker();
                let mut request = s.mining.wait_tip_changed_request();
                let mut params = request.get();
                params.reborrow().init_context().set_thread(worker.thread());
                params.set_current_tip(bitcoin::hashes::Hash::as_byte_array(&current));
                params.set_timeout(timeout.as_secs_f64() * 1000.0);
                let response = timed("waitTipChanged", request.send().promise).await?;
                let results = response
                    .get()
                    .map_err(|e| NodeError::from_capnp("waitTipChanged", e))?;
                ipc::optional_block_ref(
                    "waitTipChanged",
                    results.has_result(),
                    results.get_result(),
                )
            })
            .await
    }

    /// Cancels a pending `createNewBlock` / `waitTipChanged`; sticky: with none pending
    /// it cancels the next one.
    #[cfg(feature = "mock")]
    pub async fn interrupt(&self) -> Result<(), NodeError> {
        self.jobs
            .run(|s| async move {
                s.call(
                    None,
                    "interrupt",
                    s.mining.interrupt_request().send().promise,
                )
                .await?;
                Ok(())
            })
            .await
    }

    /// Submits a whole block (`Mining.submitBlock`, 31.99 and later) — for a solution
    /// whose template died with an earlier connection. UNIMPLEMENTED on v31.0. Waited for
    /// to the node's answer or the connection's end, however long (never abandoned).
    pub async fn submit_block(&self, block: &Block) -> Result<SubmitVerdict, NodeError> {
        let bytes = serialize(block);
        self.jobs
            .run(move |s| async move {
                let worker = s.worker();
                let mut request = s.mining.submit_block_request();
                let mut p = request.get();
                p.reborrow().init_context().set_thread(worker.thread());
                p.set_block(&bytes);
                let response = s
                    .patient("submitBlock", timed("submitBlock", request.send().promise))
                    .await?;
                let r = response
                    .get()
                    .map_err(|e| NodeError::from_capnp("submitBlock", e))?;
                Ok(verdict(r.get_result(), r.get_reason()))
            })
            .await
    }

    /// Asks the node for a new template and reads what its messages need — in one
    /// round trip (the reads are pipelined on the template promise). Blocks while the
    /// node is in IBD. `Err(ShuttingDown)` when interrupted.
    pub async fn create_new_block(&self, options: CreateOptions) -> Result<Template, NodeError> {
        let jobs = self.jobs.clone();
        self.jobs
            .run(move |s| async move {
                let worker = s.worker();
                let mut request = s.mining.create_new_block_request();
                let mut params = request.get();
                params.reborrow().init_context().set_thread(worker.thread());
                params.set_cooldown(options.cooldown);
                let mut o = params.reborrow().init_options();
                o.set_use_mempool(options.use_mempool);
                o.set_block_reserved_weight(options.block_reserved_weight);
                o.set_coinbase_output_max_additional_sigops(
                    options.coinbase_output_max_additional_sigops,
                );
                let call = request.send();
                let template = call.pipeline.get_result();
                let (response, data) = futures::join!(
                    timed("createNewBlock", call.promise),
                    s.read_template(&template, &worker)
                );
                let results = response?;
                let results = results
                    .get()
                    .map_err(|e| NodeError::from_capnp("createNewBlock", e))?;
                if !results.has_result() {
                    return Err(NodeError::ShuttingDown);
                }
                let data = data?;
                // Made here, not by the caller: if the caller gave up meanwhile, dropping
                // the `Template` still releases what the node made.
                Ok(Template::new(jobs, s.hold(template), data))
            })
            .await
    }

    /// Releases every template still held (each once no call on it runs) and waits,
    /// briefly, until the node has destroyed them. For shutdown.
    pub async fn release_all(&self) {
        let _ = self
            .jobs
            .run(|s| async move {
                s.release_all().await;
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
                while s.held_count() > 0 && std::time::Instant::now() < deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Ok(())
            })
            .await;
    }
}

/// Releases the node-side template when the last clone of its [`Template`] drops.
#[derive(Debug)]
struct TemplateRef {
    jobs: Jobs,
    key: u64,
}

impl Drop for TemplateRef {
    fn drop(&mut self) {
        let key = self.key;
        self.jobs.spawn(move |s| async move { s.release(key) });
    }
}

/// A block template held in the node, with the data read when it was made.
#[derive(Clone, Debug)]
pub struct Template {
    inner: Arc<TemplateRef>,
    data: Arc<TemplateData>,
}

impl Template {
    fn new(jobs: Jobs, key: u64, data: TemplateData) -> Self {
        Self {
            inner: Arc::new(TemplateRef { jobs, key }),
            data: Arc::new(data),
        }
    }

    /// Header, coinbase requirements, merkle path and fees.
    pub fn data(&self) -> &Arc<TemplateData> {
        &self.data
    }

    fn key(&self) -> u64 {
        self.inner.key
    }

    fn jobs(&self) -> &Jobs {
        &self.inner.jobs
    }

    /// The full block (with a dummy coinbase), for the transaction data. Waited for to the
    /// node's answer or the connection's end: it holds the template's exclusive lock.
    pub async fn block(&self) -> Result<Block, NodeError> {
        let key = self.key();
        self.jobs()
            .run(move |s| async move {
                let client = s.template(key)?;
                s.patient("getBlock", s.exclusive_call(key, get_block(&s, client)))
                    .await
            })
            .await
    }

    /// Submits a solved header with `coinbase` (serialized with witness). Uses the v32
    /// line's `submitSolution @10` first and `@7` only when the node says @10 is
    /// UNIMPLEMENTED (on v32, `@7` throws without submitting). On a node thread of its
    /// own. Waited for to the node's answer or the connection's end, however long: a
    /// submit is never abandoned, so it is never sent twice at once.
    pub async fn submit_solution(
        &self,
        version: u32,
        timestamp: u32,
        nonce: u32,
        coinbase: &Transaction,
    ) -> Result<SubmitVerdict, NodeError> {
        let key = self.key();
        let solution = Solution {
            version,
            timestamp,
            nonce,
            coinbase: serialize(coinbase),
        };
        self.jobs()
            .run(move |s| async move {
                let client = s.template(key)?;
                let work = s.exclusive_call(key, submit(&s, client, solution));
                s.patient("submitSolution", work).await
            })
            .await
    }
}

/// The header fields and coinbase of a solution, as `submitSolution` takes them.
struct Solution {
    version: u32,
    timestamp: u32,
    nonce: u32,
    coinbase: Vec<u8>,
}

async fn get_block(
    s: &Rc<ipc::Session>,
    client: schema::mining_capnp::block_template::Client,
) -> Result<Block, NodeError> {
    let worker = s.worker();
    let mut request = client.get_block_request();
    request.get().init_context().set_thread(worker.thread());
    let response = timed("getBlock", request.send().promise).await?;
    let bytes = response
        .get()
        .and_then(|r| r.get_result())
        .map_err(|e| NodeError::from_capnp("getBlock", e))?;
    deserialize(bytes).map_err(|e| NodeError::Malformed {
        what: "block",
        detail: e.to_string(),
    })
}

async fn submit(
    s: &Rc<ipc::Session>,
    client: schema::mining_capnp::block_template::Client,
    solution: Solution,
) -> Result<SubmitVerdict, NodeError> {
    let worker = s.worker();
    if s.submit_v32() != Some(false) {
        let mut request = client.submit_solution_v32_request();
        let mut p = request.get();
        p.reborrow().init_context().set_thread(worker.thread());
        p.set_version(solution.version);
        p.set_timestamp(solution.timestamp);
        p.set_nonce(solution.nonce);
        p.set_coinbase(&solution.coinbase);
        match timed_raw("submitSolution", request.send().promise).await {
            Err(e) if is_unimplemented(&e) => s.learn_submit_v32(false),
            Err(e) => return Err(NodeError::from_capnp("submitSolution", e)),
            Ok(response) => {
                s.learn_submit_v32(true);
                let r = response
                    .get()
                    .map_err(|e| NodeError::from_capnp("submitSolution", e))?;
                return Ok(verdict(r.get_result(), r.get_reason()));
            }
        }
    }
    let mut request = client.submit_solution_request();
    let mut p = request.get();
    p.reborrow().init_context().set_thread(worker.thread());
    p.set_version(solution.version);
    p.set_timestamp(solution.timestamp);
    p.set_nonce(solution.nonce);
    p.set_coinbase(&solution.coinbase);
    let response = timed("submitSolution", request.send().promise).await?;
    let accepted = response
        .get()
        .map(|r| r.get_result())
        .map_err(|e| NodeError::from_capnp("submitSolution", e))?;
    Ok(SubmitVerdict {
        accepted,
        reason: if accepted {
            String::new()
        } else {
            "rejected".into()
        },
    })
}

/// A verdict from a `(reason, debug, result)` answer.
fn verdict(accepted: bool, reason: capnp::Result<capnp::text::Reader<'_>>) -> SubmitVerdict {
    SubmitVerdict {
        accepted,
        reason: reason
            .ok()
            .and_then(|t| t.to_str().ok())
            .unwrap_or_default()
            .to_string(),
    }
}
