//! sv2-tpd end to end against a real regtest bitcoin-node: SV2 clients on SRI's crates
//! receive templates, fetch transactions and mine blocks the node accepts.

mod support;

use std::time::{Duration, Instant};

use bitcoin::{Amount, ScriptBuf};
use stratum_core::common_messages_sv2::Protocol;
use support::stream_check::CheckedClient;
use support::tp::*;
use sv2_tpd::sv2::{TdpClient, TdpMessage};

fn payout() -> ScriptBuf {
    ScriptBuf::new_p2wsh(&bitcoin::WScriptHash::from_raw_hash(
        bitcoin::hashes::Hash::from_byte_array([9u8; 32]),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_mines_a_block_through_sv2_tpd() {
    let node = node_or_skip!("a_pool_mines_a_block_through_sv2_tpd");
    node.fund_op_true().expect("funding leaves IBD");
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&regtest_config(&node.socket_path(), dir.path(), &[])).await;
    let mut c = client(&daemon, 100, 10).await;

    let (_, p) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p), node.best_block_hash().unwrap());

    // A new block over RPC: the new pair arrives within the second.
    let mined_at = Instant::now();
    let mined = node.generate(1).unwrap()[0];
    let (t1, p1) = next_tip(&mut c).await;
    let latency = mined_at.elapsed();
    println!("generatetoaddress -> NewTemplate+SetNewPrevHash: {latency:?}");
    assert_eq!(prev_hash(&p1), mined);
    assert!(latency < Duration::from_secs(1), "new tip took {latency:?}");

    // A funded transaction: a non-future template with the fee in the coinbase value.
    let fee = Amount::from_sat(20_000);
    let txid = node.send_fee_tx(fee).unwrap();
    let t2 = next_template(&mut c).await;
    assert!(!t2.future_template);
    assert!(t2.coinbase_tx_value_remaining > t1.coinbase_tx_value_remaining);
    assert_eq!(
        t2.coinbase_tx_value_remaining,
        t1.coinbase_tx_value_remaining + fee.to_sat()
    );

    c.request_tx_data(t2.template_id).await.unwrap();
    let success = loop {
        match recv(&mut c).await {
            TdpMessage::RequestTransactionDataSuccess(s) => break s,
            TdpMessage::NewTemplate(_) | TdpMessage::SetNewPrevHash(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    let list = success
        .transaction_list
        .iter_bytes()
        .map(<[u8]>::to_vec)
        .collect();
    let txs = decode_transactions(list);
    assert_eq!(
        txs.iter().map(|t| t.compute_txid()).collect::<Vec<_>>(),
        vec![txid]
    );

    // The pool builds the coinbase from NewTemplate, grinds, submits.
    let height = node.block_count().unwrap();
    let coinbase = build_coinbase(&t2, &payout(), true);
    let (solution, hash) = solve(&t2, &p1, &coinbase);
    c.submit_solution(solution).await.unwrap();
    let (_, p3) = next_tip(&mut c).await;
    assert_eq!(prev_hash(&p3), hash);
    assert_eq!(node.block_count().unwrap(), height + 1);
    assert_eq!(node.best_block_hash().unwrap(), hash);
    let block = node.get_block(&hash).unwrap();
    assert_eq!(
        block.txdata[0].output[0].script_pubkey,
        payout(),
        "the client's coinbase"
    );
    assert_eq!(block.txdata[1].compute_txid(), txid);
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_clients_get_the_spec_answer_and_others_keep_receiving() {
    let node = node_or_skip!("misbehaving_clients_get_the_spec_answer_and_others_keep_receiving");
    node.generate(1).expect("a recent block ends IBD");
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon(&regtest_config(&node.socket_path(), dir.path(), &[])).await;
    let mut good = client(&daemon, 100, 10).await;
    next_tip(&mut good).await;

    // Wrong protocol: SetupConnection.Error, then closed.
    let mut wrong = CheckedClient::new(
        TdpClient::connect(daemon.sv2_addr, daemon.authority_pubkey)
            .await
            .unwrap(),
    );
    wrong
        .send_setup_connection(Protocol::MiningProtocol, 2, 2)
        .await
        .unwrap();
    match recv(&mut wrong).await {
        TdpMessage::SetupConnectionError { error_code, .. } => {
            assert_eq!(error_code, "unsupported-protocol")
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(wrong.recv().await.is_err(), "closed after the error");

    // Garbage before the handshake.
    let mut raw = tokio::net::TcpStream::connect(daemon.sv2_addr)
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut raw, &[0xffu8; 256])
        .await
        .unwrap();

    // Garbage after the handshake, and a frame over the size limit.
    let mut garbage = CheckedClient::new(
        TdpClient::connect(daemon.sv2_addr, daemon.authority_pubkey)
            .await
            .unwrap(),
    );
    garbage.setup_connection().await.unwrap();
    garbage.send_raw_bytes(&[0x42u8; 64]).await.unwrap();
    let mut huge = CheckedClient::new(
        TdpClient::connect(daemon.sv2_addr, daemon.authority_pubkey)
            .await
            .unwrap(),
    );
    huge.setup_connection().await.unwrap();
    let _ = huge.send_raw_frame(0, 0x70, &vec![0u8; 1 << 20]).await;

    // An unknown template id.
    good.request_tx_data(123_456_789).await.unwrap();
    match recv(&mut good).await {
        TdpMessage::RequestTransactionDataError { error_code, .. } => {
            assert_eq!(error_code, "template-id-not-found")
        }
        other => panic!("unexpected {other:?}"),
    }

    // The well-behaved client still gets the next tip.
    let mined = node.generate(1).unwrap()[0];
    let (_, p) = next_tip(&mut good).await;
    assert_eq!(prev_hash(&p), mined);
    for bad in [&mut garbage, &mut huge] {
        let closed = tokio::time::timeout(PATIENCE, async {
            loop {
                if bad.recv().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a misbehaving client is dropped");
    }
    daemon.stop().await;
}

/// What SRI's jd_client_sv2 0.6 does when its pool goes away: it keeps its Template
/// Distribution connection, sends the same `CoinbaseOutputConstraints` again and mines
/// nothing until a `NewTemplate(future)` + `SetNewPrevHash` pair comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jdc_falling_back_to_solo_gets_a_pair_for_its_repeated_constraints_and_mines_it() {
    let node = node_or_skip!(
        "a_jdc_falling_back_to_solo_gets_a_pair_for_its_repeated_constraints_and_mines_it"
    );
    node.generate(1).expect("a recent block ends IBD");
    let dir = tempfile::tempdir().unwrap();
    let daemon = start_daemon_without_fee_checks(&node.socket_path(), dir.path()).await;
    // The JDC's constraints: one P2WPKH output, no sigops.
    let mut jdc = client(&daemon, 31, 0).await;
    let (first, _) = next_tip(&mut jdc).await;

    jdc.send_constraints(31, 0).await.unwrap();
    let (t, p) = next_tip(&mut jdc).await;
    assert_eq!(
        t.template_id, first.template_id,
        "the current template again"
    );
    assert_eq!(prev_hash(&p), node.best_block_hash().unwrap());

    // The pair is one to mine on: its block is accepted.
    let height = node.block_count().unwrap();
    let (solution, hash) = solve(&t, &p, &build_coinbase(&t, &payout(), true));
    jdc.submit_solution(solution).await.unwrap();
    let (_, next) = next_tip(&mut jdc).await;
    assert_eq!(prev_hash(&next), hash);
    assert_eq!(node.block_count().unwrap(), height + 1);
    daemon.stop().await;
}
