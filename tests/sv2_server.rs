//! The SV2 server against a scripted engine: the test answers `EngineRequest`s by hand and
//! talks to the server with `TdpClient`.

use bitcoin::hashes::Hash;
use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use stratum_core::{
    binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned},
    common_messages_sv2::Protocol,
    template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned},
};
use sv2_tpd::{
    keys::ServerKeys,
    metrics::metrics,
    sv2::{serve, ClientError, ServerConfig, TdpClient, TdpMessage},
    template::{
        Constraints, EngineHandle, EngineRequest, SolutionOutcome, TemplateEvent, TransactionData,
        TxDataError,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

/// Only to avoid hanging on a bug; nothing is timed.
const PATIENCE: Duration = Duration::from_secs(20);

async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct Server {
    addr: SocketAddr,
    keys: ServerKeys,
    requests: mpsc::Receiver<EngineRequest>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut cfg = ServerConfig::new(addr);
    tweak(&mut cfg);
    let keys = ServerKeys::ephemeral();
    let (tx, requests) = mpsc::channel(16);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            serve(
                listener,
                cfg,
                keys,
                EngineHandle::from_channel(tx),
                shutdown,
            )
            .await
            .unwrap()
        }
    });
    Server {
        addr,
        keys,
        requests,
        shutdown,
        task,
    }
}

impl Server {
    async fn client(&self) -> TdpClient {
        let mut client = TdpClient::connect(self.addr, self.keys.authority_pubkey())
            .await
            .unwrap();
        let success = within("SetupConnection.Success", client.setup_connection())
            .await
            .unwrap();
        assert_eq!(success.used_version, 2);
        assert_eq!(success.flags, 0);
        client
    }

    async fn request(&mut self) -> EngineRequest {
        within("an engine request", self.requests.recv())
            .await
            .expect("server dropped the engine handle")
    }

    async fn subscription(&mut self) -> (Constraints, mpsc::Sender<TemplateEvent>) {
        match self.request().await {
            EngineRequest::Subscribe {
                constraints,
                events,
            } => (constraints, events),
            other => panic!("expected Subscribe, got {other:?}"),
        }
    }

    /// The next request, which must be a `Resend` for the subscription fed by `events`;
    /// returns where its answer goes.
    async fn resend(&mut self, events: &mpsc::Sender<TemplateEvent>) -> oneshot::Sender<bool> {
        match self.request().await {
            EngineRequest::Resend {
                subscription,
                reply,
            } => {
                assert_names(&subscription, events);
                reply
            }
            other => panic!("expected Resend, got {other:?}"),
        }
    }

    /// A client that is set up and subscribed, with the sender for its events.
    async fn subscribed_client(&mut self) -> (TdpClient, mpsc::Sender<TemplateEvent>) {
        let mut client = self.client().await;
        client.send_constraints(1000, 10).await.unwrap();
        let (_, events) = self.subscription().await;
        (client, events)
    }
}

fn new_template(template_id: u64, future_template: bool) -> NewTemplateOwned {
    NewTemplateOwned {
        template_id,
        future_template,
        version: 0x2000_0000,
        coinbase_tx_version: 2,
        coinbase_prefix: B0255Owned::new(vec![3, 0x51, 0x02, 0x01]).unwrap(),
        coinbase_tx_input_sequence: 0xffff_fffe,
        coinbase_tx_value_remaining: 5_000_000_000,
        coinbase_tx_outputs_count: 1,
        coinbase_tx_outputs: B064KOwned::new(vec![0u8; 47]).unwrap(),
        coinbase_tx_locktime: 100,
        merkle_path: Seq0255Owned::new(vec![
            U256Owned::new(vec![7u8; 32]).unwrap(),
            U256Owned::new(vec![8u8; 32]).unwrap(),
        ])
        .unwrap(),
    }
}

fn prev_hash(template_id: u64) -> SetNewPrevHashOwned {
    SetNewPrevHashOwned {
        template_id,
        prev_hash: U256Owned::new(vec![0xab; 32]).unwrap(),
        header_timestamp: 1_700_000_000,
        n_bits: 0x207f_ffff,
        target: U256Owned::new(vec![0xff; 32]).unwrap(),
    }
}

async fn send_template(events: &mpsc::Sender<TemplateEvent>, id: u64) {
    events
        .send(TemplateEvent::NewTemplate(Arc::new(new_template(
            id, false,
        ))))
        .await
        .unwrap();
}

/// `subscription` (from a `Resend`) names the open subscription fed by `events`.
fn assert_names(
    subscription: &mpsc::WeakSender<TemplateEvent>,
    events: &mpsc::Sender<TemplateEvent>,
) {
    let asked = subscription.upgrade().expect("the subscription is open");
    assert!(
        asked.same_channel(events),
        "Resend for another subscription"
    );
}

/// Queues template `id` as a future template with its `SetNewPrevHash`.
async fn send_pair(events: &mpsc::Sender<TemplateEvent>, id: u64) {
    events
        .send(TemplateEvent::NewTemplate(Arc::new(new_template(id, true))))
        .await
        .unwrap();
    events
        .send(TemplateEvent::SetNewPrevHash(Arc::new(prev_hash(id))))
        .await
        .unwrap();
}

/// The client receives template `id` as a future template and its `SetNewPrevHash`.
async fn expect_pair(client: &mut TdpClient, id: u64) {
    match within("NewTemplate", client.recv()).await.unwrap() {
        TdpMessage::NewTemplate(t) => assert_eq!(t, new_template(id, true)),
        other => panic!("expected NewTemplate, got {other:?}"),
    }
    match within("SetNewPrevHash", client.recv()).await.unwrap() {
        TdpMessage::SetNewPrevHash(p) => assert_eq!(p, prev_hash(id)),
        other => panic!("expected SetNewPrevHash, got {other:?}"),
    }
}

async fn expect_template(client: &mut TdpClient, id: u64) {
    match within("NewTemplate", client.recv()).await.unwrap() {
        TdpMessage::NewTemplate(t) => assert_eq!(t, new_template(id, false)),
        other => panic!("expected NewTemplate {id}, got {other:?}"),
    }
}

/// The server has closed this client's connection.
async fn expect_closed(client: &mut TdpClient) {
    match within("the server to close the connection", client.recv()).await {
        Err(ClientError::Transport(_)) => {}
        other => panic!("expected the connection to be closed, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_and_setup_connection_succeed() {
    let server = start(|_| {}).await;
    let _client = server.client().await;
    assert!(metrics().clients_connected.get() >= 1);
}

#[tokio::test]
async fn the_client_rejects_a_certificate_from_another_authority() {
    let server = start(|_| {}).await;
    let stranger = ServerKeys::ephemeral();
    let err = TdpClient::connect(server.addr, stranger.authority_pubkey())
        .await
        .err()
        .expect("handshake must fail against the wrong authority key");
    assert!(
        err.to_string().contains("certificate"),
        "unexpected error: {err}"
    );
}

/// Sends `SetupConnection` for `protocol` with versions `min..=max`; expects
/// `SetupConnection.Error` with `code`, then a closed connection.
async fn setup_is_refused(protocol: Protocol, min: u16, max: u16, code: &str) {
    let server = start(|_| {}).await;
    let mut client = TdpClient::connect(server.addr, server.keys.authority_pubkey())
        .await
        .unwrap();
    client
        .send_setup_connection(protocol, min, max)
        .await
        .unwrap();
    match within("SetupConnection.Error", client.recv())
        .await
        .unwrap()
    {
        TdpMessage::SetupConnectionError { error_code, .. } => assert_eq!(error_code, code),
        other => panic!("expected SetupConnection.Error, got {other:?}"),
    }
    expect_closed(&mut client).await;
}

#[tokio::test]
async fn another_protocol_gets_setup_connection_error_and_is_closed() {
    setup_is_refused(Protocol::MiningProtocol, 2, 2, "unsupported-protocol").await;
}

#[tokio::test]
async fn a_version_range_without_2_gets_protocol_version_mismatch() {
    setup_is_refused(
        Protocol::TemplateDistributionProtocol,
        3,
        4,
        "protocol-version-mismatch",
    )
    .await;
}

#[tokio::test]
async fn a_message_before_setup_connection_closes_the_connection() {
    let server = start(|_| {}).await;
    let mut client = TdpClient::connect(server.addr, server.keys.authority_pubkey())
        .await
        .unwrap();
    client.send_constraints(1000, 10).await.unwrap();
    expect_closed(&mut client).await;
}

#[tokio::test]
async fn constraints_subscribe_and_events_are_forwarded_in_order() {
    let mut server = start(|_| {}).await;
    let mut client = server.client().await;
    client.send_constraints(4321, 17).await.unwrap();
    let (constraints, events) = server.subscription().await;
    assert_eq!(
        constraints,
        Constraints {
            max_additional_size: 4321,
            max_additional_sigops: 17,
        }
    );

    send_pair(&events, 1).await;
    send_template(&events, 2).await;
    expect_pair(&mut client, 1).await;
    expect_template(&mut client, 2).await;
}

#[tokio::test]
async fn new_constraints_replace_the_subscription() {
    let mut server = start(|_| {}).await;
    let (mut client, old_events) = server.subscribed_client().await;
    client.send_constraints(50, 1).await.unwrap();
    // Within constraints_interval of the first: the current group's pair at once (there
    // is none here), the new subscription when the interval is up.
    server.resend(&old_events).await.send(false).unwrap();
    let (constraints, new_events) = server.subscription().await;
    assert_eq!(constraints.max_additional_size, 50);
    assert_eq!(constraints.max_additional_sigops, 1);
    // The session dropped the receiver of the first subscription.
    within("the old subscription to end", old_events.closed()).await;
    send_template(&new_events, 9).await;
    expect_template(&mut client, 9).await;
}

#[tokio::test]
async fn request_transaction_data_success_and_errors() {
    let mut server = start(|_| {}).await;
    let mut client = server.client().await;
    let txs = vec![vec![1u8, 2, 3], vec![0xaa; 300]];

    client.request_tx_data(5).await.unwrap();
    match server.request().await {
        EngineRequest::TransactionData { template_id, reply } => {
            assert_eq!(template_id, 5);
            reply
                .send(Ok(TransactionData {
                    transactions: Arc::new(txs.clone()),
                    excess_data: vec![0u8; 32],
                }))
                .unwrap();
        }
        other => panic!("expected TransactionData, got {other:?}"),
    }
    match within("RequestTransactionData.Success", client.recv())
        .await
        .unwrap()
    {
        TdpMessage::RequestTransactionDataSuccess(s) => {
            assert_eq!(s.template_id, 5);
            assert_eq!(s.excess_data.as_bytes(), &[0u8; 32][..]);
            let got: Vec<Vec<u8>> = s
                .transaction_list
                .iter()
                .map(|tx| tx.as_bytes().to_vec())
                .collect();
            assert_eq!(got, txs);
        }
        other => panic!("expected RequestTransactionData.Success, got {other:?}"),
    }

    for (id, error) in [
        (6, TxDataError::TemplateIdNotFound),
        (7, TxDataError::StaleTemplateId),
    ] {
        client.request_tx_data(id).await.unwrap();
        match server.request().await {
            EngineRequest::TransactionData { template_id, reply } => {
                assert_eq!(template_id, id);
                reply.send(Err(error)).unwrap();
            }
            other => panic!("expected TransactionData, got {other:?}"),
        }
        match within("RequestTransactionData.Error", client.recv())
            .await
            .unwrap()
        {
            TdpMessage::RequestTransactionDataError {
                template_id,
                error_code,
            } => {
                assert_eq!(template_id, id);
                assert_eq!(error_code, error.code());
            }
            other => panic!("expected RequestTransactionData.Error, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_solution_reaches_the_engine_and_the_session_stays() {
    let mut server = start(|_| {}).await;
    let (mut client, events) = server.subscribed_client().await;
    let solution = SubmitSolutionOwned {
        template_id: 3,
        version: 0x2000_0000,
        header_timestamp: 1_700_000_123,
        header_nonce: 42,
        coinbase_tx: B064KOwned::new(vec![0x01; 120]).unwrap(),
    };
    client.submit_solution(solution.clone()).await.unwrap();
    match server.request().await {
        EngineRequest::SubmitSolution {
            solution: got,
            reply,
        } => {
            assert_eq!(got, solution);
            reply
                .send(SolutionOutcome::Rejected {
                    block_hash: bitcoin::BlockHash::all_zeros(),
                    reason: "bad-txnmrklroot".into(),
                })
                .unwrap();
        }
        other => panic!("expected SubmitSolution, got {other:?}"),
    }
    // Still served after the rejection.
    send_template(&events, 4).await;
    expect_template(&mut client, 4).await;
}

#[tokio::test]
async fn unknown_messages_after_setup_are_ignored() {
    let mut server = start(|_| {}).await;
    let (mut client, events) = server.subscribed_client().await;
    let unexpected_before = metrics().messages_unexpected.get();
    // An unknown message type, and an extension message that was never negotiated.
    client.send_raw_frame(0, 0x7f, &[1, 2, 3]).await.unwrap();
    client.send_raw_frame(0x4001, 0x01, &[]).await.unwrap();
    // Frames are handled in order: once this request reaches the engine, both were seen.
    client.request_tx_data(1).await.unwrap();
    match server.request().await {
        EngineRequest::TransactionData { reply, .. } => {
            reply.send(Err(TxDataError::TemplateIdNotFound)).unwrap()
        }
        other => panic!("expected TransactionData, got {other:?}"),
    }
    assert!(matches!(
        within("RequestTransactionData.Error", client.recv()).await,
        Ok(TdpMessage::RequestTransactionDataError { .. })
    ));
    assert!(metrics().messages_unexpected.get() >= unexpected_before + 2);
    send_template(&events, 1).await;
    expect_template(&mut client, 1).await;
}

/// A misbehaving client is dropped; a well-behaved one on the same server keeps receiving.
async fn misbehaviour_drops_only_that_client<F, Fut>(misbehave: F)
where
    F: FnOnce(SocketAddr, ServerKeys) -> Fut,
    Fut: Future<Output = ()>,
{
    let mut server = start(|cfg| cfg.handshake_timeout = Duration::from_millis(500)).await;
    let (mut good, events) = server.subscribed_client().await;
    misbehave(server.addr, server.keys).await;
    send_template(&events, 11).await;
    expect_template(&mut good, 11).await;
}

#[tokio::test]
async fn garbage_before_the_handshake_drops_that_client_only() {
    let failures_before = metrics().handshake_failures.get();
    misbehaviour_drops_only_that_client(|addr, _| async move {
        let mut raw = TcpStream::connect(addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        // The server gives up on the handshake and closes without a word.
        let read = within("the server to close the socket", raw.read(&mut buf)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "server answered: {read:?}");
    })
    .await;
    assert!(metrics().handshake_failures.get() > failures_before);
}

#[tokio::test]
async fn garbage_after_the_handshake_drops_that_client_only() {
    misbehaviour_drops_only_that_client(|addr, keys| async move {
        let mut bad = TdpClient::connect(addr, keys.authority_pubkey())
            .await
            .unwrap();
        bad.setup_connection().await.unwrap();
        bad.send_raw_bytes(&[0x5a; 64]).await.unwrap();
        expect_closed(&mut bad).await;
    })
    .await;
}

#[tokio::test]
async fn an_oversize_frame_drops_that_client_only() {
    misbehaviour_drops_only_that_client(|addr, keys| async move {
        let mut bad = TdpClient::connect(addr, keys.authority_pubkey())
            .await
            .unwrap();
        bad.setup_connection().await.unwrap();
        // The server may close before the whole frame is written.
        let _ = bad.send_raw_frame(0, 0x76, &vec![0u8; 300_000]).await;
        expect_closed(&mut bad).await;
    })
    .await;
}

#[tokio::test]
async fn an_undecodable_known_message_drops_that_client_only() {
    misbehaviour_drops_only_that_client(|addr, keys| async move {
        let mut bad = TdpClient::connect(addr, keys.authority_pubkey())
            .await
            .unwrap();
        bad.setup_connection().await.unwrap();
        // CoinbaseOutputConstraints needs 6 bytes.
        bad.send_raw_frame(0, 0x70, &[1]).await.unwrap();
        expect_closed(&mut bad).await;
    })
    .await;
}

#[tokio::test]
async fn connections_over_max_clients_are_refused() {
    let mut server = start(|cfg| cfg.max_clients = 1).await;
    let refused_before = refused("max_clients");
    let (_first, _events) = server.subscribed_client().await;
    let second = TdpClient::connect(server.addr, server.keys.authority_pubkey()).await;
    assert!(second.is_err(), "second client was served");
    assert!(refused("max_clients") > refused_before);
}

fn refused(reason: &str) -> u64 {
    metrics()
        .connections_refused
        .with_label_values(&[reason])
        .get()
}

#[tokio::test]
async fn clients_in_their_setup_do_not_take_pool_places() {
    let mut server = start(|cfg| cfg.max_clients = 1).await;
    // Set up but not subscribed: still pending, so the pool below gets the one place.
    let mut waiting = server.client().await;
    let (mut pool, events) = server.subscribed_client().await;
    send_template(&events, 21).await;
    expect_template(&mut pool, 21).await;
    // The waiting client's setup now finds no place left and is closed.
    waiting.send_constraints(10, 1).await.unwrap();
    expect_closed(&mut waiting).await;
}

#[tokio::test]
async fn silent_sockets_take_no_setup_place_and_a_flood_of_them_evicts_the_oldest() {
    let mut server = start(|cfg| cfg.max_pending_handshakes = 1).await;
    let evicted_before = refused("evicted");
    // One place, so 16 may wait; 30 silent sockets make a flood.
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
    }
    // However many silent sockets came first, a pool still gets through.
    let (mut pool, events) = server.subscribed_client().await;
    send_template(&events, 5).await;
    expect_template(&mut pool, 5).await;
    assert!(refused("evicted") >= evicted_before + 14);
    // The evicted sockets were closed by the server, the oldest first.
    let mut buf = [0u8; 1];
    let read = within("an evicted socket to close", silent[0].read(&mut buf)).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test]
async fn a_setup_in_progress_keeps_its_place_and_the_next_one_waits_its_turn() {
    let mut server = start(|cfg| cfg.max_pending_handshakes = 1).await;
    let evicted_before = refused("evicted");
    // Noise done and SetupConnection answered: this one holds the only place.
    let mut first = server.client().await;
    let addr = server.addr;
    let authority = server.keys.authority_pubkey();
    let second = tokio::spawn(async move {
        let mut c = TdpClient::connect(addr, authority).await.unwrap();
        c.setup_connection().await.unwrap();
        c
    });
    // However long the first takes (here: some time), it is not evicted for the second,
    // which waits for the place; it cannot finish before the first is set up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "the second got a place while the first held it"
    );
    first.send_constraints(1000, 10).await.unwrap();
    let (_, events) = server.subscription().await;
    let mut second = within("the second setup", second).await.unwrap();
    second.send_constraints(1000, 10).await.unwrap();
    let (_, second_events) = server.subscription().await;
    send_template(&events, 7).await;
    expect_template(&mut first, 7).await;
    send_template(&second_events, 8).await;
    expect_template(&mut second, 8).await;
    assert_eq!(refused("evicted"), evicted_before);
}

#[tokio::test]
async fn the_whole_setup_must_finish_within_handshake_timeout() {
    let server = start(|cfg| cfg.handshake_timeout = Duration::from_millis(400)).await;
    let timeouts_before = refused("handshake_timeout");
    // Noise and SetupConnection in time, but no CoinbaseOutputConstraints.
    let mut idle = server.client().await;
    expect_closed(&mut idle).await;
    assert!(refused("handshake_timeout") > timeouts_before);
}

#[tokio::test]
async fn too_many_bad_messages_disconnect_a_client() {
    let mut server = start(|cfg| cfg.max_bad_messages = 3).await;
    let (mut bad, _events) = server.subscribed_client().await;
    let (mut good, good_events) = server.subscribed_client().await;
    let disconnected_before = metrics()
        .clients_disconnected
        .with_label_values(&["bad_messages"])
        .get();
    for _ in 0..3 {
        bad.send_raw_frame(0, 0x7f, &[]).await.unwrap();
    }
    bad.request_tx_data(1).await.unwrap();
    match server.request().await {
        EngineRequest::TransactionData { reply, .. } => {
            reply.send(Err(TxDataError::TemplateIdNotFound)).unwrap()
        }
        other => panic!("expected TransactionData, got {other:?}"),
    }
    assert!(matches!(
        within("RequestTransactionData.Error", bad.recv()).await,
        Ok(TdpMessage::RequestTransactionDataError { .. })
    ));
    // Three are tolerated; the fourth closes the connection.
    bad.send_raw_frame(0, 0x7f, &[]).await.unwrap();
    expect_closed(&mut bad).await;
    assert!(
        metrics()
            .clients_disconnected
            .with_label_values(&["bad_messages"])
            .get()
            > disconnected_before
    );
    send_template(&good_events, 3).await;
    expect_template(&mut good, 3).await;
}

#[tokio::test]
async fn solutions_beyond_the_in_flight_cap_still_reach_the_engine_unawaited() {
    let mut server = start(|cfg| cfg.max_solutions_in_flight_per_client = 2).await;
    let (mut client, _events) = server.subscribed_client().await;
    let unawaited_before = metrics().solutions_unawaited.get();
    let solution = |nonce| SubmitSolutionOwned {
        template_id: 3,
        version: 0x2000_0000,
        header_timestamp: 1_700_000_123,
        header_nonce: nonce,
        coinbase_tx: B064KOwned::new(vec![0x01; 60]).unwrap(),
    };
    for nonce in 0..5 {
        client.submit_solution(solution(nonce)).await.unwrap();
    }
    // All five reach the engine (a real block is never dropped by a per-client limit);
    // two have their verdict awaited, the other three are handed on unawaited.
    let mut held = Vec::new();
    let mut unawaited = 0;
    for _ in 0..5 {
        match server.request().await {
            EngineRequest::SubmitSolution { reply, .. } if reply.is_closed() => unawaited += 1,
            EngineRequest::SubmitSolution { reply, .. } => held.push(reply),
            other => panic!("expected SubmitSolution, got {other:?}"),
        }
    }
    assert_eq!((held.len(), unawaited), (2, 3));
    assert_eq!(metrics().solutions_unawaited.get(), unawaited_before + 3);
    // Answering frees the places: a later solution has its verdict awaited again.
    for reply in held {
        reply.send(SolutionOutcome::UnknownTemplate).unwrap();
    }
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        client.submit_solution(solution(99)).await.unwrap();
        match server.request().await {
            EngineRequest::SubmitSolution {
                reply,
                solution: got,
            } if !reply.is_closed() => {
                assert_eq!(got.header_nonce, 99);
                break;
            }
            // Still unawaited: the places are given back once the verdicts are read.
            EngineRequest::SubmitSolution { .. } => {
                assert!(tokio::time::Instant::now() < deadline, "places never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn constraint_changes_are_coalesced_and_rate_limited() {
    let mut server = start(|cfg| cfg.constraints_interval = Duration::from_millis(300)).await;
    let (mut client, mut events) = server.subscribed_client().await;
    // Within one interval of the first subscription: only the last value is applied, and
    // each message meanwhile is answered with the current group's pair.
    for size in 1..=20 {
        client.send_constraints(size, 1).await.unwrap();
    }
    let (mut resends, mut subscriptions) = (0, Vec::new());
    while subscriptions.last() != Some(&20) {
        match server.request().await {
            EngineRequest::Resend {
                subscription,
                reply,
            } => {
                assert_names(&subscription, &events);
                reply.send(false).unwrap();
                resends += 1;
            }
            EngineRequest::Subscribe {
                constraints,
                events: new_events,
            } => {
                subscriptions.push(constraints.max_additional_size);
                events = new_events;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The first change may land after the interval; the rest then coalesce behind it.
    assert!(
        subscriptions == [20] || subscriptions == [1, 20],
        "{subscriptions:?}"
    );
    assert_eq!(resends, 21 - subscriptions.len(), "one answer per message");
    // Nothing else was subscribed: the next request the engine sees is this one.
    client.request_tx_data(4).await.unwrap();
    match server.request().await {
        EngineRequest::TransactionData { template_id, reply } => {
            assert_eq!(template_id, 4);
            reply.send(Err(TxDataError::TemplateIdNotFound)).unwrap();
        }
        other => panic!("expected TransactionData, got {other:?}"),
    }
    assert!(matches!(
        within("RequestTransactionData.Error", client.recv()).await,
        Ok(TdpMessage::RequestTransactionDataError { template_id: 4, .. })
    ));
    send_template(&events, 6).await;
    expect_template(&mut client, 6).await;
}

#[tokio::test]
async fn shutdown_closes_sessions_and_serve_returns() {
    let server = start(|_| {}).await;
    let mut client = server.client().await;
    server.shutdown.cancel();
    expect_closed(&mut client).await;
    within("serve to return", server.task).await.unwrap();
}

#[tokio::test]
async fn every_later_constraints_message_is_answered_with_its_groups_pair() {
    let mut server = start(|cfg| cfg.constraints_interval = Duration::from_millis(300)).await;
    let (mut client, events) = server.subscribed_client().await;
    for _ in 0..3 {
        // The same constraints again: the session asks the engine for its group's
        // current pair and the pair the engine queues reaches the client.
        client.send_constraints(1000, 10).await.unwrap();
        let reply = server.resend(&events).await;
        send_pair(&events, 8).await;
        reply.send(true).unwrap();
        expect_pair(&mut client, 8).await;
    }
}
