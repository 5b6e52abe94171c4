//! The Template Distribution stream checker of the test support
//! (`tests/support/stream_check.rs`) on made-up streams: it accepts what the daemon sends
//! and names each broken rule.

mod support;

use stratum_core::binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned};
use stratum_core::template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned};
use support::stream_check::{bip34_height, StreamChecker};
use sv2_tpd::sv2::TdpMessage;

/// A template building block `height` (its BIP34 push as Bitcoin Core writes it).
fn template(id: u64, future: bool, height: u32) -> TdpMessage {
    let push = bitcoin::script::Builder::new()
        .push_int(i64::from(height))
        .into_script()
        .into_bytes();
    TdpMessage::NewTemplate(NewTemplateOwned {
        template_id: id,
        future_template: future,
        version: 0x2000_0000,
        coinbase_tx_version: 2,
        coinbase_prefix: B0255Owned::new(push).expect("prefix fits"),
        coinbase_tx_input_sequence: 0xffff_ffff,
        coinbase_tx_value_remaining: 5_000_000_000,
        coinbase_tx_outputs_count: 0,
        coinbase_tx_outputs: B064KOwned::new(Vec::new()).expect("outputs fit"),
        coinbase_tx_locktime: height - 1,
        merkle_path: Seq0255Owned::new(Vec::new()).expect("path fits"),
    })
}

fn activate(id: u64) -> TdpMessage {
    TdpMessage::SetNewPrevHash(SetNewPrevHashOwned {
        template_id: id,
        prev_hash: U256Owned::new(vec![0xab; 32]).expect("32 bytes"),
        header_timestamp: 1_700_000_000,
        n_bits: 0x207f_ffff,
        target: U256Owned::new(vec![0xff; 32]).expect("32 bytes"),
    })
}

/// Feeds `stream` to a fresh checker: `Ok` or the first broken rule.
fn check(stream: &[TdpMessage]) -> Result<(), String> {
    let mut checker = StreamChecker::default();
    stream.iter().try_for_each(|m| checker.observe(m))
}

fn broken(stream: &[TdpMessage]) -> String {
    check(stream).expect_err("the checker let a broken stream through")
}

#[test]
fn the_daemons_stream_passes() {
    // Tip first at height 10 and 11 (full templates after each pair), a fee update, a
    // reorg back to height 11, and a transaction-data answer in between.
    check(&[
        template(1, true, 10),
        activate(1),
        template(2, false, 10),
        template(3, true, 11),
        activate(3),
        template(4, false, 11),
        template(5, false, 11),
        TdpMessage::RequestTransactionDataError {
            template_id: 4,
            error_code: "stale-template-id".into(),
        },
        template(6, true, 11),
        activate(6),
    ])
    .expect("a well-formed stream");
}

#[test]
fn set_new_prev_hash_needs_its_future_template_first() {
    let why = broken(&[template(1, true, 10), activate(2)]);
    assert!(why.contains("SetNewPrevHash for template 2"), "{why}");
    let why = broken(&[template(1, false, 10)]);
    assert!(why.contains("before any SetNewPrevHash"), "{why}");
    // A template sent as non-future cannot be activated.
    let why = broken(&[
        template(1, true, 10),
        activate(1),
        template(2, false, 10),
        activate(2),
    ]);
    assert!(why.contains("SetNewPrevHash for template 2"), "{why}");
}

#[test]
fn a_full_template_ahead_of_its_tips_set_new_prev_hash_is_caught() {
    // Block 10's tip is active; the full template for block 11 overtakes 11's pair.
    let why = broken(&[
        template(1, true, 10),
        activate(1),
        template(2, false, 11),
        template(3, true, 11),
        activate(3),
    ]);
    assert!(why.contains("builds block 11"), "{why}");
    assert!(why.contains("NewTemplate(id 2"), "{why}");
}

#[test]
fn a_template_id_is_never_reused() {
    let why = broken(&[
        template(1, true, 10),
        activate(1),
        template(2, true, 11),
        activate(2),
        template(1, false, 11),
    ]);
    assert!(
        why.contains("template id 1 was used before for another template"),
        "{why}"
    );
}

#[test]
fn the_same_template_may_come_again_as_a_pair() {
    // A client that sends CoinbaseOutputConstraints again gets its current template again.
    let mut checker = StreamChecker::default();
    for message in [
        template(1, true, 10),
        activate(1),
        template(1, true, 10),
        activate(1),
    ] {
        checker.observe(&message).expect("a resend breaks no rule");
    }
}

#[test]
fn bip34_heights_decode_as_bitcoin_core_writes_them() {
    for height in [
        0u32, 1, 16, 17, 127, 128, 255, 256, 65_535, 500_000, 8_388_608,
    ] {
        let push = bitcoin::script::Builder::new()
            .push_int(i64::from(height))
            .into_script()
            .into_bytes();
        assert_eq!(bip34_height(&push), Some(height), "{push:02x?}");
    }
    assert_eq!(bip34_height(&[]), None);
    assert_eq!(
        bip34_height(&[0x4c, 1, 2]),
        None,
        "OP_PUSHDATA1 is not a height push"
    );
}
