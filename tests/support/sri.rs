//! Real peers for interoperability tests: `sv2-tpd run` itself, the Stratum Reference
//! Implementation pool (`pool_sv2`), its job-declaration client (`jd_client_sv2`) and its
//! CPU miner (`mining_device`), each run as a child process that is killed when its handle
//! is dropped.
//!
//! The SRI binaries come from `tests/install-sri.sh` (or `SRI_BIN_DIR`). Outside CI their
//! absence skips the tests that need them; under CI it is an error.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bitcoin::Script;
use key_utils::Secp256k1PublicKey;
use sv2_tpd::keys::ServerKeys;
use sv2_tpd::sv2::TdpClient;
use tempfile::TempDir;

pub use super::bitcoin_node::free_local_port;
use super::bitcoin_node::BitcoinNode;

/// How long a child may take to become ready (generous: the machine is shared).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pause between readiness polls.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Lines of each log quoted in diagnostics.
const LOG_TAIL_LINES: usize = 40;
/// The line pool_sv2 0.7 (and jd_client_sv2 0.6) logs once it has a template and prevhash
/// from its Template Provider and accepts miners.
const POOL_READY_LINE: &str = "Required template data received, ready to accept connections";

/// The line jd_client_sv2 0.6 logs once it has its Template Provider and runs without
/// upstreams.
const JDC_SOLO_LINE: &str = "Starting in solo mining mode";

/// Where the SRI binaries are: `SRI_BIN_DIR`, else the cache `tests/install-sri.sh` fills.
///
/// `None` (with a printed notice) when `pool_sv2` or `mining_device` is missing outside
/// CI; under CI (env `CI` set) a missing binary panics, so the interop test never skips
/// there.
pub fn sri_bin_dir(test: &str) -> Option<PathBuf> {
    sri_bin_dir_with(test, &["pool_sv2", "mining_device"])
}

/// Like [`sri_bin_dir`], for the binaries in `needed`.
pub fn sri_bin_dir_with(test: &str, needed: &[&str]) -> Option<PathBuf> {
    let dir = match std::env::var_os("SRI_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = match std::env::var_os("SV2TPD_CACHE") {
                Some(dir) => PathBuf::from(dir),
                None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/sv2-tpd"),
            };
            cache.join("sri/bin")
        }
    };
    let missing: Vec<&str> = needed
        .iter()
        .copied()
        .filter(|bin| !dir.join(bin).is_file())
        .collect();
    if missing.is_empty() {
        return Some(dir);
    }
    let problem = format!(
        "no {} in {} (run `bash tests/install-sri.sh` and export SRI_BIN_DIR=<its output>)",
        missing.join(", "),
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("CI is set but there is {problem}");
    }
    println!("skipped: {problem} ({test})");
    eprintln!("skipped: {problem} ({test})");
    None
}

/// A child process whose output goes to a log file; killed and reaped on drop.
pub struct ChildProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildProcess {
    /// Spawns `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> anyhow::Result<Self> {
        let output = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("creating {}", log.display()))?;
        let stderr = output
            .try_clone()
            .with_context(|| format!("duplicating the handle of {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    /// The exit status, if the process has ended.
    pub fn exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(child) => child
                .try_wait()
                .with_context(|| format!("polling {}", self.name)),
            None => Ok(None),
        }
    }

    /// Fails when the process has ended.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.exit_status()? {
            None => Ok(()),
            Some(status) => bail!("{} exited ({status})\n{}", self.name, self.log_tail()),
        }
    }

    /// Everything the process has logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The path of its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last lines of its log, headed by its name, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        )
    }

    /// Waits until `ready` holds, failing if the process exits or `READY_TIMEOUT` passes.
    pub fn wait_until(
        &mut self,
        what: &str,
        mut ready: impl FnMut(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < READY_TIMEOUT {
            self.ensure_running()
                .with_context(|| format!("while waiting for {what}"))?;
            if ready(self) {
                return Ok(());
            }
            thread::sleep(POLL_INTERVAL);
        }
        bail!(
            "{} not ready after {READY_TIMEOUT:?}: no {what}\n{}",
            self.name,
            self.log_tail()
        )
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL; fails only when the child was already reaped.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `sv2-tpd run` on a regtest node's IPC socket, with its own data directory.
pub struct Sv2Tpd {
    /// The daemon process.
    pub process: ChildProcess,
    /// Where it serves Template Distribution.
    pub addr: SocketAddr,
    /// Its authority public key, as `sv2-tpd keys show` prints it.
    pub authority: Secp256k1PublicKey,
    datadir: TempDir,
}

impl Sv2Tpd {
    /// Starts the daemon against `node` on a free local port and waits until it accepts
    /// connections; then reads its authority key with `sv2-tpd keys show`.
    pub fn start(node: &BitcoinNode) -> anyhow::Result<Self> {
        let binary = env!("CARGO_BIN_EXE_sv2-tpd");
        let datadir = tempfile::Builder::new()
            .prefix("sv2tpd-")
            .tempdir()
            .context("creating a data directory for sv2-tpd")?;
        let addr = SocketAddr::from(([127, 0, 0, 1], free_local_port()?));
        let mut command = Command::new(binary);
        command
            .arg("run")
            .args(["--chain", "regtest"])
            .arg("--datadir")
            .arg(datadir.path())
            .arg("--ipc-socket")
            .arg(node.socket_path())
            .args(["--sv2-bind", "127.0.0.1"])
            .args(["--sv2-port", &addr.port().to_string()])
            .args(["--metrics-bind", "off"])
            .env("RUST_LOG", "info");
        let log = datadir.path().join("sv2-tpd.log");
        let mut process = ChildProcess::spawn("sv2-tpd", command, log)?;
        // Ready means: its key exists and a real client gets through the Noise handshake
        // and SetupConnection (a bare TCP probe would only make it log a failed handshake).
        let mut authority = None;
        process.wait_until("authority key", |_| {
            authority = show_authority_key(binary, datadir.path()).ok();
            authority.is_some()
        })?;
        let authority = authority.context("sv2-tpd keys show printed no key")?;
        process.wait_until(&format!("SV2 service on {addr}"), |_| {
            tdp_setup_succeeds(addr, authority)
        })?;
        Ok(Self {
            process,
            addr,
            authority,
            datadir,
        })
    }
}

/// Whether a Template Distribution client gets through the handshake and SetupConnection.
fn tdp_setup_succeeds(addr: SocketAddr, authority: Secp256k1PublicKey) -> bool {
    // A thread of its own: callers may be inside a tokio runtime, where another cannot run.
    let probe = thread::spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return false;
        };
        runtime.block_on(async {
            let patience = Duration::from_secs(5);
            match TdpClient::connect_with_timeout(addr, authority, patience).await {
                Ok(mut client) => tokio::time::timeout(patience, client.setup_connection())
                    .await
                    .is_ok_and(|setup| setup.is_ok()),
                Err(_) => false,
            }
        })
    });
    probe.join().unwrap_or(false)
}

/// Runs `sv2-tpd keys show --datadir` and parses the key it prints.
fn show_authority_key(binary: &str, datadir: &Path) -> anyhow::Result<Secp256k1PublicKey> {
    let output = Command::new(binary)
        .args(["keys", "show", "--datadir"])
        .arg(datadir)
        .output()
        .context("running sv2-tpd keys show")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "sv2-tpd keys show failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("sv2-tpd keys show printed {stdout:?}: {e:?}"))
}

/// What the test pool is configured with.
pub struct PoolSettings<'a> {
    /// The Template Provider's address.
    pub template_provider: SocketAddr,
    /// The key the Template Provider's certificate must be signed with.
    pub template_provider_authority: Secp256k1PublicKey,
    /// The script every coinbase must pay the block reward to.
    pub coinbase_script: &'a Script,
    /// Expected shares per minute; on regtest nearly every share is a block.
    pub shares_per_minute: f32,
}

/// SRI's `pool_sv2` 0.7 using a Template Provider over SV2.
pub struct Pool {
    /// The pool process.
    pub process: ChildProcess,
    /// Where miners connect.
    pub listen: SocketAddr,
    /// The pool's own authority key (miners verify the pool's certificate with it).
    pub authority: Secp256k1PublicKey,
    /// The configuration file it was started with.
    pub config_path: PathBuf,
}

impl Pool {
    /// Writes a configuration into `workdir`, starts `pool_sv2` from `bin_dir` and waits
    /// until it accepts miners.
    pub fn start(
        bin_dir: &Path,
        workdir: &Path,
        settings: &PoolSettings<'_>,
    ) -> anyhow::Result<Self> {
        let keys = ServerKeys::ephemeral();
        let listen = SocketAddr::from(([127, 0, 0, 1], free_local_port()?));
        let config = pool_config(settings, &keys, listen);
        Self::start_configured(bin_dir, workdir, &config, &keys, listen)
    }

    /// Like [`Pool::start`], with its embedded Job Declaration Server listening on
    /// `jds_listen`. pool_sv2 0.7 takes its templates straight from `node` over IPC then
    /// (its JDS refuses `Sv2Tp`).
    pub fn start_with_jds(
        bin_dir: &Path,
        workdir: &Path,
        node: &BitcoinNode,
        coinbase_script: &Script,
        jds_listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let keys = ServerKeys::ephemeral();
        let listen = SocketAddr::from(([127, 0, 0, 1], free_local_port()?));
        let mut config = pool_header(&keys, listen, coinbase_script, 6.0);
        let _ = writeln!(config, "[template_provider_type.BitcoinCoreIpc]");
        let _ = writeln!(config, "version = 31");
        let _ = writeln!(config, "network = \"regtest\"");
        let _ = writeln!(config, "data_dir = \"{}\"", node.datadir().display());
        let _ = writeln!(config, "fee_threshold = 100");
        let _ = writeln!(config, "min_interval = 5");
        let _ = writeln!(config);
        let _ = writeln!(config, "[jds]");
        let _ = writeln!(config, "listen_address = \"{jds_listen}\"");
        Self::start_configured(bin_dir, workdir, &config, &keys, listen)
    }

    /// Writes `config` (which names `keys` and `listen`) into `workdir`, starts
    /// `pool_sv2` from `bin_dir` and waits until it accepts miners.
    fn start_configured(
        bin_dir: &Path,
        workdir: &Path,
        config: &str,
        keys: &ServerKeys,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let config_path = workdir.join("pool.toml");
        let mut process =
            spawn_configured(bin_dir, "pool_sv2", "POOL__", workdir, &config_path, config)?;
        process.wait_until("first template from the Template Provider", |pool| {
            pool.log_text().contains(POOL_READY_LINE)
        })?;
        Ok(Self {
            process,
            listen,
            authority: keys.authority_pubkey(),
            config_path,
        })
    }

    /// Log lines in which the pool reports trouble with its Template Provider: errors that
    /// mention templates, and every warning or error of its template receiver. (The pool's
    /// start-up warning "Waiting for initial template" is not trouble.)
    pub fn template_provider_problems(&self) -> Vec<String> {
        self.process
            .log_text()
            .lines()
            .filter(|line| {
                let error = line.contains(" ERROR ");
                let warning = line.contains(" WARN ");
                (error && line.to_ascii_lowercase().contains("template"))
                    || ((error || warning) && line.contains("pool_sv2::template_receiver"))
            })
            .map(str::to_owned)
            .collect()
    }

    /// How many times the pool logged that a share was a block.
    pub fn blocks_found(&self) -> usize {
        self.process.log_text().matches("Block Found").count()
    }
}

/// A pool_sv2 0.7 TOML configuration (same keys as its `config-examples/*/
/// pool-config-local-sv2-tp-example.toml`).
pub fn pool_config(settings: &PoolSettings<'_>, keys: &ServerKeys, listen: SocketAddr) -> String {
    let mut toml = pool_header(
        keys,
        listen,
        settings.coinbase_script,
        settings.shares_per_minute,
    );
    let _ = writeln!(toml, "[template_provider_type.Sv2Tp]");
    let _ = writeln!(toml, "address = \"{}\"", settings.template_provider);
    let _ = writeln!(
        toml,
        "public_key = \"{}\"",
        settings.template_provider_authority
    );
    toml
}

/// The top-level keys of a pool_sv2 0.7 configuration, before its template provider.
fn pool_header(
    keys: &ServerKeys,
    listen: SocketAddr,
    coinbase_script: &Script,
    shares_per_minute: f32,
) -> String {
    let mut toml = String::new();
    let _ = writeln!(
        toml,
        "authority_public_key = \"{}\"",
        keys.authority_pubkey()
    );
    let _ = writeln!(
        toml,
        "authority_secret_key = \"{}\"",
        keys.authority_secret()
    );
    let _ = writeln!(toml, "cert_validity_sec = 3600");
    let _ = writeln!(toml, "listen_address = \"{listen}\"");
    let _ = writeln!(
        toml,
        "coinbase_reward_script = \"raw({})\"",
        coinbase_script.to_hex_string()
    );
    let _ = writeln!(toml, "server_id = 1");
    let _ = writeln!(toml, "pool_signature = \"sv2-tpd interop\"");
    let _ = writeln!(toml, "shares_per_minute = {shares_per_minute:.1}");
    let _ = writeln!(toml, "share_batch_size = 1");
    let _ = writeln!(toml);
    toml
}

/// SRI's CPU miner connected to a pool.
pub struct MiningDevice {
    /// The miner process.
    pub process: ChildProcess,
}

impl MiningDevice {
    /// Starts `mining_device` from `bin_dir` against `pool`, verifying its certificate,
    /// with one hashing thread (the machine is shared).
    pub fn start(bin_dir: &Path, workdir: &Path, pool: &Pool) -> anyhow::Result<Self> {
        Self::start_at(bin_dir, workdir, pool.listen, pool.authority)
    }

    /// Starts `mining_device` against any SV2 mining server at `upstream` whose
    /// certificates are signed by `authority` (a pool, or a JDC).
    pub fn start_at(
        bin_dir: &Path,
        workdir: &Path,
        upstream: SocketAddr,
        authority: Secp256k1PublicKey,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(bin_dir.join("mining_device"));
        command
            .args(["--address-pool", &upstream.to_string()])
            .args(["--pubkey-pool", &authority.to_string()])
            .args(["--id-device", "sv2-tpd-interop"])
            .args(["--cores", "1"])
            .env("RUST_LOG", "info");
        let process =
            ChildProcess::spawn("mining_device", command, workdir.join("mining_device.log"))?;
        Ok(Self { process })
    }
}

/// SRI's `jd_client_sv2` 0.6, started with a configuration given whole (the test takes
/// it from README.md).
pub struct Jdc {
    /// The JDC process.
    pub process: ChildProcess,
    /// Where miners connect.
    pub listen: SocketAddr,
}

impl Jdc {
    /// Writes `config` into `workdir`, starts `jd_client_sv2` from `bin_dir`, and waits
    /// until it runs in solo mode with a template, accepting miners on `listen` (the
    /// config's `listening_address`).
    pub fn start(
        bin_dir: &Path,
        workdir: &Path,
        config: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let mut jdc = Self::start_with_upstreams(bin_dir, workdir, config, listen)?;
        jdc.process.wait_until("solo mining mode", |jdc| {
            jdc.log_text().contains(JDC_SOLO_LINE)
        })?;
        Ok(jdc)
    }

    /// Like [`Jdc::start`] for a configuration with upstreams (a pool and its JDS): waits
    /// only until the JDC has a template and accepts miners.
    pub fn start_with_upstreams(
        bin_dir: &Path,
        workdir: &Path,
        config: &str,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let config_path = workdir.join("jdc.toml");
        let mut process = spawn_configured(
            bin_dir,
            "jd_client_sv2",
            "JDC__",
            workdir,
            &config_path,
            config,
        )?;
        // The same line as the pool's: its listener is bound and it has a template.
        process.wait_until("first template from the Template Provider", |jdc| {
            jdc.log_text().contains(POOL_READY_LINE)
        })?;
        Ok(Self { process, listen })
    }

    /// Waits until the JDC has fallen back to solo mining and is ready again: it logged
    /// its solo-mode line and, after it, that it has a template (from its repeated
    /// `CoinbaseOutputConstraints`) and accepts miners.
    pub fn wait_for_solo_fallback(&mut self) -> anyhow::Result<()> {
        self.process
            .wait_until("solo fallback with a template", |jdc| {
                let log = jdc.log_text();
                log.split_once(JDC_SOLO_LINE)
                    .is_some_and(|(_, after)| after.contains(POOL_READY_LINE))
            })
    }

    /// Log lines in which the JDC reports trouble: every error, and warnings of its
    /// template receiver.
    pub fn problems(&self) -> Vec<String> {
        self.process
            .log_text()
            .lines()
            .filter(|line| {
                line.contains(" ERROR ")
                    || (line.contains(" WARN ") && line.contains("template_receiver"))
            })
            .map(str::to_owned)
            .collect()
    }

    /// How many times the JDC logged that a share was a block.
    pub fn blocks_found(&self) -> usize {
        self.process.log_text().matches("Block Found").count()
    }
}

/// Writes `config` to `config_path` and starts SRI's `binary` (from `bin_dir`) on it in
/// `workdir`, logging beside it (`pool.toml` → `pool.log`). SRI's daemons let variables
/// starting with `env_prefix` (`POOL__`, `JDC__`) override their file; none may leak in
/// from the test's environment.
fn spawn_configured(
    bin_dir: &Path,
    binary: &'static str,
    env_prefix: &str,
    workdir: &Path,
    config_path: &Path,
    config: &str,
) -> anyhow::Result<ChildProcess> {
    fs::write(config_path, config).with_context(|| format!("writing {}", config_path.display()))?;
    let mut command = Command::new(bin_dir.join(binary));
    command
        .arg("--config")
        .arg(config_path)
        .env("RUST_LOG", "info")
        .current_dir(workdir);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with(env_prefix) {
            command.env_remove(key);
        }
    }
    ChildProcess::spawn(binary, command, config_path.with_extension("log"))
}

/// Waits until `node` is `blocks` blocks above `start_height`, checking every half second
/// that each of `processes` still runs; fails with their logs after `patience`. `through`
/// names what mines them, for the message.
pub fn mine_through(
    node: &BitcoinNode,
    processes: &mut [&mut ChildProcess],
    start_height: u64,
    blocks: u64,
    patience: Duration,
    through: &str,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut height = start_height;
    while height < start_height + blocks {
        let mut stopped = None;
        for process in processes.iter_mut() {
            if let Err(e) = process.ensure_running() {
                stopped = Some(format!("{e:#}"));
            }
        }
        let diagnostics = || {
            let mut text = String::new();
            for process in processes.iter() {
                let _ = writeln!(text, "{}", process.log_tail());
            }
            let _ = write!(
                text,
                "--- bitcoin-node: {} ---",
                node.debug_log_path().display()
            );
            text
        };
        if let Some(stopped) = stopped {
            bail!("{stopped}\n{}", diagnostics());
        }
        if started.elapsed() > patience {
            bail!(
                "only {} of {blocks} blocks mined through {through} after {patience:?}\n{}",
                height - start_height,
                diagnostics()
            );
        }
        thread::sleep(Duration::from_millis(500));
        height = node.block_count()?;
    }
    Ok(())
}

/// Checks that block `h`'s coinbase pays `payout` (named `whose` in the message) a
/// positive amount.
pub fn assert_coinbase_pays(
    block: &bitcoin::Block,
    h: u64,
    payout: &Script,
    whose: &str,
) -> anyhow::Result<()> {
    let coinbase = block
        .txdata
        .first()
        .with_context(|| format!("block {h} has no transactions"))?;
    assert!(
        coinbase
            .output
            .iter()
            .any(|out| out.script_pubkey.as_script() == payout && out.value.to_sat() > 0),
        "block {h} does not pay {whose} {payout}: {:?}",
        coinbase.output
    );
    Ok(())
}
