//! The IPC side: one OS thread with a `LocalSet` that owns the Cap'n Proto connection
//! (capnp-rpc is `!Send`). The rest of the daemon reaches it through [`Jobs`]: closures
//! sent over a channel and run on that thread.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use bitcoin::consensus::deserialize;
use bitcoin::hashes::Hash;
use bitcoin::{Amount, BlockHash, TxMerkleNode, TxOut};
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures::future::LocalBoxFuture;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use super::endpoint::Endpoint;
use super::error::is_unimplemented;
use super::schema::{init_capnp, mining_capnp, proxy_capnp};
use super::types::{CoinbaseTemplate, NodeLine, TemplateData, Tip};
use super::NodeError;
use crate::metrics::metrics;

/// Node-side threads kept for reuse; more are released (the node joins them).
const IDLE_THREADS_KEPT: usize = 8;

/// Work for the IPC thread.
pub(crate) type Job = Box<dyn FnOnce(Rc<Session>) -> LocalBoxFuture<'static, ()> + Send>;

/// The `Send` side of the IPC thread.
#[derive(Clone, Debug)]
pub(crate) struct Jobs {
    tx: mpsc::UnboundedSender<Job>,
}

impl Jobs {
    /// Whether `other` reaches the same IPC thread (the same connection).
    pub(crate) fn same_connection(&self, other: &Jobs) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Runs `f` on the IPC thread and returns its result.
    pub(crate) async fn run<T, F, Fut>(&self, f: F) -> Result<T, NodeError>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Session>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, NodeError>> + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |session| {
            Box::pin(async move {
                let _ = reply.send(f(session).await);
            })
        });
        self.tx.send(job).map_err(|_| NodeError::Disconnected)?;
        answer.await.map_err(|_| NodeError::Disconnected)?
    }

    /// Runs `f` on the IPC thread without waiting for it.
    pub(crate) fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Rc<Session>) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move |session| Box::pin(f(session)));
        let _ = self.tx.send(job);
    }
}

/// A template the node keeps for us, with the bookkeeping that keeps its release safe.
struct HeldTemplate {
    client: mining_capnp::block_template::Client,
    /// Calls on it still running in the node (`getBlock`, `submitSolution`).
    in_flight: u32,
    /// Released by its owner; destroy once no call is in flight.
    released: bool,
    /// Held by `getBlock` and `submitSolution`: the node's `submitSolution` rewrites the
    /// template's block in place, so neither may overlap another on the same template.
    exclusive: Rc<tokio::sync::Mutex<()>>,
}

/// State of one connection, living on the IPC thread.
pub(crate) struct Session {
    thread_map: proxy_capnp::thread_map::Client,
    pub(crate) mining: mining_capnp::mining::Client,
    idle_threads: RefCell<Vec<proxy_capnp::thread::Client>>,
    templates: RefCell<HashMap<u64, HeldTemplate>>,
    next_template_key: Cell<u64>,
    /// `destroy` calls sent and not yet answered.
    destroys_in_flight: Cell<u32>,
    /// Which `submitSolution` ordinal the node serves; `None` until known.
    submit_v32: Cell<Option<bool>>,
    line: Cell<NodeLine>,
    line_tx: watch::Sender<NodeLine>,
    /// Deadline of every call that is not a wait (see [`Session::call`]).
    call_timeout: Duration,
}

/// One template in `sv2_tpd_templates_held`: counted out when dropped.
struct HeldGauge;

impl Drop for HeldGauge {
    fn drop(&mut self) {
        metrics().templates_held.dec();
    }
}

/// A node-side worker thread borrowed from the pool; returned when dropped.
pub(crate) struct Worker {
    session: Rc<Session>,
    thread: Option<proxy_capnp::thread::Client>,
    /// A call on it overran its deadline and may still run in the node: the thread is
    /// not handed out again, or later calls would queue behind it.
    busy: Cell<bool>,
}

impl Worker {
    /// The thread capability to put in `context.thread`.
    pub(crate) fn thread(&self) -> proxy_capnp::thread::Client {
        self.thread
            .clone()
            .expect("worker holds a thread until dropped")
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.busy.get() {
            return;
        }
        if let Some(thread) = self.thread.take() {
            let mut idle = self.session.idle_threads.borrow_mut();
            if idle.len() < IDLE_THREADS_KEPT {
                idle.push(thread);
            }
        }
    }
}

/// Ends a call begun with [`Session::begin_call`] when dropped, also if the wait for the
/// call is dropped.
struct InFlight {
    session: Rc<Session>,
    key: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.session.end_call(self.key);
    }
}

/// One call counted in `sv2_tpd_node_calls_overdue` while alive (also if the wait for it
/// is dropped, as when the IPC thread ends).
struct Overdue(prometheus::IntGauge);

impl Overdue {
    fn new(method: &str) -> Self {
        let gauge = metrics().node_calls_overdue.with_label_values(&[method]);
        gauge.inc();
        Overdue(gauge)
    }
}

impl Drop for Overdue {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Measures one IPC call into `sv2_tpd_ipc_call_duration_seconds` (unless the node does
/// not have the method: nothing ran), keeping the raw result for callers that look at
/// its kind (UNIMPLEMENTED).
pub(crate) async fn timed_raw<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, capnp::Error>>,
) -> Result<T, capnp::Error> {
    let started = Instant::now();
    let result = call.await;
    if !matches!(&result, Err(e) if is_unimplemented(e)) {
        metrics()
            .ipc_call_seconds
            .with_label_values(&[method])
            .observe(started.elapsed().as_secs_f64());
    }
    result
}

/// [`timed_raw`] with the node's error mapped to a [`NodeError`].
pub(crate) async fn timed<T>(
    method: &'static str,
    call: impl Future<Output = Result<T, capnp::Error>>,
) -> Result<T, NodeError> {
    timed_raw(method, call)
        .await
        .map_err(|e| NodeError::from_capnp(method, e))
}

impl Session {
    /// Borrows a node-side thread: an idle one, or a new one. A new one costs no round
    /// trip: `makeThread`'s result is pipelined straight into the call's context.
    pub(crate) fn worker(self: &Rc<Self>) -> Worker {
        let thread = self.idle_threads.borrow_mut().pop().unwrap_or_else(|| {
            let mut request = self.thread_map.make_thread_request();
            request.get().set_name("sv2-tpd");
            request.send().pipeline.get_result()
        });
        Worker {
            session: self.clone(),
            thread: Some(thread),
            busy: Cell::new(false),
        }
    }

    /// Runs `call`, a call that is not a wait, within the node call deadline. On the
    /// deadline the call is abandoned (the node may still run it) with
    /// [`NodeError::Timeout`], and `worker`, whose node thread may still be busy with it,
    /// is not reused. The raw Cap'n Proto result is handed back for callers that look at
    /// its kind (UNIMPLEMENTED).
    pub(crate) async fn call_raw<T>(
        &self,
        worker: Option<&Worker>,
        method: &'static str,
        call: impl Future<Output = Result<T, capnp::Error>>,
    ) -> Result<Result<T, capnp::Error>, NodeError> {
        let started = Instant::now();
        let result = tokio::time::timeout(self.call_timeout, call).await;
        // A method the node does not have ran nothing (e.g. `@10` on v31.99): not a call.
        if !matches!(&result, Ok(Err(e)) if is_unimplemented(e)) {
            metrics()
                .ipc_call_seconds
                .with_label_values(&[method])
                .observe(started.elapsed().as_secs_f64());
        }
        result.map_err(|_| {
            if let Some(worker) = worker {
                worker.busy.set(true);
            }
            NodeError::Timeout {
                method,
                after: self.call_timeout,
            }
        })
    }

    /// Waits for `work` — a node call that must never be abandoned (a submit, or a read
    /// under a template's exclusive lock), with whatever it queues behind (that lock) — to
    /// its end: the node's answer, or the connection's end. When the node call deadline
    /// passes first, that is said (a warning, and `sv2_tpd_node_calls_overdue{method}`
    /// while it lasts) and the wait goes on: the node may still run the call, and sending
    /// it again, or releasing what it works on, could submit a block twice or destroy a
    /// template under a running call.
    pub(crate) async fn patient<T>(
        &self,
        method: &'static str,
        work: impl Future<Output = T>,
    ) -> T {
        let started = Instant::now();
        tokio::pin!(work);
        if let Ok(done) = tokio::time::timeout(self.call_timeout, &mut work).await {
            return done;
        }
        let _overdue = Overdue::new(method);
        tracing::warn!(
            method,
            after = ?self.call_timeout,
            "the node has not answered yet; still waiting for it (the call is not sent again)"
        );
        let done = work.await;
        tracing::info!(method, after = ?started.elapsed(), "the overdue call has ended");
        done
    }

    /// [`Session::call_raw`] with the node's error mapped to a [`NodeError`].
    pub(crate) async fn call<T>(
        &self,
        worker: Option<&Worker>,
        method: &'static str,
        call: impl Future<Output = Result<T, capnp::Error>>,
    ) -> Result<T, NodeError> {
        self.call_raw(worker, method, call)
            .await?
            .map_err(|e| NodeError::from_capnp(method, e))
    }

    /// The interface line as known now.
    pub(crate) fn line(&self) -> NodeLine {
        self.line.get()
    }

    fn set_line(&self, line: NodeLine) {
        self.line.set(line);
        // The engine, which knows the node's name, shows it (`sv2_tpd_node_info`).
        self.line_tx.send_replace(line);
    }

    /// Holds `client` and returns its key.
    pub(crate) fn hold(&self, client: mining_capnp::block_template::Client) -> u64 {
        let key = self.next_template_key.get();
        self.next_template_key.set(key + 1);
        self.templates.borrow_mut().insert(
            key,
            HeldTemplate {
                client,
                in_flight: 0,
                released: false,
                exclusive: Rc::new(tokio::sync::Mutex::new(())),
            },
        );
        metrics().templates_held.inc();
        key
    }

    /// The capability of held template `key`.
    pub(crate) fn template(
        &self,
        key: u64,
    ) -> Result<mining_capnp::block_template::Client, NodeError> {
        self.templates
            .borrow()
            .get(&key)
            .map(|t| t.client.clone())
            .ok_or(NodeError::Call {
                method: "template",
                message: format!("template {key} was already released"),
            })
    }

    /// The lock `getBlock` and `submitSolution` on template `key` take.
    pub(crate) fn exclusive(&self, key: u64) -> Option<Rc<tokio::sync::Mutex<()>>> {
        self.templates
            .borrow()
            .get(&key)
            .map(|t| t.exclusive.clone())
    }

    /// Runs `call` on template `key` holding its exclusive lock, with the template kept
    /// alive in the node until it ends. `call` must not give up on the node before the
    /// node answers (see [`Session::patient`]): the lock and the in-flight count
    /// are what keep a second submit and a `destroy` away from a call still running.
    pub(crate) async fn exclusive_call<T>(
        self: &Rc<Self>,
        key: u64,
        call: impl Future<Output = Result<T, NodeError>>,
    ) -> Result<T, NodeError> {
        let lock = self.exclusive(key).ok_or_else(|| NodeError::Call {
            method: "template",
            message: format!("template {key} was already released"),
        })?;
        self.begin_call(key);
        let _in_flight = InFlight {
            session: self.clone(),
            key,
        };
        let _guard = lock.lock().await;
        call.await
    }

    /// Marks a call on `key` as running; its destroy waits until it ends.
    pub(crate) fn begin_call(&self, key: u64) {
        if let Some(t) = self.templates.borrow_mut().get_mut(&key) {
            t.in_flight += 1;
        }
    }

    /// Ends what [`Session::begin_call`] began; destroys the template if it was released
    /// meanwhile.
    pub(crate) fn end_call(self: &Rc<Self>, key: u64) {
        let destroy_now = match self.templates.borrow_mut().get_mut(&key) {
            Some(t) => {
                t.in_flight -= 1;
                t.in_flight == 0 && t.released
            }
            None => false,
        };
        if destroy_now {
            self.destroy(key);
        }
    }

    /// Releases template `key`: destroyed in the node now, or when its last call in
    /// flight ends (destroying under a running call is a use-after-free in the node).
    pub(crate) fn release(self: &Rc<Self>, key: u64) {
        let destroy_now = match self.templates.borrow_mut().get_mut(&key) {
            Some(t) => {
                t.released = true;
                t.in_flight == 0
            }
            None => false,
        };
        if destroy_now {
            self.destroy(key);
        }
    }

    fn destroy(self: &Rc<Self>, key: u64) {
        let Some(held) = self.templates.borrow_mut().remove(&key) else {
            return;
        };
        let session = self.clone();
        session
            .destroys_in_flight
            .set(session.destroys_in_flight.get() + 1);
        // The node holds the template until it has answered the destroy (or the
        // connection is gone): counted out of `templates_held` only then, also when
        // the thread ends before the answer and drops this task.
        let counted = HeldGauge;
        tokio::task::spawn_local(async move {
            let _counted = counted;
            let worker = session.worker();
            let mut request = held.client.destroy_request();
            request.get().init_context().set_thread(worker.thread());
            if let Err(e) = session
                .call(Some(&worker), "destroy", request.send().promise)
                .await
            {
                tracing::debug!(error = %e, "destroying a template failed");
            }
            session
                .destroys_in_flight
                .set(session.destroys_in_flight.get() - 1);
        });
    }

    /// Templates held, plus those whose `destroy` is still on its way.
    pub(crate) fn held_count(&self) -> usize {
        self.templates.borrow().len() + self.destroys_in_flight.get() as usize
    }

    /// Releases every held template (shutdown); each is destroyed once no call on it
    /// runs.
    pub(crate) async fn release_all(self: &Rc<Self>) {
        let keys: Vec<u64> = self.templates.borrow().keys().copied().collect();
        for key in keys {
            self.release(key);
        }
    }

    /// Reads everything a template's messages need, pipelined on `template` (which may
    /// itself still be a promise): one round trip in all.
    pub(crate) async fn read_template(
        self: &Rc<Self>,
        template: &mining_capnp::block_template::Client,
        worker: &Worker,
    ) -> Result<TemplateData, NodeError> {
        let mut header = template.get_block_header_request();
        header.get().init_context().set_thread(worker.thread());
        let mut coinbase = template.get_coinbase_tx_request();
        coinbase.get().init_context().set_thread(worker.thread());
        let mut path = template.get_coinbase_merkle_path_request();
        path.get().init_context().set_thread(worker.thread());
        let mut fees = template.get_tx_fees_request();
        fees.get().init_context().set_thread(worker.thread());
        let (header, coinbase, path, fees) = futures::join!(
            timed("getBlockHeader", header.send().promise),
            timed("getCoinbaseTx", coinbase.send().promise),
            timed("getCoinbaseMerklePath", path.send().promise),
            timed("getTxFees", fees.send().promise),
        );
        let (header, coinbase, path, fees) = (header?, coinbase?, path?, fees?);

        let header_bytes = header
            .get()
            .and_then(|r| r.get_result())
            .map_err(|e| malformed("block header", e))?;
        let header = deserialize(header_bytes).map_err(|e| malformed("block header", e))?;

        let cb = coinbase
            .get()
            .and_then(|r| r.get_result())
            .map_err(|e| malformed("coinbase template", e))?;
        let mut required_outputs = Vec::new();
        for out in cb
            .get_required_outputs()
            .map_err(|e| malformed("coinbase outputs", e))?
        {
            let bytes = out.map_err(|e| malformed("coinbase outputs", e))?;
            let out: TxOut = deserialize(bytes).map_err(|e| malformed("coinbase outputs", e))?;
            required_outputs.push(out);
        }
        let witness = if cb.has_witness() {
            Some(
                cb.get_witness()
                    .map_err(|e| malformed("coinbase witness", e))?
                    .to_vec(),
            )
        } else {
            None
        };
        let reward = u64::try_from(cb.get_block_reward_remaining())
            .map_err(|e| malformed("coinbase reward", e))?;
        let coinbase = CoinbaseTemplate {
            version: cb.get_version(),
            sequence: cb.get_sequence(),
            script_sig_prefix: cb
                .get_script_sig_prefix()
                .map_err(|e| malformed("coinbase scriptSig prefix", e))?
                .to_vec(),
            witness,
            block_reward_remaining: Amount::from_sat(reward),
            required_outputs,
            lock_time: cb.get_lock_time(),
        };

        let mut merkle_path = Vec::new();
        for node in path
            .get()
            .and_then(|r| r.get_result())
            .map_err(|e| malformed("merkle path", e))?
        {
            let bytes = node.map_err(|e| malformed("merkle path", e))?;
            let hash: [u8; 32] = bytes
                .try_into()
                .map_err(|_| malformed("merkle path", "hash is not 32 bytes"))?;
            merkle_path.push(TxMerkleNode::from_byte_array(hash));
        }

        let mut tx_fees = Vec::new();
        for fee in fees
            .get()
            .and_then(|r| r.get_result())
            .map_err(|e| malformed("fees", e))?
        {
            tx_fees.push(Amount::from_sat(
                u64::try_from(fee).map_err(|e| malformed("fees", e))?,
            ));
        }

        Ok(TemplateData {
            header,
            coinbase,
            merkle_path,
            tx_fees,
        })
    }

    /// Whether to submit with the v32 line's `@10`. Unknown → try `@10` first.
    pub(crate) fn submit_v32(&self) -> Option<bool> {
        self.submit_v32.get()
    }

    /// Remembers which submit ordinal this connection's node serves, learnt from a real
    /// submit (no probe is ever sent). `@10` answering marks the v32 line.
    pub(crate) fn learn_submit_v32(&self, v32: bool) {
        if self.submit_v32.replace(Some(v32)) == Some(v32) {
            return;
        }
        if v32 {
            self.set_line(NodeLine::V32);
        }
        tracing::info!(
            line = self.line().label(),
            "node interface line confirmed by a submit"
        );
    }
}

fn malformed(what: &'static str, detail: impl std::fmt::Display) -> NodeError {
    NodeError::Malformed {
        what,
        detail: detail.to_string(),
    }
}

/// Decodes a `BlockRef`.
#[cfg_attr(not(feature = "mock"), allow(dead_code))] // production use: the tip follower
fn block_ref(r: super::schema::common_capnp::block_ref::Reader<'_>) -> Result<Tip, NodeError> {
    let hash: [u8; 32] = r
        .get_hash()
        .map_err(|e| malformed("block hash", e))?
        .try_into()
        .map_err(|_| malformed("block hash", "not 32 bytes"))?;
    let height = u32::try_from(r.get_height()).map_err(|e| malformed("block height", e))?;
    Ok(Tip {
        hash: BlockHash::from_byte_array(hash),
        height,
    })
}

/// Decodes a `BlockRef` result that the node may leave null (`present` false).
#[cfg_attr(not(feature = "mock"), allow(dead_code))]
pub(crate) fn optional_block_ref(
    method: &'static str,
    present: bool,
    result: capnp::Result<super::schema::common_capnp::block_ref::Reader<'_>>,
) -> Result<Option<Tip>, NodeError> {
    if !present {
        return Ok(None);
    }
    block_ref(result.map_err(|e| NodeError::from_capnp(method, e))?).map(Some)
}

/// What [`connect`] hands back to the `Send` world.
pub(crate) struct Connected {
    pub(crate) jobs: Jobs,
    pub(crate) line: watch::Receiver<NodeLine>,
    pub(crate) closed: watch::Receiver<bool>,
}

/// Opens the endpoint and runs the libmultiprocess bootstrap on a new IPC thread.
/// Every later call that is not a wait must be answered within `call_timeout`.
pub(crate) async fn connect(
    endpoint: &Endpoint,
    call_timeout: Duration,
) -> Result<Connected, NodeError> {
    let endpoint = endpoint.clone();
    let (ready_tx, ready_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("sv2-tpd-ipc".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(NodeError::Connect {
                        path: PathBuf::from(endpoint.to_string()),
                        reason: format!("cannot start the IPC runtime: {e}"),
                    }));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(endpoint, call_timeout, ready_tx));
        })
        .map_err(|e| NodeError::Connect {
            path: PathBuf::new(),
            reason: format!("cannot spawn the IPC thread: {e}"),
        })?;
    ready_rx.await.map_err(|_| NodeError::Disconnected)?
}

/// How long a TCP connection to a node may take to open.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle time before TCP keepalive probes, and between them.
const TCP_KEEPALIVE: Duration = Duration::from_secs(10);

/// The two halves of a connection to the node, whatever carries it.
type Halves = (
    Box<dyn tokio::io::AsyncRead + Unpin>,
    Box<dyn tokio::io::AsyncWrite + Unpin>,
);

/// Opens `endpoint`: a unix socket once it passed [`super::socket_check`], or a TCP
/// connection (a tunnel the operator trusts; nothing can be checked about it here).
async fn open(endpoint: &Endpoint) -> Result<Halves, NodeError> {
    match endpoint {
        Endpoint::Unix(path) => {
            let (reader, writer) = open_unix(path).await?.into_split();
            Ok((Box::new(reader), Box::new(writer)))
        }
        Endpoint::Tcp(addr) => {
            let unreachable = |e: std::io::Error| NodeError::Unreachable {
                endpoint: addr.clone(),
                reason: e.to_string(),
            };
            let connect = tokio::net::TcpStream::connect(addr.as_str());
            let stream = tokio::time::timeout(TCP_CONNECT_TIMEOUT, connect)
                .await
                .map_err(|_| NodeError::Unreachable {
                    endpoint: addr.clone(),
                    reason: format!("no answer within {TCP_CONNECT_TIMEOUT:?}"),
                })?
                .map_err(unreachable)?;
            stream.set_nodelay(true).map_err(unreachable)?;
            // A tunnel whose far end vanished (a partition) ends the connection within
            // about half a minute instead of the kernel's two hours.
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(TCP_KEEPALIVE)
                .with_interval(TCP_KEEPALIVE)
                .with_retries(3);
            socket2::SockRef::from(&stream)
                .set_tcp_keepalive(&keepalive)
                .map_err(unreachable)?;
            let (reader, writer) = stream.into_split();
            Ok((Box::new(reader), Box::new(writer)))
        }
    }
}

/// Connects to the socket at `path` once it passed [`super::socket_check`]: to the very
/// file checked, with every symlink resolved.
async fn open_unix(path: &Path) -> Result<tokio::net::UnixStream, NodeError> {
    let checked =
        super::socket_check::trusted_socket(path)?.ok_or_else(|| NodeError::SocketMissing {
            path: path.to_path_buf(),
        })?;
    tokio::net::UnixStream::connect(&checked)
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                NodeError::SocketMissing {
                    path: path.to_path_buf(),
                }
            }
            std::io::ErrorKind::PermissionDenied => NodeError::PermissionDenied {
                path: path.to_path_buf(),
            },
            _ => NodeError::Connect {
                path: path.to_path_buf(),
                reason: e.to_string(),
            },
        })
}

async fn run(
    endpoint: Endpoint,
    call_timeout: Duration,
    ready: oneshot::Sender<Result<Connected, NodeError>>,
) {
    let (reader, writer) = match open(&endpoint).await {
        Ok(halves) => halves,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let network = twoparty::VatNetwork::new(
        reader.compat(),
        writer.compat_write(),
        rpc_twoparty_capnp::Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let init: init_capnp::init::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    let (closed_tx, closed_rx) = watch::channel(false);
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            tracing::debug!(error = %e, "IPC connection ended");
        }
        let _ = closed_tx.send(true);
    });

    let session = match bootstrap(init, call_timeout).await {
        Ok(s) => Rc::new(s),
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    let connected = Connected {
        jobs: Jobs { tx },
        line: session.line_tx.subscribe(),
        closed: closed_rx,
    };
    if ready.send(Ok(connected)).is_err() {
        return;
    }
    while let Some(job) = rx.recv().await {
        tokio::task::spawn_local(job(session.clone()));
    }
    // Every handle is gone: release what we still hold before the thread ends.
    session.release_all().await;
    let mut pending = Vec::new();
    std::mem::swap(&mut pending, &mut *session.idle_threads.borrow_mut());
    drop(pending);
    // Let the destroy calls go out.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// `Init.construct`, one worker thread, `makeMining`, and the line detection — all
/// without side effects in the node.
async fn bootstrap(
    init: init_capnp::init::Client,
    call_timeout: Duration,
) -> Result<Session, NodeError> {
    let construct = init.construct_request().send();
    let thread_map = construct.pipeline.get_thread_map();
    // `makeMining` below is a wait (it blocks until the chainstate is loaded), but a node
    // that cannot even answer `construct` from its event loop is hung.
    tokio::time::timeout(call_timeout, timed("construct", construct.promise))
        .await
        .map_err(|_| NodeError::Timeout {
            method: "construct",
            after: call_timeout,
        })??;

    let mut request = init.make_mining_request();
    let thread = {
        let mut m = thread_map.make_thread_request();
        m.get().set_name("sv2-tpd");
        m.send().pipeline.get_result()
    };
    request.get().init_context().set_thread(thread.clone());
    let mining = match request.send().promise.await {
        Err(e) if is_unimplemented(&e) => {
            return Err(NodeError::UnsupportedVersion { line: "v30" });
        }
        Err(e) => return Err(NodeError::from_capnp("makeMining", e)),
        Ok(response) => {
            let results = response
                .get()
                .map_err(|e| malformed("makeMining result", e))?;
            if !results.has_result() {
                return Err(NodeError::ShuttingDown);
            }
            results
                .get_result()
                .map_err(|e| malformed("makeMining result", e))?
        }
    };
    let (line_tx, _) = watch::channel(NodeLine::V31_99);
    let session = Session {
        thread_map,
        mining,
        idle_threads: RefCell::new(Vec::new()),
        templates: RefCell::new(HashMap::new()),
        next_template_key: Cell::new(1),
        destroys_in_flight: Cell::new(0),
        submit_v32: Cell::new(None),
        line: Cell::new(NodeLine::V31_99),
        line_tx,
        call_timeout,
    };

    let mut probe = session.mining.get_transactions_by_tx_i_d_request();
    probe.get().init_context().set_thread(thread.clone());
    probe.get().init_txids(0);
    match session
        .call_raw(None, "getTransactionsByTxID", probe.send().promise)
        .await?
    {
        Err(e) if is_unimplemented(&e) => {
            session.line.set(NodeLine::V31_0);
            // v31.0 has no @10: its submits go straight to @7.
            session.submit_v32.set(Some(false));
        }
        Err(e) => return Err(NodeError::from_capnp("getTransactionsByTxID", e)),
        Ok(_) => session.line.set(NodeLine::V31_99),
    }
    // `send` would drop the value: nobody has subscribed yet.
    session.line_tx.send_replace(session.line.get());
    session.idle_threads.borrow_mut().push(thread);
    Ok(session)
}
