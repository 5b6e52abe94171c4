//! An in-process sv2-tpd for tests, and a tiny SV2 "pool" side: build the coinbase from
//! `NewTemplate`, grind the regtest nonce, make a `SubmitSolution`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bitcoin::absolute::LockTime;
use bitcoin::consensus::{deserialize, serialize};
use bitcoin::hashes::Hash;
use bitcoin::transaction::Version;
use bitcoin::{
    Amount, BlockHash, OutPoint, ScriptBuf, Sequence, Target, Transaction, TxIn, TxMerkleNode,
    TxOut, Witness,
};
use stratum_core::binary_sv2::B064KOwned;
use stratum_core::template_distribution_sv2::{
    NewTemplateOwned, SetNewPrevHashOwned, SubmitSolutionOwned,
};
use sv2_tpd::config::{Config, ConfigArgs};
use sv2_tpd::daemon::Daemon;
use sv2_tpd::sv2::{TdpClient, TdpMessage};

use super::stream_check::CheckedClient;

/// Limit for any single wait in tests, to fail instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Config for a regtest daemon on `socket`, listening on free loopback ports.
pub fn regtest_config(socket: &Path, datadir: &Path, extra: &[(&str, &str)]) -> Config {
    let mut args = ConfigArgs {
        chain: Some("regtest".into()),
        datadir: Some(datadir.display().to_string()),
        ipc_socket: Some(socket.display().to_string()),
        sv2_port: Some("0".into()),
        metrics_bind: Some("127.0.0.1:0".into()),
        fee_delta: Some("1000".into()),
        template_interval: Some("1".into()),
        ..Default::default()
    };
    for (key, value) in extra {
        let v = Some(value.to_string());
        match *key {
            "fee_delta" => args.fee_delta = v,
            "template_interval" => args.template_interval = v,
            "stale_template_grace" => args.stale_template_grace = v,
            "max_clients" => args.max_clients = v,
            "tip_first" => args.tip_first = v,
            "node_call_timeout" => args.node_call_timeout = v,
            "max_templates_held" => args.max_templates_held = v,
            "max_template_bytes_held" => args.max_template_bytes_held = v,
            "constraints_interval" => args.constraints_interval = v,
            // NAME=ENDPOINT entries separated by `;` (settings are comma-separated).
            "nodes" => args.node = value.split(';').map(str::to_string).collect(),
            other => panic!("regtest_config: add {other}"),
        }
    }
    let no_env: [(std::ffi::OsString, std::ffi::OsString); 0] = [];
    Config::load_from(&args, no_env, Some(datadir))
        .expect("valid test config")
        .0
}

/// Starts a regtest daemon on `socket` (data in `datadir`) whose groups look at fees
/// only every 10 minutes: every template it sends is a tip's or a group's first.
pub async fn start_daemon_without_fee_checks(socket: &Path, datadir: &Path) -> Daemon {
    start_daemon(&regtest_config(
        socket,
        datadir,
        &[("template_interval", "600")],
    ))
    .await
}

/// Starts a daemon for `config`.
pub async fn start_daemon(config: &Config) -> Daemon {
    Daemon::start(config).await.expect("daemon starts")
}

/// A set-up TDP client that sent `CoinbaseOutputConstraints`; every message it receives
/// is checked (see [`CheckedClient`]).
pub async fn client(daemon: &Daemon, size: u32, sigops: u16) -> CheckedClient {
    client_at(daemon.sv2_addr, daemon.authority_pubkey, size, sigops).await
}

/// Same as [`client`], for any address and key.
pub async fn client_at(
    addr: SocketAddr,
    authority: key_utils::Secp256k1PublicKey,
    size: u32,
    sigops: u16,
) -> CheckedClient {
    let mut c = TdpClient::connect(addr, authority).await.expect("connect");
    c.setup_connection().await.expect("setup");
    c.send_constraints(size, sigops).await.expect("constraints");
    CheckedClient::new(c)
}

/// Waits until `condition` holds, failing the test after [`PATIENCE`] with `what`.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !condition() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The file in `dir` whose name ends with `suffix`, waiting for it (failing the test
/// after [`PATIENCE`]).
pub async fn saved_file(dir: &Path, suffix: &str) -> std::path::PathBuf {
    let found = || {
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(suffix))
    };
    eventually(&format!("a file *{suffix} in {}", dir.display()), || {
        found().is_some()
    })
    .await;
    found().expect("found just now")
}

/// Reads (and drops) what `c` is sent until the server closes it; false if it is still
/// open after [`PATIENCE`].
pub async fn closed_by_server(c: &mut CheckedClient) -> bool {
    tokio::time::timeout(PATIENCE, async { while c.recv().await.is_ok() {} })
        .await
        .is_ok()
}

/// The next message, failing the test after [`PATIENCE`].
pub async fn recv(c: &mut CheckedClient) -> TdpMessage {
    tokio::time::timeout(PATIENCE, c.recv())
        .await
        .expect("message in time")
        .expect("message")
}

/// Waits for a `NewTemplate` (skipping anything else, checked) and returns it.
pub async fn next_template(c: &mut CheckedClient) -> NewTemplateOwned {
    loop {
        if let TdpMessage::NewTemplate(t) = recv(c).await {
            return t;
        }
    }
}

/// Waits for the `NewTemplate(future)` + `SetNewPrevHash` pair of a new tip; what comes
/// before it is checked and skipped.
pub async fn next_tip(c: &mut CheckedClient) -> (NewTemplateOwned, SetNewPrevHashOwned) {
    loop {
        let t = next_template(c).await;
        if !t.future_template {
            continue;
        }
        match recv(c).await {
            TdpMessage::SetNewPrevHash(p) => {
                assert_eq!(
                    p.template_id, t.template_id,
                    "SetNewPrevHash follows its template"
                );
                return (t, p);
            }
            other => panic!("expected SetNewPrevHash after a future template, got {other:?}"),
        }
    }
}

/// The tip of the next `NewTemplate(future)` + `SetNewPrevHash` pair (see [`next_tip`]).
pub async fn next_pair_tip(c: &mut CheckedClient) -> BlockHash {
    let (_, p) = next_tip(c).await;
    prev_hash(&p)
}

/// `prev_hash` of a `SetNewPrevHash` as a block hash.
pub fn prev_hash(p: &SetNewPrevHashOwned) -> BlockHash {
    let bytes: [u8; 32] = p.prev_hash.as_bytes().try_into().expect("32 bytes");
    BlockHash::from_byte_array(bytes)
}

/// The coinbase a pool builds from `t`: the template's prefix plus our extra bytes in the
/// scriptSig, one output paying `payout` everything, then the required outputs.
pub fn build_coinbase(t: &NewTemplateOwned, payout: &ScriptBuf, with_witness: bool) -> Transaction {
    let mut script_sig = t.coinbase_prefix.as_bytes().to_vec();
    // An "extranonce": keeps the scriptSig at 2..=100 bytes even at heights <= 16.
    script_sig.extend_from_slice(&[0x04, 0xde, 0xad, 0xbe, 0xef]);
    let mut outputs = vec![TxOut {
        value: Amount::from_sat(t.coinbase_tx_value_remaining),
        script_pubkey: payout.clone(),
    }];
    let mut rest = t.coinbase_tx_outputs.as_bytes();
    for _ in 0..t.coinbase_tx_outputs_count {
        let out: TxOut = bitcoin::consensus::encode::deserialize_partial(rest)
            .map(|(o, used)| {
                rest = &rest[used..];
                o
            })
            .expect("template outputs decode");
        outputs.push(out);
    }
    Transaction {
        version: Version(t.coinbase_tx_version as i32),
        lock_time: LockTime::from_consensus(t.coinbase_tx_locktime),
        input: vec![TxIn {
            previous_output: OutPoint::null(),
            script_sig: ScriptBuf::from_bytes(script_sig),
            sequence: Sequence(t.coinbase_tx_input_sequence),
            witness: if with_witness {
                Witness::from_slice(&[[0u8; 32]])
            } else {
                Witness::new()
            },
        }],
        output: outputs,
    }
}

/// Grinds the nonce for `t` on `p` with `coinbase`; returns the solution and block hash.
pub fn solve(
    t: &NewTemplateOwned,
    p: &SetNewPrevHashOwned,
    coinbase: &Transaction,
) -> (SubmitSolutionOwned, BlockHash) {
    grind(t, p, coinbase, true)
}

/// A solution for `t` on `p` whose header misses the target: not a block.
pub fn bad_nonce_solution(
    t: &NewTemplateOwned,
    p: &SetNewPrevHashOwned,
    payout: &ScriptBuf,
) -> SubmitSolutionOwned {
    grind(t, p, &build_coinbase(t, payout, true), false).0
}

/// The first nonce from 0 whose header meets the target (`meets`) or misses it.
fn grind(
    t: &NewTemplateOwned,
    p: &SetNewPrevHashOwned,
    coinbase: &Transaction,
    meets: bool,
) -> (SubmitSolutionOwned, BlockHash) {
    let path: Vec<TxMerkleNode> = t
        .merkle_path
        .iter()
        .map(|n| TxMerkleNode::from_byte_array(n.as_bytes().try_into().expect("32 bytes")))
        .collect();
    let mut header = bitcoin::block::Header {
        version: bitcoin::block::Version::from_consensus(t.version as i32),
        prev_blockhash: prev_hash(p),
        merkle_root: super::grind::merkle_root(coinbase, &path),
        time: p.header_timestamp,
        bits: bitcoin::CompactTarget::from_consensus(p.n_bits),
        nonce: 0,
    };
    let target = Target::from_compact(header.bits);
    while target.is_met_by(header.block_hash()) != meets {
        header.nonce += 1;
    }
    let solution = SubmitSolutionOwned {
        template_id: t.template_id,
        version: t.version,
        header_timestamp: header.time,
        header_nonce: header.nonce,
        coinbase_tx: B064KOwned::new(serialize(coinbase)).expect("coinbase fits"),
    };
    (solution, header.block_hash())
}

/// Decodes `RequestTransactionData.Success`'s transaction list.
pub fn decode_transactions(list: Vec<Vec<u8>>) -> Vec<Transaction> {
    list.iter()
        .map(|b| deserialize(b).expect("transaction decodes"))
        .collect()
}
