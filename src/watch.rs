//! `sv2-tpd watch`: a Template Distribution client that prints what a Template Provider sends.
//!
//! It works against any Template Provider (this daemon or another implementation): it
//! verifies the server's Noise certificate against the given authority key, declares its
//! coinbase output constraints, then prints every message with the time it was received,
//! either human-readable or as one JSON object per line.
//!
//! Hashes are shown the way Bitcoin Core shows them (byte-reversed hex), so a
//! `SetNewPrevHash`'s `prev_hash` can be compared with `bitcoin-cli getbestblockhash`.

use std::{
    io::Write,
    net::SocketAddr,
    time::{SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use bitcoin::{consensus::Decodable as _, hashes::Hash as _, BlockHash, TxOut};
use key_utils::Secp256k1PublicKey;
use serde_json::{json, Value};

use crate::sv2::{TdpClient, TdpMessage};

/// What `sv2-tpd watch` connects to and how it prints.
#[derive(Clone, Debug)]
pub struct WatchOptions {
    /// The Template Provider's SV2 address.
    pub addr: SocketAddr,
    /// The authority public key that must have signed the server's Noise certificate.
    pub authority: Secp256k1PublicKey,
    /// `CoinbaseOutputConstraints.coinbase_output_max_additional_size` to declare.
    pub max_additional_size: u32,
    /// `CoinbaseOutputConstraints.coinbase_output_max_additional_sigops` to declare.
    pub max_additional_sigops: u16,
    /// Print one JSON object per line instead of human-readable lines.
    pub json: bool,
    /// Stop after this many Template Distribution messages (the `SetupConnection.Success`
    /// line is not counted); `None` watches until the connection ends.
    pub count: Option<usize>,
}

/// Connects to the Template Provider in `opts` and prints its messages to `out` until
/// `opts.count` messages were printed or the connection fails.
///
/// Every line is flushed as soon as it is written, so `out` can be a pipe.
pub async fn run(opts: WatchOptions, out: &mut (impl Write + ?Sized)) -> anyhow::Result<()> {
    let mut client = TdpClient::connect(opts.addr, opts.authority)
        .await
        .with_context(|| format!("connecting to the Template Provider at {}", opts.addr))?;
    let success = client
        .setup_connection()
        .await
        .with_context(|| format!("SetupConnection with {}", opts.addr))?;
    print_message(
        out,
        opts.json,
        &TdpMessage::SetupConnectionSuccess(success),
        SystemTime::now(),
    )?;
    client
        .send_constraints(opts.max_additional_size, opts.max_additional_sigops)
        .await
        .context("sending CoinbaseOutputConstraints")?;

    let mut printed = 0usize;
    while opts.count != Some(printed) {
        let message = client
            .recv()
            .await
            .with_context(|| format!("receiving from {}", opts.addr))?;
        print_message(out, opts.json, &message, SystemTime::now())?;
        printed += 1;
    }
    Ok(())
}

/// Writes one line describing `message`, received at `received`.
fn print_message(
    out: &mut (impl Write + ?Sized),
    json: bool,
    message: &TdpMessage,
    received: SystemTime,
) -> anyhow::Result<()> {
    let line = format_message(json, message, received);
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .context("writing watch output")
}

/// One output line for `message`: JSON (`{"ts":..,"type":..,<fields>}`) or
/// `<ts> <type> key=value ...`.
fn format_message(json: bool, message: &TdpMessage, received: SystemTime) -> String {
    let (kind, fields) = message_fields(message);
    let ts = rfc3339_micros(received);
    if json {
        // Built by hand to keep `ts` and `type` first and the fields in wire order.
        let mut line = format!("{{\"ts\":{},\"type\":{}", json!(ts), json!(kind));
        for (key, value) in fields {
            line.push_str(&format!(",{}:{value}", json!(key)));
        }
        line.push('}');
        return line;
    }
    let mut line = format!("{ts} {kind}");
    for (key, value) in fields {
        match value {
            Value::String(text) => line.push_str(&format!(" {key}={text}")),
            other => line.push_str(&format!(" {key}={other}")),
        }
    }
    line
}

/// The message's type name and its fields, in wire order, as JSON values.
fn message_fields(message: &TdpMessage) -> (&'static str, Vec<(&'static str, Value)>) {
    let mut fields = Vec::new();
    let mut put = |key: &'static str, value: Value| fields.push((key, value));
    let kind = match message {
        TdpMessage::SetupConnectionSuccess(success) => {
            put("used_version", json!(success.used_version));
            put("flags", json!(success.flags));
            "SetupConnectionSuccess"
        }
        TdpMessage::SetupConnectionError { flags, error_code } => {
            put("flags", json!(flags));
            put("error_code", json!(error_code));
            "SetupConnectionError"
        }
        TdpMessage::NewTemplate(template) => {
            put("template_id", json!(template.template_id));
            put("future_template", json!(template.future_template));
            put("version", json!(format!("0x{:08x}", template.version)));
            put("coinbase_tx_version", json!(template.coinbase_tx_version));
            put(
                "coinbase_prefix",
                json!(to_hex(template.coinbase_prefix.as_bytes())),
            );
            put(
                "coinbase_tx_input_sequence",
                json!(template.coinbase_tx_input_sequence),
            );
            put(
                "coinbase_tx_value_remaining",
                json!(template.coinbase_tx_value_remaining),
            );
            put(
                "coinbase_tx_outputs_count",
                json!(template.coinbase_tx_outputs_count),
            );
            put(
                "coinbase_tx_outputs",
                coinbase_outputs(
                    template.coinbase_tx_outputs.as_bytes(),
                    template.coinbase_tx_outputs_count,
                ),
            );
            put("coinbase_tx_locktime", json!(template.coinbase_tx_locktime));
            let merkle_path: Vec<String> = template
                .merkle_path
                .iter()
                .map(|node| display_hex(node.as_bytes()))
                .collect();
            put("merkle_path", json!(merkle_path));
            "NewTemplate"
        }
        TdpMessage::SetNewPrevHash(prev) => {
            put("template_id", json!(prev.template_id));
            put("prev_hash", json!(display_hex(prev.prev_hash.as_bytes())));
            put("header_timestamp", json!(prev.header_timestamp));
            put("n_bits", json!(format!("0x{:08x}", prev.n_bits)));
            put("target", json!(display_hex(prev.target.as_bytes())));
            "SetNewPrevHash"
        }
        TdpMessage::RequestTransactionDataSuccess(data) => {
            put("template_id", json!(data.template_id));
            put("excess_data", json!(to_hex(data.excess_data.as_bytes())));
            put("transaction_count", json!(data.transaction_list.len()));
            "RequestTransactionDataSuccess"
        }
        TdpMessage::RequestTransactionDataError {
            template_id,
            error_code,
        } => {
            put("template_id", json!(template_id));
            put("error_code", json!(error_code));
            "RequestTransactionDataError"
        }
        TdpMessage::Other {
            extension_type,
            msg_type,
            payload,
        } => {
            put("extension_type", json!(extension_type));
            put("msg_type", json!(msg_type));
            put("payload", json!(to_hex(payload)));
            "Other"
        }
    };
    (kind, fields)
}

/// The template's coinbase outputs as `[{"value_sat":..,"script_pubkey":"<hex>"}]`, or the
/// raw bytes as hex when they do not decode as `count` serialized outputs.
fn coinbase_outputs(bytes: &[u8], count: u32) -> Value {
    let mut reader = bytes;
    let mut outputs = Vec::new();
    for _ in 0..count {
        match TxOut::consensus_decode(&mut reader) {
            Ok(output) => outputs.push(json!({
                "value_sat": output.value.to_sat(),
                "script_pubkey": to_hex(output.script_pubkey.as_bytes()),
            })),
            Err(_) => return json!(to_hex(bytes)),
        }
    }
    if !reader.is_empty() {
        return json!(to_hex(bytes));
    }
    Value::Array(outputs)
}

/// A 32-byte hash or number as Bitcoin Core displays it: little-endian bytes reversed.
fn display_hex(le_bytes: &[u8]) -> String {
    match <[u8; 32]>::try_from(le_bytes) {
        Ok(bytes) => BlockHash::from_byte_array(bytes).to_string(),
        Err(_) => to_hex(
            le_bytes
                .iter()
                .rev()
                .copied()
                .collect::<Vec<_>>()
                .as_slice(),
        ),
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `time` in UTC as RFC 3339 with microseconds, e.g. `2024-05-01T12:00:00.123456Z`.
fn rfc3339_micros(time: SystemTime) -> String {
    // A clock before 1970 is not worth a failure path: show the epoch.
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (days, second_of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_date(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60,
        since_epoch.subsec_micros(),
    )
}

/// The proleptic Gregorian (year, month, day) of the day `days` after 1970-01-01.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01 so that leap days fall at the end of each year; a 400-year era
    // has a fixed 146097 days.
    let days = days + 719_468;
    let era = days / 146_097;
    let day_of_era = days % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = era * 400 + year_of_era + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bitcoin::{consensus::serialize, Amount, ScriptBuf};
    use stratum_core::{
        binary_sv2::{B0255Owned, B064KOwned, Seq0255Owned, U256Owned},
        template_distribution_sv2::{NewTemplateOwned, SetNewPrevHashOwned},
    };

    use super::*;

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros.into())
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(rfc3339_micros(at(0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(at(951_782_400, 7)),
            "2000-02-29T00:00:00.000007Z"
        );
        assert_eq!(
            rfc3339_micros(at(1_714_564_800 + 3_723, 123_456)),
            "2024-05-01T13:02:03.123456Z"
        );
        assert_eq!(
            rfc3339_micros(at(4_102_444_799, 999_999)),
            "2099-12-31T23:59:59.999999Z"
        );
    }

    #[test]
    fn prev_hash_is_printed_in_display_order() {
        let mut le = [0u8; 32];
        le[0] = 0x01;
        le[31] = 0xff;
        let prev = SetNewPrevHashOwned {
            template_id: 7,
            prev_hash: U256Owned::new(le.to_vec()).unwrap(),
            header_timestamp: 1_700_000_000,
            n_bits: 0x207f_ffff,
            target: U256Owned::new(vec![0; 32]).unwrap(),
        };
        let line = format_message(true, &TdpMessage::SetNewPrevHash(prev), at(0, 0));
        let value: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["type"], "SetNewPrevHash");
        assert_eq!(value["ts"], "1970-01-01T00:00:00.000000Z");
        assert_eq!(value["template_id"], 7);
        let expected = format!("ff{}01", "00".repeat(30));
        assert_eq!(value["prev_hash"], expected.as_str());
        assert_eq!(
            BlockHash::from_byte_array(le).to_string(),
            expected,
            "same order as Bitcoin Core's getbestblockhash"
        );
        assert_eq!(value["n_bits"], "0x207fffff");
    }

    #[test]
    fn new_template_lists_decoded_coinbase_outputs() {
        let output = TxOut {
            value: Amount::from_sat(0),
            script_pubkey: ScriptBuf::from_bytes(vec![0x6a, 0x24, 0xaa, 0x21]),
        };
        let template = NewTemplateOwned {
            template_id: 3,
            future_template: true,
            version: 0x2000_0000,
            coinbase_tx_version: 2,
            coinbase_prefix: B0255Owned::new(vec![0x01, 0x65]).unwrap(),
            coinbase_tx_input_sequence: u32::MAX,
            coinbase_tx_value_remaining: 5_000_000_000,
            coinbase_tx_outputs_count: 1,
            coinbase_tx_outputs: B064KOwned::new(serialize(&output)).unwrap(),
            coinbase_tx_locktime: 0,
            merkle_path: Seq0255Owned::new(vec![]).unwrap(),
        };
        let message = TdpMessage::NewTemplate(template);

        let value: Value =
            serde_json::from_str(&format_message(true, &message, at(60, 0))).unwrap();
        assert_eq!(value["type"], "NewTemplate");
        assert_eq!(value["future_template"], true);
        assert_eq!(value["coinbase_prefix"], "0165");
        assert_eq!(value["coinbase_tx_value_remaining"], 5_000_000_000u64);
        assert_eq!(
            value["coinbase_tx_outputs"],
            json!([{ "value_sat": 0, "script_pubkey": "6a24aa21" }])
        );

        let human = format_message(false, &message, at(60, 0));
        assert!(
            human.starts_with("1970-01-01T00:01:00.000000Z NewTemplate template_id=3 "),
            "{human}"
        );
        assert!(human.contains(" future_template=true "), "{human}");
    }

    #[test]
    fn undecodable_coinbase_outputs_fall_back_to_hex() {
        assert_eq!(coinbase_outputs(&[0xde, 0xad], 1), json!("dead"));
        assert_eq!(coinbase_outputs(&[0xde, 0xad], 0), json!("dead"));
        assert_eq!(coinbase_outputs(&[], 0), json!([]));
    }
}
