//! Checks the real `bitcoin-node` test harness itself: start, fund, mempool, crash and
//! restart, and clean shutdown. Skipped (with a printed notice) when no node binary is
//! available outside CI.

mod support;

use std::path::Path;

use bitcoin::Amount;
use support::op_true_script;

/// Starts a node, or returns from the test after reporting it skipped.
#[test]
fn node_starts_with_ipc_socket_and_regtest_chain() -> anyhow::Result<()> {
    let node = node_or_skip!("node_starts_with_ipc_socket_and_regtest_chain", Ok(()));
    assert!(
        node.socket_path().exists(),
        "no IPC socket at {}",
        node.socket_path().display()
    );
    assert!(
        node.socket_path().as_os_str().len() < 108,
        "socket path too long for a unix socket: {}",
        node.socket_path().display()
    );
    let info = node.rpc("getblockchaininfo", serde_json::json!([]))?;
    assert_eq!(info["chain"], "regtest");
    assert_eq!(node.block_count()?, 0);
    Ok(())
}

#[test]
fn funded_transactions_enter_the_mempool() -> anyhow::Result<()> {
    let node = node_or_skip!("funded_transactions_enter_the_mempool", Ok(()));
    let coins = node.fund_op_true()?;
    assert!(node.block_count()? >= 101);
    assert!(!coins.is_empty(), "no mature coin after funding");

    let tip = node.get_block(&node.best_block_hash()?)?;
    assert_eq!(tip.block_hash(), node.best_block_hash()?);
    assert_eq!(tip.txdata[0].output[0].script_pubkey, op_true_script());

    let first = node.send_fee_tx(Amount::from_sat(10_000))?;
    // More transactions than there are mature coinbases: the rest chain on change.
    let second = node.send_fee_tx(Amount::from_sat(20_000))?;
    let third = node.send_fee_tx(Amount::from_sat(5_000))?;
    let mempool = node.mempool_txids()?;
    for txid in [first, second, third] {
        assert!(mempool.contains(&txid), "{txid} not in mempool {mempool:?}");
    }

    let mined = node.generate(1)?;
    let block = node.get_block(&mined[0])?;
    let mined_txids: Vec<_> = block.txdata.iter().map(|tx| tx.compute_txid()).collect();
    for txid in [first, second, third] {
        assert!(mined_txids.contains(&txid), "{txid} not mined");
    }
    assert!(node.mempool_txids()?.is_empty());
    Ok(())
}

#[test]
fn chain_survives_kill9_and_restart() -> anyhow::Result<()> {
    let node = node_or_skip!("chain_survives_kill9_and_restart", Ok(()));
    node.generate(10)?;
    // Flush the chainstate so the crash cannot lose the blocks we compare against.
    node.flush_to_disk()?;
    let tip = node.best_block_hash()?;
    let old_pid = node.pid();

    node.kill9()?;
    assert!(!node.is_running());
    assert!(!process_exists(old_pid), "pid {old_pid} survived SIGKILL");

    node.restart()?;
    assert_ne!(node.pid(), old_pid);
    assert!(node.socket_path().exists());
    assert_eq!(node.block_count()?, 10);
    assert_eq!(node.best_block_hash()?, tip);
    Ok(())
}

#[test]
fn drop_stops_the_node_and_removes_its_datadir() -> anyhow::Result<()> {
    let node = node_or_skip!("drop_stops_the_node_and_removes_its_datadir", Ok(()));
    let pid = node.pid();
    let datadir = node.datadir().to_path_buf();
    assert!(process_exists(pid));
    drop(node);
    assert!(!process_exists(pid), "pid {pid} still running after drop");
    assert!(!datadir.exists(), "{} left behind", datadir.display());
    Ok(())
}

fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
