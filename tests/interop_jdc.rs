//! Solo mining with SRI's job-declaration client: `jd_client_sv2` 0.6 in `SOLOMINING`
//! mode takes its templates from `sv2-tpd run` on a real regtest `bitcoin-node`, and SRI's
//! CPU miner (`mining_device`) mines through the JDC. Blocks must reach the node through
//! sv2-tpd's submission, each paying the JDC's `coinbase_reward_script`.
//!
//! The JDC's configuration is the one in README.md ("Solo mining with SRI's JDC"), read
//! from there; only the ports and sv2-tpd's key are filled in.
//!
//! Then the fallback: the same JDC mines through SRI's pool (with its embedded JDS) while
//! it can, and when the pool is stopped falls back to solo mining on its Template
//! Distribution connection to sv2-tpd, where its repeated `CoinbaseOutputConstraints`
//! must bring a template pair at once, and mines on.
//!
//! Skips with a `skipped:` notice outside CI when the node or the SRI binaries are missing
//! (see `tests/build-bitcoin-node.sh` and `tests/install-sri.sh`).

mod support;

use std::path::Path;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _};
use bitcoin::hashes::Hash as _;
use bitcoin::{Address, Network, ScriptBuf};
use support::sri::{
    assert_coinbase_pays, free_local_port, mine_through, sri_bin_dir_with, Jdc, MiningDevice, Pool,
    Sv2Tpd,
};
use support::BitcoinNode;

/// Blocks the miner must get into the chain through the JDC.
const BLOCKS_TO_MINE: u64 = 5;
/// Only to avoid hanging when mining stalls; nothing is timed.
const MINING_PATIENCE: Duration = Duration::from_secs(240);
/// The README section holding the tested configuration.
const README_SECTION: &str = "## Solo mining with SRI's JDC";

/// The first ```toml block of the README's JDC section.
fn readme_jdc_config() -> anyhow::Result<String> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .context("reading README.md")?;
    let section = readme
        .split_once(README_SECTION)
        .with_context(|| format!("README.md has no {README_SECTION:?}"))?
        .1;
    let block = section
        .split_once("```toml\n")
        .context("the JDC section has no ```toml block")?
        .1;
    let (toml, _) = block
        .split_once("```")
        .context("the JDC section's toml block does not end")?;
    Ok(toml.to_string())
}

/// Replaces the value of the one line that starts with `key = `.
fn set_value(config: &str, key: &str, value: &str) -> anyhow::Result<String> {
    let prefix = format!("{key} = ");
    let matching = config.lines().filter(|l| l.starts_with(&prefix)).count();
    ensure!(
        matching == 1,
        "{matching} lines set {key} in the README's config"
    );
    Ok(config
        .lines()
        .map(|line| {
            if line.starts_with(&prefix) {
                format!("{prefix}\"{value}\"")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n")
}

/// The quoted value of the one line that starts with `key = `.
fn value<'a>(config: &'a str, key: &str) -> anyhow::Result<&'a str> {
    let prefix = format!("{key} = \"");
    config
        .lines()
        .find_map(|l| l.strip_prefix(&prefix)?.strip_suffix('"'))
        .with_context(|| format!("no {key} in the README's config"))
}

/// The script of an `addr(<address>)` descriptor, for regtest.
fn descriptor_script(descriptor: &str) -> anyhow::Result<ScriptBuf> {
    let address = descriptor
        .strip_prefix("addr(")
        .and_then(|rest| rest.strip_suffix(')'))
        .with_context(|| format!("{descriptor:?} is not addr(...)"))?;
    let address = Address::from_str(address)
        .with_context(|| format!("parsing {address}"))?
        .require_network(Network::Regtest)
        .with_context(|| format!("{address} is not a regtest address"))?;
    Ok(address.script_pubkey())
}

/// The README's JDC configuration, filled in for a JDC on `tpd` listening on a free port.
struct ReadmeJdc {
    /// The configuration file's text.
    config: String,
    /// Its `coinbase_reward_script`.
    payout: ScriptBuf,
    /// Its `authority_public_key` (miners verify the JDC with it).
    authority: key_utils::Secp256k1PublicKey,
    /// Its `listening_address`.
    listen: std::net::SocketAddr,
}

impl ReadmeJdc {
    fn on(tpd: &Sv2Tpd) -> anyhow::Result<Self> {
        let readme = readme_jdc_config()?;
        let payout = descriptor_script(value(&readme, "coinbase_reward_script")?)?;
        let authority = value(&readme, "authority_public_key")?
            .parse()
            .map_err(|e| anyhow::anyhow!("authority_public_key: {e:?}"))?;
        let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_local_port()?));
        let config = set_value(&readme, "listening_address", &listen.to_string())?;
        let config = set_value(&config, "address", &tpd.addr.to_string())?;
        let config = set_value(&config, "public_key", &tpd.authority.to_string())?;
        Ok(Self {
            config,
            payout,
            authority,
            listen,
        })
    }
}

#[test]
fn the_readme_config_reads_back() -> anyhow::Result<()> {
    let config = readme_jdc_config()?;
    assert_eq!(value(&config, "mode")?, "SOLOMINING");
    assert_eq!(
        value(&config, "public_key")?,
        "<output of sv2-tpd keys show>"
    );
    let script = descriptor_script(value(&config, "coinbase_reward_script")?)?;
    assert!(script.is_p2wpkh(), "{script}");
    let _: key_utils::Secp256k1PublicKey = value(&config, "authority_public_key")?
        .parse()
        .map_err(|e| anyhow::anyhow!("authority_public_key: {e:?}"))?;
    Ok(())
}

#[test]
fn jdc_solo_mines_blocks_on_sv2_tpd_templates() -> anyhow::Result<()> {
    let test = "jdc_solo_mines_blocks_on_sv2_tpd_templates";
    let Some(bin_dir) = sri_bin_dir_with(test, &["jd_client_sv2", "mining_device"]) else {
        return Ok(());
    };
    let Some(node) = BitcoinNode::start_if_available(test)? else {
        return Ok(());
    };
    node.fund_op_true()?;
    let mut tpd = Sv2Tpd::start(&node)?;

    let ReadmeJdc {
        config,
        payout,
        authority: jdc_authority,
        listen,
    } = ReadmeJdc::on(&tpd)?;

    let workdir = tempfile::tempdir().context("creating the JDC's directory")?;
    let mut jdc = Jdc::start(&bin_dir, workdir.path(), &config, listen)?;
    let start_height = node.block_count()?;
    let mut miner = MiningDevice::start_at(&bin_dir, workdir.path(), listen, jdc_authority)?;

    let started = Instant::now();
    mine_through(
        &node,
        &mut [&mut tpd.process, &mut jdc.process, &mut miner.process],
        start_height,
        BLOCKS_TO_MINE,
        MINING_PATIENCE,
        "the JDC",
    )?;
    let height = node.block_count()?;
    eprintln!(
        "{} blocks mined solo through sv2-tpd by jd_client_sv2 + mining_device in {:?} \
         (JDC logged {} found)",
        height - start_height,
        started.elapsed(),
        jdc.blocks_found()
    );

    // The JDC has no other way to the node: sv2-tpd submitted every block.
    blocks_pay(
        &node,
        &tpd,
        start_height + 1,
        height,
        &payout,
        "the JDC's coinbase_reward_script",
    )?;
    let problems = jdc.problems();
    assert!(
        problems.is_empty(),
        "the JDC reported problems:\n{}",
        problems.join("\n")
    );
    Ok(())
}

/// The README's JDC configuration turned into one with an upstream: the pool at `pool`
/// (whose certificates `authority` signs) and its JDS at `jds`, full-template mode.
fn with_upstream(
    solo: &str,
    pool: std::net::SocketAddr,
    jds: std::net::SocketAddr,
    authority: key_utils::Secp256k1PublicKey,
) -> anyhow::Result<String> {
    let config = set_value(solo, "mode", "FULLTEMPLATE")?;
    let upstream = format!(
        "[[upstreams]]\nauthority_pubkey = \"{authority}\"\npool_address = \"{}\"\n\
         pool_port = {}\njds_address = \"{}\"\njds_port = {}\n\
         user_identity = \"sv2-tpd-interop\"\n\n",
        pool.ip(),
        pool.port(),
        jds.ip(),
        jds.port()
    );
    let tp = "[template_provider_type.Sv2Tp]";
    ensure!(
        config.contains("upstreams = []\n") && config.contains(tp),
        "the README's config changed shape"
    );
    Ok(config
        .replace("upstreams = []\n", "")
        .replace(tp, &format!("{upstream}{tp}")))
}

/// Checks that blocks `from..=to` each pay `payout` and that sv2-tpd logged each one as
/// accepted by the node (so it went through sv2-tpd's submission).
fn blocks_pay(
    node: &BitcoinNode,
    tpd: &Sv2Tpd,
    from: u64,
    to: u64,
    payout: &bitcoin::Script,
    whose: &str,
) -> anyhow::Result<()> {
    for h in from..=to {
        let hash = node.block_hash(h)?;
        // The node can have the block a moment before sv2-tpd logs its verdict.
        let logged = || {
            tpd.process
                .log_text()
                .lines()
                .any(|l| l.contains("block accepted by the node") && l.contains(&hash.to_string()))
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !logged() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            logged(),
            "sv2-tpd did not log block {h} ({hash}) as accepted\n{}",
            tpd.process.log_tail()
        );
        assert_coinbase_pays(&node.get_block(&hash)?, h, payout, whose)?;
    }
    Ok(())
}

#[test]
fn jdc_falls_back_to_solo_when_its_pool_stops_and_mines_on_sv2_tpd() -> anyhow::Result<()> {
    let test = "jdc_falls_back_to_solo_when_its_pool_stops_and_mines_on_sv2_tpd";
    let Some(bin_dir) = sri_bin_dir_with(test, &["pool_sv2", "jd_client_sv2", "mining_device"])
    else {
        return Ok(());
    };
    let Some(node) = BitcoinNode::start_if_available(test)? else {
        return Ok(());
    };
    node.fund_op_true()?;
    let mut tpd = Sv2Tpd::start(&node)?;
    let workdir = tempfile::tempdir().context("creating the test's directory")?;

    // The pool (and its JDS) reads the node over IPC; the JDC takes templates from sv2-tpd.
    let pool_script = ScriptBuf::new_p2wpkh(&bitcoin::WPubkeyHash::from_byte_array([0x11; 20]));
    let jds = std::net::SocketAddr::from(([127, 0, 0, 1], free_local_port()?));
    let pool = Pool::start_with_jds(&bin_dir, workdir.path(), &node, &pool_script, jds)?;

    let ReadmeJdc {
        config,
        payout: solo_payout,
        authority: jdc_authority,
        listen,
    } = ReadmeJdc::on(&tpd)?;
    let config = with_upstream(&config, pool.listen, jds, pool.authority)?;
    let mut jdc = Jdc::start_with_upstreams(&bin_dir, workdir.path(), &config, listen)?;
    let mut pool = pool;

    // Through the pool first: its blocks pay the pool.
    let start_height = node.block_count()?;
    let mut miner = MiningDevice::start_at(&bin_dir, workdir.path(), listen, jdc_authority)?;
    mine_through(
        &node,
        &mut [
            &mut tpd.process,
            &mut pool.process,
            &mut jdc.process,
            &mut miner.process,
        ],
        start_height,
        1,
        MINING_PATIENCE,
        "the JDC and the pool",
    )?;
    let pool_height = node.block_count()?;
    let pool_block = node.get_block(&node.block_hash(pool_height)?)?;
    assert_coinbase_pays(&pool_block, pool_height, &pool_script, "the pool")?;

    // The pool stops. The JDC falls back to solo mining and sends its constraints to
    // sv2-tpd again; it takes miners again once it has a pair.
    drop(pool);
    let stopped = Instant::now();
    jdc.wait_for_solo_fallback()?;
    let ready_after = stopped.elapsed();
    // mining_device 0.6 exits when its upstream drops it; a new one connects.
    drop(miner);
    let mut miner = MiningDevice::start_at(&bin_dir, workdir.path(), listen, jdc_authority)?;
    let solo_height = node.block_count()?;
    mine_through(
        &node,
        &mut [&mut tpd.process, &mut jdc.process, &mut miner.process],
        solo_height,
        2,
        MINING_PATIENCE,
        "the JDC in solo mode",
    )?;
    let height = node.block_count()?;
    blocks_pay(
        &node,
        &tpd,
        solo_height + 1,
        height,
        &solo_payout,
        "the JDC's coinbase_reward_script",
    )?;
    eprintln!(
        "pool stopped at height {pool_height}; the JDC was mining solo again {ready_after:?} \
         later; {} blocks then mined through sv2-tpd",
        height - solo_height
    );
    Ok(())
}
