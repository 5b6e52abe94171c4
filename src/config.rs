//! Daemon configuration from, in rising precedence: built-in defaults, a TOML file,
//! `SV2TPD_<KEY>` environment variables and command-line flags.
//!
//! Keys are flat and snake_case; the same names are used in the file and (upper-cased,
//! behind [`ENV_PREFIX`]) in the environment, and as kebab-case flags. Every value
//! remembers where it came from ([`Provenance`]), and every rejected value is reported
//! with its key, its source and what is allowed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::logging::{self, LogFormat};

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "SV2TPD_";
/// Environment variable naming the configuration file (like `--config`).
pub const CONFIG_ENV_VAR: &str = "SV2TPD_CONFIG";
/// Name of the configuration file looked up in the data directory.
pub const CONFIG_FILE_NAME: &str = "sv2-tpd.toml";
/// Default file name of the authority key, inside the data directory.
pub const AUTHORITY_KEY_FILE: &str = "authority.key";
/// Name of the node's IPC socket inside its chain data directory.
pub const NODE_SOCKET_NAME: &str = "node.sock";

/// Seconds in the default certificate validity (365 days).
const DEFAULT_CERT_VALIDITY_SECS: u64 = 365 * 24 * 60 * 60;

/// The Bitcoin network the node runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Chain {
    /// Mainnet.
    Main,
    /// Testnet 4 (BIP94).
    Testnet4,
    /// The default signet.
    Signet,
    /// Local regression-test chain.
    Regtest,
}

impl Chain {
    /// Every chain, in the order they are listed to users.
    pub const ALL: [Chain; 4] = [Chain::Main, Chain::Testnet4, Chain::Signet, Chain::Regtest];

    /// The spelling used in configuration (and by Bitcoin Core's `-chain=`).
    pub fn as_str(self) -> &'static str {
        match self {
            Chain::Main => "main",
            Chain::Testnet4 => "testnet4",
            Chain::Signet => "signet",
            Chain::Regtest => "regtest",
        }
    }

    /// The SV2 listening port used when `sv2_port` is not set.
    pub fn default_sv2_port(self) -> u16 {
        match self {
            Chain::Main => 8442,
            Chain::Testnet4 => 48442,
            Chain::Signet => 38442,
            Chain::Regtest => 18447,
        }
    }

    /// The sub-directory of Bitcoin Core's data directory holding this chain's files.
    pub fn bitcoin_subdir(self) -> Option<&'static str> {
        match self {
            Chain::Main => None,
            Chain::Testnet4 => Some("testnet4"),
            Chain::Signet => Some("signet"),
            Chain::Regtest => Some("regtest"),
        }
    }

    /// The matching `rust-bitcoin` network.
    pub fn network(self) -> bitcoin::Network {
        match self {
            Chain::Main => bitcoin::Network::Bitcoin,
            Chain::Testnet4 => bitcoin::Network::Testnet4,
            Chain::Signet => bitcoin::Network::Signet,
            Chain::Regtest => bitcoin::Network::Regtest,
        }
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Chain {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Chain::ALL
            .into_iter()
            .find(|chain| chain.as_str() == s)
            .ok_or_else(|| "expected one of main, testnet4, signet, regtest".to_string())
    }
}

/// The effective configuration of the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Network the node runs on.
    pub chain: Chain,
    /// Our data directory (keys, default config file).
    pub datadir: PathBuf,
    /// Bitcoin Core's data directory; only used to derive `ipc_socket`.
    pub bitcoin_datadir: PathBuf,
    /// Unix socket of the node's IPC interface.
    pub ipc_socket: PathBuf,
    /// Address the SV2 server listens on.
    pub sv2_bind: IpAddr,
    /// Port the SV2 server listens on.
    pub sv2_port: u16,
    /// Fee increase, in satoshis, that makes a new template worth sending.
    pub fee_delta: u64,
    /// How often to check the node for a better template.
    pub template_interval: Duration,
    /// How long superseded templates stay usable for solutions.
    pub stale_template_grace: Duration,
    /// On a new tip, send a template without mempool transactions at once and the full
    /// one when the node has built it.
    pub tip_first: bool,
    /// Most SV2 clients served at once.
    pub max_clients: usize,
    /// Address of the metrics HTTP endpoint; `None` when disabled (`off`).
    pub metrics_bind: Option<SocketAddr>,
    /// `tracing` filter, already checked to be valid.
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// File holding the authority key that signs our certificates.
    pub authority_key_path: PathBuf,
    /// Validity period of the certificates we issue for the static key.
    pub cert_validity: Duration,
    /// Time a client has for its whole setup: Noise, `SetupConnection` and its first
    /// `CoinbaseOutputConstraints`.
    pub handshake_timeout: Duration,
    /// Setups in progress at once; more connections wait for a place, 16 per place (see
    /// [`crate::sv2::admission`] for a full waiting list).
    pub max_pending_handshakes: usize,
    /// Connections from one non-loopback IP address at once; 0 for no limit.
    pub max_clients_per_ip: usize,
    /// Unknown or out-of-order messages tolerated per session before it is disconnected.
    pub max_bad_messages: u32,
    /// Solutions of one session waiting for the node at once; more are dropped.
    pub max_solutions_in_flight_per_client: usize,
    /// Solutions whose header misses its target tolerated per session before it is disconnected.
    pub max_bad_solutions: u32,
    /// Solutions with valid proof of work on their way to the node at once, all clients together; more are refused.
    pub max_solutions_in_flight: usize,
    /// Node calls clients can cause at once, all together (a new constraint group's first template, block reads for transaction data).
    pub max_node_calls: usize,
    /// `RequestTransactionData` of one session answered at once; more are refused with "throttled".
    pub max_tx_data_requests_per_client: usize,
    /// Bytes of transaction-data answers encoded and not yet written, all clients together.
    pub max_tx_data_bytes_in_flight: usize,
    /// Least time between two applied `CoinbaseOutputConstraints` of one session; changes
    /// in between are coalesced, the latest winning.
    pub constraints_interval: Duration,
    /// Deadline of every IPC call that is not a wait; a node that misses it on the
    /// periodic probe counts as not responding.
    pub node_call_timeout: Duration,
    /// Templates held at once, all constraint groups together; the oldest that are not a
    /// group's current one are released first.
    pub max_templates_held: usize,
    /// Bytes of cached template transactions held at once, all groups together (a list
    /// shared by templates with the same transactions counted once).
    pub max_template_bytes_held: usize,
}

impl Config {
    /// Loads the configuration from the file, the process environment and `args`.
    pub fn load(args: &ConfigArgs) -> Result<(Config, Provenance), ConfigError> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        Config::load_from(args, std::env::vars_os(), home.as_deref())
    }

    /// Like [`Config::load`], with the environment and home directory given explicitly.
    pub fn load_from(
        args: &ConfigArgs,
        env: impl IntoIterator<Item = (OsString, OsString)>,
        home: Option<&Path>,
    ) -> Result<(Config, Provenance), ConfigError> {
        let env_values = read_env(env)?;
        let flag_values = args.values();
        let file = locate_file(args, &env_values, &flag_values, home)?;
        let mut merged: BTreeMap<&'static str, (String, Source)> = BTreeMap::new();
        if let Some(path) = &file {
            merged.extend(read_file(path)?);
        }
        merged.extend(env_values);
        merged.extend(flag_values);
        Resolver {
            values: merged,
            home,
            provenance: Provenance {
                config_file: file,
                sources: Vec::new(),
            },
        }
        .resolve()
    }

    /// The socket address the SV2 server listens on.
    pub fn sv2_listen(&self) -> SocketAddr {
        SocketAddr::new(self.sv2_bind, self.sv2_port)
    }

    /// The configuration as TOML, each line commented with where its value came from.
    pub fn to_annotated_toml(&self, provenance: &Provenance) -> String {
        let path = |p: &Path| toml_string(&p.display().to_string());
        let secs = |d: Duration| d.as_secs().to_string();
        let mut out = String::from("# Effective sv2-tpd configuration\n");
        match &provenance.config_file {
            Some(file) => out.push_str(&format!("# config file: {}\n", file.display())),
            None => out.push_str("# config file: none\n"),
        }
        for key in KEYS {
            let value = match *key {
                "chain" => toml_string(self.chain.as_str()),
                "datadir" => path(&self.datadir),
                "bitcoin_datadir" => path(&self.bitcoin_datadir),
                "ipc_socket" => path(&self.ipc_socket),
                "sv2_bind" => toml_string(&self.sv2_bind.to_string()),
                "sv2_port" => self.sv2_port.to_string(),
                "fee_delta" => self.fee_delta.to_string(),
                "template_interval" => secs(self.template_interval),
                "stale_template_grace" => secs(self.stale_template_grace),
                "tip_first" => self.tip_first.to_string(),
                "max_clients" => self.max_clients.to_string(),
                "metrics_bind" => match self.metrics_bind {
                    Some(addr) => toml_string(&addr.to_string()),
                    None => toml_string("off"),
                },
                "log_level" => toml_string(&self.log_level),
                "log_format" => toml_string(self.log_format.as_str()),
                "authority_key_path" => path(&self.authority_key_path),
                "cert_validity" => secs(self.cert_validity),
                "handshake_timeout" => secs(self.handshake_timeout),
                "max_pending_handshakes" => self.max_pending_handshakes.to_string(),
                "max_clients_per_ip" => self.max_clients_per_ip.to_string(),
                "max_bad_messages" => self.max_bad_messages.to_string(),
                "max_solutions_in_flight_per_client" => {
                    self.max_solutions_in_flight_per_client.to_string()
                }
                "max_bad_solutions" => self.max_bad_solutions.to_string(),
                "max_solutions_in_flight" => self.max_solutions_in_flight.to_string(),
                "max_node_calls" => self.max_node_calls.to_string(),
                "max_tx_data_requests_per_client" => {
                    self.max_tx_data_requests_per_client.to_string()
                }
                "max_tx_data_bytes_in_flight" => self.max_tx_data_bytes_in_flight.to_string(),
                "constraints_interval" => secs(self.constraints_interval),
                "node_call_timeout" => secs(self.node_call_timeout),
                "max_templates_held" => self.max_templates_held.to_string(),
                "max_template_bytes_held" => self.max_template_bytes_held.to_string(),
                _ => continue,
            };
            let source = provenance
                .source(key)
                .map(ToString::to_string)
                .unwrap_or_else(|| Source::Default.to_string());
            let derived = match (*key, provenance.source(key)) {
                ("ipc_socket", Some(Source::Default)) => " (from bitcoin_datadir and chain)",
                ("sv2_port", Some(Source::Default)) => " (for the chain)",
                ("authority_key_path", Some(Source::Default)) => " (in datadir)",
                _ => "",
            };
            out.push_str(&format!("{key:<21} = {value:<32} # {source}{derived}\n"));
        }
        out
    }
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Where a configuration value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The built-in default (possibly derived from other keys).
    Default,
    /// The configuration file at this path.
    File(PathBuf),
    /// This environment variable.
    Env(String),
    /// This command-line flag (with its dashes).
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(path) => write!(f, "file {}", path.display()),
            Source::Env(var) => write!(f, "env {var}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Where each value of a [`Config`] came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Provenance {
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
    sources: Vec<(&'static str, Source)>,
}

impl Provenance {
    /// Where the value of `key` came from.
    pub fn source(&self, key: &str) -> Option<&Source> {
        self.sources
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, source)| source)
    }

    /// Every key with its source, in [`KEYS`] order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Source)> {
        self.sources.iter().map(|(k, s)| (*k, s))
    }
}

/// Why the configuration was rejected. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A key that sv2-tpd does not know.
    #[error("unknown key `{key}` in {from}; allowed keys: {}", KEYS.join(", "))]
    UnknownKey {
        /// The key as written (lower-cased for the environment).
        key: String,
        /// Where it was found.
        from: Source,
    },
    /// A known key with a value that cannot be used.
    #[error("invalid value {value:?} for `{key}` (from {from}): {allowed}")]
    InvalidValue {
        /// The key.
        key: &'static str,
        /// The rejected value.
        value: String,
        /// Where it came from.
        from: Source,
        /// What would have been accepted.
        allowed: String,
    },
    /// The file given with `--config` (or `SV2TPD_CONFIG`) does not exist.
    #[error("config file {} (from --config or SV2TPD_CONFIG) does not exist", path.display())]
    MissingFile {
        /// The path given.
        path: PathBuf,
    },
    /// The configuration file exists but could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    UnreadableFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The file is not valid TOML, or a value has the wrong shape (table, array).
    #[error("{origin}: {message}")]
    Malformed {
        /// `file PATH` or `environment`.
        origin: String,
        /// What the parser said, naming the key where it can.
        message: String,
    },
    /// A path starts with `~` but `HOME` is not set.
    #[error("cannot expand `~` in `{key}` (from {from}): HOME is not set")]
    NoHome {
        /// The key.
        key: &'static str,
        /// Where the value came from.
        from: Source,
    },
}

macro_rules! config_keys {
    ($($key:ident),* $(,)?) => {
        /// Every configuration key, in the order `sv2-tpd config` lists them.
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        /// One source's values, all as text: parsing and checking happen once, after
        /// merging, so every error can name the source of the value that won.
        #[derive(Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Layer {
            $($key: Option<String>,)*
        }

        impl Layer {
            fn into_values(self) -> Vec<(&'static str, String)> {
                let mut values = Vec::new();
                $(if let Some(value) = self.$key {
                    values.push((stringify!($key), value));
                })*
                values
            }
        }
    };
}

config_keys!(
    chain,
    datadir,
    bitcoin_datadir,
    ipc_socket,
    sv2_bind,
    sv2_port,
    fee_delta,
    template_interval,
    stale_template_grace,
    tip_first,
    max_clients,
    metrics_bind,
    log_level,
    log_format,
    authority_key_path,
    cert_validity,
    handshake_timeout,
    max_pending_handshakes,
    max_clients_per_ip,
    max_bad_messages,
    max_solutions_in_flight_per_client,
    max_bad_solutions,
    max_solutions_in_flight,
    max_node_calls,
    max_tx_data_requests_per_client,
    max_tx_data_bytes_in_flight,
    constraints_interval,
    node_call_timeout,
    max_templates_held,
    max_template_bytes_held,
);

/// Command-line flags, one per configuration key plus `--config`.
///
/// Values are taken as text and checked with the other sources, so a bad flag is
/// reported the same way as a bad file entry.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// Configuration file [default: <datadir>/sv2-tpd.toml, if present]
    #[arg(long, global = true, env = CONFIG_ENV_VAR, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Bitcoin network: main, testnet4, signet or regtest [default: main]
    #[arg(long, global = true, value_name = "CHAIN")]
    pub chain: Option<String>,
    /// Data directory for keys and the default config file [default: ~/.sv2-tpd]
    #[arg(long, global = true, value_name = "DIR")]
    pub datadir: Option<String>,
    /// Bitcoin Core's data directory, to find the IPC socket [default: ~/.bitcoin]
    #[arg(long, global = true, value_name = "DIR")]
    pub bitcoin_datadir: Option<String>,
    /// The node's IPC socket [default: <bitcoin-datadir>/<chain>/node.sock]
    #[arg(long, global = true, value_name = "PATH")]
    pub ipc_socket: Option<String>,
    /// Address to serve Stratum V2 on [default: 127.0.0.1]
    #[arg(long, global = true, value_name = "IP")]
    pub sv2_bind: Option<String>,
    /// Port to serve Stratum V2 on [default: 8442, testnet4 48442, signet 38442, regtest 18447]
    #[arg(long, global = true, value_name = "PORT")]
    pub sv2_port: Option<String>,
    /// Fee increase in sats that triggers a new template [default: 1000]
    #[arg(long, global = true, value_name = "SATS")]
    pub fee_delta: Option<String>,
    /// Seconds between checks for a better template [default: 30]
    #[arg(long, global = true, value_name = "SECS")]
    pub template_interval: Option<String>,
    /// Seconds a superseded template still accepts solutions [default: 60]
    #[arg(long, global = true, value_name = "SECS")]
    pub stale_template_grace: Option<String>,
    /// On a new tip, send an empty template first, then the full one: true or false [default: true]
    #[arg(long, global = true, value_name = "BOOL")]
    pub tip_first: Option<String>,
    /// Most SV2 clients served at once [default: 1024]
    #[arg(long, global = true, value_name = "N")]
    pub max_clients: Option<String>,
    /// Metrics HTTP address, or `off` [default: 127.0.0.1:9842]
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_bind: Option<String>,
    /// Log filter: a level or tracing directives; RUST_LOG overrides it [default: info]
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Log format: text or json [default: text]
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<String>,
    /// Authority key file; relative paths are inside datadir [default: authority.key]
    #[arg(long, global = true, value_name = "PATH")]
    pub authority_key_path: Option<String>,
    /// Seconds our certificates stay valid [default: 31536000, one year]
    #[arg(long, global = true, value_name = "SECS")]
    pub cert_validity: Option<String>,
    /// Seconds a client has for Noise, SetupConnection and its first constraints [default: 10]
    #[arg(long, global = true, value_name = "SECS")]
    pub handshake_timeout: Option<String>,
    /// Connections in their setup at once; while full, newcomers wait [default: 64]
    #[arg(long, global = true, value_name = "N")]
    pub max_pending_handshakes: Option<String>,
    /// Connections per non-loopback IP address, or 0 for no limit [default: 0]
    #[arg(long, global = true, value_name = "N")]
    pub max_clients_per_ip: Option<String>,
    /// Unknown or out-of-order messages tolerated per client [default: 16]
    #[arg(long, global = true, value_name = "N")]
    pub max_bad_messages: Option<String>,
    /// Solutions of one client waiting for the node at once [default: 4]
    #[arg(long, global = true, value_name = "N")]
    pub max_solutions_in_flight_per_client: Option<String>,
    /// Solutions missing their target tolerated per client [default: 3]
    #[arg(long, global = true, value_name = "N")]
    pub max_bad_solutions: Option<String>,
    /// Solutions on their way to the node at once, all clients [default: 64]
    #[arg(long, global = true, value_name = "N")]
    pub max_solutions_in_flight: Option<String>,
    /// Node calls clients can cause at once, all together [default: 4]
    #[arg(long, global = true, value_name = "N")]
    pub max_node_calls: Option<String>,
    /// RequestTransactionData of one client answered at once [default: 4]
    #[arg(long, global = true, value_name = "N")]
    pub max_tx_data_requests_per_client: Option<String>,
    /// Bytes of transaction-data answers in flight, all clients [default: 67108864]
    #[arg(long, global = true, value_name = "BYTES")]
    pub max_tx_data_bytes_in_flight: Option<String>,
    /// Least seconds between two applied constraint changes of one client [default: 1]
    #[arg(long, global = true, value_name = "SECS")]
    pub constraints_interval: Option<String>,
    /// Seconds the node has to answer an IPC call that is not a wait [default: 5]
    #[arg(long, global = true, value_name = "SECS")]
    pub node_call_timeout: Option<String>,
    /// Templates held at once, all groups together, at least 33 [default: 128]
    #[arg(long, global = true, value_name = "N")]
    pub max_templates_held: Option<String>,
    /// Bytes of cached template transactions held, all groups [default: 268435456]
    #[arg(long, global = true, value_name = "BYTES")]
    pub max_template_bytes_held: Option<String>,
}

impl ConfigArgs {
    fn values(&self) -> SourcedValues {
        let flags: [(&'static str, &'static str, &Option<String>); 30] = [
            ("chain", "--chain", &self.chain),
            ("datadir", "--datadir", &self.datadir),
            (
                "bitcoin_datadir",
                "--bitcoin-datadir",
                &self.bitcoin_datadir,
            ),
            ("ipc_socket", "--ipc-socket", &self.ipc_socket),
            ("sv2_bind", "--sv2-bind", &self.sv2_bind),
            ("sv2_port", "--sv2-port", &self.sv2_port),
            ("fee_delta", "--fee-delta", &self.fee_delta),
            (
                "template_interval",
                "--template-interval",
                &self.template_interval,
            ),
            (
                "stale_template_grace",
                "--stale-template-grace",
                &self.stale_template_grace,
            ),
            ("tip_first", "--tip-first", &self.tip_first),
            ("max_clients", "--max-clients", &self.max_clients),
            ("metrics_bind", "--metrics-bind", &self.metrics_bind),
            ("log_level", "--log-level", &self.log_level),
            ("log_format", "--log-format", &self.log_format),
            (
                "authority_key_path",
                "--authority-key-path",
                &self.authority_key_path,
            ),
            ("cert_validity", "--cert-validity", &self.cert_validity),
            (
                "handshake_timeout",
                "--handshake-timeout",
                &self.handshake_timeout,
            ),
            (
                "max_pending_handshakes",
                "--max-pending-handshakes",
                &self.max_pending_handshakes,
            ),
            (
                "max_clients_per_ip",
                "--max-clients-per-ip",
                &self.max_clients_per_ip,
            ),
            (
                "max_bad_messages",
                "--max-bad-messages",
                &self.max_bad_messages,
            ),
            (
                "max_solutions_in_flight_per_client",
                "--max-solutions-in-flight-per-client",
                &self.max_solutions_in_flight_per_client,
            ),
            (
                "max_bad_solutions",
                "--max-bad-solutions",
                &self.max_bad_solutions,
            ),
            (
                "max_solutions_in_flight",
                "--max-solutions-in-flight",
                &self.max_solutions_in_flight,
            ),
            ("max_node_calls", "--max-node-calls", &self.max_node_calls),
            (
                "max_tx_data_requests_per_client",
                "--max-tx-data-requests-per-client",
                &self.max_tx_data_requests_per_client,
            ),
            (
                "max_tx_data_bytes_in_flight",
                "--max-tx-data-bytes-in-flight",
                &self.max_tx_data_bytes_in_flight,
            ),
            (
                "constraints_interval",
                "--constraints-interval",
                &self.constraints_interval,
            ),
            (
                "node_call_timeout",
                "--node-call-timeout",
                &self.node_call_timeout,
            ),
            (
                "max_templates_held",
                "--max-templates-held",
                &self.max_templates_held,
            ),
            (
                "max_template_bytes_held",
                "--max-template-bytes-held",
                &self.max_template_bytes_held,
            ),
        ];
        flags
            .into_iter()
            .filter_map(|(key, flag, value)| {
                value
                    .clone()
                    .map(|value| (key, (value, Source::Flag(flag))))
            })
            .collect()
    }
}

/// Raw values of one source, by key, each with where it came from.
type SourcedValues = Vec<(&'static str, (String, Source))>;

/// Reads the `SV2TPD_*` variables (except `SV2TPD_CONFIG`, which clap handles).
fn read_env(
    env: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<SourcedValues, ConfigError> {
    let mut vars = config::Map::new();
    let mut names = BTreeMap::new();
    for (name, value) in env {
        let Some(name) = name.to_str() else { continue };
        let upper = name.to_ascii_uppercase();
        if !upper.starts_with(ENV_PREFIX) || upper == CONFIG_ENV_VAR {
            continue;
        }
        let key = upper[ENV_PREFIX.len()..].to_ascii_lowercase();
        let Some(known) = KEYS.iter().find(|k| **k == key) else {
            return Err(ConfigError::UnknownKey {
                key,
                from: Source::Env(name.to_string()),
            });
        };
        let value = value.into_string().map_err(|_| ConfigError::Malformed {
            origin: format!("env {name}"),
            message: "the value is not valid UTF-8".to_string(),
        })?;
        names.insert(*known, name.to_string());
        vars.insert(name.to_string(), value);
    }
    let layer: Layer = config::Config::builder()
        .add_source(
            config::Environment::with_prefix(ENV_PREFIX.trim_end_matches('_'))
                .prefix_separator("_")
                .ignore_empty(true)
                .source(Some(vars)),
        )
        .build()
        .and_then(config::Config::try_deserialize)
        .map_err(|e| ConfigError::Malformed {
            origin: "environment".to_string(),
            message: e.to_string(),
        })?;
    Ok(layer
        .into_values()
        .into_iter()
        .map(|(key, value)| {
            let var = names
                .get(key)
                .cloned()
                .unwrap_or_else(|| format!("{ENV_PREFIX}{}", key.to_ascii_uppercase()));
            (key, (value, Source::Env(var)))
        })
        .collect())
}

/// Picks the configuration file: the one asked for (which must exist), or the default
/// one in the data directory when it exists.
fn locate_file(
    args: &ConfigArgs,
    env_values: &SourcedValues,
    flag_values: &SourcedValues,
    home: Option<&Path>,
) -> Result<Option<PathBuf>, ConfigError> {
    if let Some(path) = &args.config {
        if !path.exists() {
            return Err(ConfigError::MissingFile { path: path.clone() });
        }
        return Ok(Some(path.clone()));
    }
    let datadir = flag_values
        .iter()
        .chain(env_values)
        .find(|(key, _)| *key == "datadir")
        .map(|(_, (value, source))| expand_home("datadir", value, source, home))
        .unwrap_or_else(|| expand_home("datadir", "~/.sv2-tpd", &Source::Default, home))?;
    let path = datadir.join(CONFIG_FILE_NAME);
    match std::fs::metadata(&path) {
        Ok(_) => Ok(Some(path)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(ConfigError::UnreadableFile { path, error }),
    }
}

fn read_file(path: &Path) -> Result<SourcedValues, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError::UnreadableFile {
        path: path.to_path_buf(),
        error,
    })?;
    let source = Source::File(path.to_path_buf());
    let malformed = |e: config::ConfigError| ConfigError::Malformed {
        origin: source.to_string(),
        message: e.to_string(),
    };
    use config::Source as _;
    let parsed = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .map_err(malformed)?;
    // Named before deserialising so the error says which key and where, rather than
    // serde's generic "unknown field"; `deny_unknown_fields` backs this up.
    let table = parsed.clone().collect().map_err(malformed)?;
    if let Some(key) = table.keys().find(|key| !KEYS.contains(&key.as_str())) {
        return Err(ConfigError::UnknownKey {
            key: key.clone(),
            from: source,
        });
    }
    let layer: Layer = parsed.try_deserialize().map_err(malformed)?;
    Ok(layer
        .into_values()
        .into_iter()
        .map(|(key, value)| (key, (value, source.clone())))
        .collect())
}

fn expand_home(
    key: &'static str,
    value: &str,
    source: &Source,
    home: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    let rest = match value.strip_prefix('~') {
        None => return Ok(PathBuf::from(value)),
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        // `~user/...` is left alone: we only expand our own home.
        Some(_) => return Ok(PathBuf::from(value)),
    };
    let home = home.ok_or_else(|| ConfigError::NoHome {
        key,
        from: source.clone(),
    })?;
    Ok(if rest.is_empty() {
        home.to_path_buf()
    } else {
        home.join(rest)
    })
}

/// Turns the merged text values into a [`Config`], filling in defaults.
struct Resolver<'a> {
    values: BTreeMap<&'static str, (String, Source)>,
    home: Option<&'a Path>,
    provenance: Provenance,
}

impl Resolver<'_> {
    /// Parses `key` if set, else uses `default`, recording the source either way.
    fn get<T>(
        &mut self,
        key: &'static str,
        parse: impl FnOnce(&str) -> Result<T, String>,
        default: impl FnOnce() -> T,
    ) -> Result<T, ConfigError> {
        let Some((value, source)) = self.values.get(key) else {
            self.provenance.sources.push((key, Source::Default));
            return Ok(default());
        };
        let parsed = parse(value.trim()).map_err(|allowed| ConfigError::InvalidValue {
            key,
            value: value.clone(),
            from: source.clone(),
            allowed,
        })?;
        self.provenance.sources.push((key, source.clone()));
        Ok(parsed)
    }

    /// Like [`Resolver::get`] for paths: expands `~`, and joins relative paths to
    /// `base` when given.
    fn path(
        &mut self,
        key: &'static str,
        default: &str,
        base: Option<&Path>,
    ) -> Result<PathBuf, ConfigError> {
        let (value, source) = match self.values.get(key) {
            Some((value, source)) => (value.clone(), source.clone()),
            None => (default.to_string(), Source::Default),
        };
        if value.is_empty() {
            return Err(ConfigError::InvalidValue {
                key,
                value,
                from: source,
                allowed: "expected a path".to_string(),
            });
        }
        let path = expand_home(key, &value, &source, self.home)?;
        self.provenance.sources.push((key, source));
        Ok(match base {
            Some(base) if path.is_relative() => base.join(path),
            _ => path,
        })
    }

    fn resolve(mut self) -> Result<(Config, Provenance), ConfigError> {
        let chain = self.get("chain", |s| s.parse(), || Chain::Main)?;
        let datadir = self.path("datadir", "~/.sv2-tpd", None)?;
        let bitcoin_datadir = self.path("bitcoin_datadir", "~/.bitcoin", None)?;
        let mut default_socket = bitcoin_datadir.clone();
        if let Some(subdir) = chain.bitcoin_subdir() {
            default_socket.push(subdir);
        }
        default_socket.push(NODE_SOCKET_NAME);
        let ipc_socket = self.path("ipc_socket", &default_socket.to_string_lossy(), None)?;
        let sv2_bind = self.get(
            "sv2_bind",
            |s| {
                s.parse::<IpAddr>()
                    .map_err(|_| "expected an IP address such as 127.0.0.1, 0.0.0.0 or ::".into())
            },
            || IpAddr::V4(Ipv4Addr::LOCALHOST),
        )?;
        let sv2_port = self.get(
            "sv2_port",
            |s| {
                s.parse::<u16>()
                    .map_err(|_| "expected a TCP port number, 0 to 65535".into())
            },
            || chain.default_sv2_port(),
        )?;
        let fee_delta = self.get(
            "fee_delta",
            |s| {
                s.parse::<u64>()
                    .map_err(|_| "expected a whole number of satoshis".into())
            },
            || 1000,
        )?;
        let template_interval = self.get("template_interval", seconds(1), || secs(30))?;
        let stale_template_grace = self.get("stale_template_grace", seconds(0), || secs(60))?;
        let tip_first = self.get(
            "tip_first",
            |s| match s {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err("expected true or false".into()),
            },
            || true,
        )?;
        let max_clients = self.get(
            "max_clients",
            |s| match s.parse::<usize>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err("expected a whole number of at least 1".into()),
            },
            || 1024,
        )?;
        let metrics_bind = self.get(
            "metrics_bind",
            |s| match s {
                "off" => Ok(None),
                _ => s.parse::<SocketAddr>().map(Some).map_err(|_| {
                    "expected IP:PORT such as 127.0.0.1:9842 or [::1]:9842, or `off`".into()
                }),
            },
            || Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9842)),
        )?;
        let log_level = self.get(
            "log_level",
            |s| logging::validate_level(s).map(|()| s.to_string()),
            || "info".to_string(),
        )?;
        let log_format = self.get("log_format", |s| s.parse(), LogFormat::default)?;
        let authority_key_path =
            self.path("authority_key_path", AUTHORITY_KEY_FILE, Some(&datadir))?;
        let cert_validity = self.get("cert_validity", seconds(1), || {
            secs(DEFAULT_CERT_VALIDITY_SECS)
        })?;
        let handshake_timeout = self.get("handshake_timeout", seconds(1), || secs(10))?;
        let max_pending_handshakes = self.get("max_pending_handshakes", count(1), || 64)?;
        let max_clients_per_ip = self.get("max_clients_per_ip", count(0), || 0)?;
        let max_bad_messages = self.get(
            "max_bad_messages",
            |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a whole number, 0 to 4294967295".into())
            },
            || 16,
        )?;
        let max_solutions_in_flight_per_client =
            self.get("max_solutions_in_flight_per_client", count(1), || 4)?;
        let max_bad_solutions = self.get(
            "max_bad_solutions",
            |s| {
                s.parse::<u32>()
                    .map_err(|_| "expected a whole number, 0 to 4294967295".into())
            },
            || 3,
        )?;
        let max_solutions_in_flight = self.get("max_solutions_in_flight", count(1), || 64)?;
        let max_node_calls = self.get("max_node_calls", count(1), || 4)?;
        let max_tx_data_requests_per_client =
            self.get("max_tx_data_requests_per_client", count(1), || 4)?;
        let max_tx_data_bytes_in_flight =
            self.get("max_tx_data_bytes_in_flight", count(1), || 64 << 20)?;
        let constraints_interval = self.get("constraints_interval", seconds(0), || secs(1))?;
        let node_call_timeout = self.get("node_call_timeout", seconds(1), || secs(5))?;
        // Every group's current template is kept whatever the budget: room for all of
        // them, so the budget always holds.
        let max_templates_held = self.get(
            "max_templates_held",
            |s| match s.parse::<usize>() {
                Ok(n) if n >= MIN_TEMPLATES_HELD => Ok(n),
                _ => Err(format!(
                    "expected a whole number of at least {MIN_TEMPLATES_HELD} (every \
                     constraint group, up to {} and the standing one, keeps its current \
                     template)",
                    crate::template::MAX_GROUPS
                )),
            },
            || 128,
        )?;
        let max_template_bytes_held =
            self.get("max_template_bytes_held", count(1), || 256 << 20)?;
        let config = Config {
            chain,
            datadir,
            bitcoin_datadir,
            ipc_socket,
            sv2_bind,
            sv2_port,
            fee_delta,
            template_interval,
            stale_template_grace,
            tip_first,
            max_clients,
            metrics_bind,
            log_level,
            log_format,
            authority_key_path,
            cert_validity,
            handshake_timeout,
            max_pending_handshakes,
            max_clients_per_ip,
            max_bad_messages,
            max_solutions_in_flight_per_client,
            max_bad_solutions,
            max_solutions_in_flight,
            max_node_calls,
            max_tx_data_requests_per_client,
            max_tx_data_bytes_in_flight,
            constraints_interval,
            node_call_timeout,
            max_templates_held,
            max_template_bytes_held,
        };
        Ok((config, self.provenance))
    }
}

/// Least `max_templates_held`: the current template of every constraint group.
const MIN_TEMPLATES_HELD: usize = crate::template::MAX_GROUPS + 1;

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// A parser for a count, at least `min`.
fn count(min: usize) -> impl FnOnce(&str) -> Result<usize, String> {
    move |s| match s.parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(format!("expected a whole number of at least {min}")),
    }
}

/// A parser for a whole number of seconds, at least `min`.
fn seconds(min: u64) -> impl FnOnce(&str) -> Result<Duration, String> {
    move |s| match s.parse::<u64>() {
        Ok(n) if n >= min => Ok(secs(n)),
        _ => Err(format!(
            "expected a whole number of seconds, at least {min}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn load(args: &ConfigArgs, vars: &[(&str, &str)]) -> Result<(Config, Provenance), ConfigError> {
        Config::load_from(args, env(vars), Some(Path::new("/home/op")))
    }

    #[test]
    fn defaults_follow_the_chain() {
        let args = ConfigArgs {
            chain: Some("signet".into()),
            ..Default::default()
        };
        let (config, provenance) = load(&args, &[]).unwrap();
        assert_eq!(config.chain, Chain::Signet);
        assert_eq!(config.sv2_port, 38442);
        assert_eq!(
            config.ipc_socket,
            PathBuf::from("/home/op/.bitcoin/signet/node.sock")
        );
        assert_eq!(config.datadir, PathBuf::from("/home/op/.sv2-tpd"));
        assert_eq!(
            config.authority_key_path,
            PathBuf::from("/home/op/.sv2-tpd/authority.key")
        );
        assert_eq!(config.cert_validity, Duration::from_secs(31_536_000));
        assert_eq!(provenance.source("chain"), Some(&Source::Flag("--chain")));
        assert_eq!(provenance.source("sv2_port"), Some(&Source::Default));
        assert_eq!(provenance.iter().count(), KEYS.len());
    }

    #[test]
    fn mainnet_socket_has_no_subdir() {
        let (config, _) = load(&ConfigArgs::default(), &[]).unwrap();
        assert_eq!(
            config.ipc_socket,
            PathBuf::from("/home/op/.bitcoin/node.sock")
        );
        assert_eq!(config.sv2_port, 8442);
        assert_eq!(config.metrics_bind, Some("127.0.0.1:9842".parse().unwrap()));
    }

    #[test]
    fn env_is_below_flags() {
        let args = ConfigArgs {
            sv2_port: Some("1".into()),
            ..Default::default()
        };
        let (config, provenance) = load(
            &args,
            &[("SV2TPD_SV2_PORT", "2"), ("SV2TPD_METRICS_BIND", "off")],
        )
        .unwrap();
        assert_eq!(config.sv2_port, 1);
        assert_eq!(config.metrics_bind, None);
        assert_eq!(
            provenance.source("metrics_bind"),
            Some(&Source::Env("SV2TPD_METRICS_BIND".into()))
        );
    }

    #[test]
    fn bad_values_name_key_and_source() {
        let err = load(&ConfigArgs::default(), &[("SV2TPD_CHAIN", "mainnet")]).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("`chain`"), "{message}");
        assert!(message.contains("env SV2TPD_CHAIN"), "{message}");
        assert!(message.contains("testnet4"), "{message}");

        let err = load(&ConfigArgs::default(), &[("SV2TPD_COLOUR", "blue")]).unwrap_err();
        assert!(matches!(err, ConfigError::UnknownKey { ref key, .. } if key == "colour"));
        assert!(err.to_string().contains("SV2TPD_COLOUR"));

        let args = ConfigArgs {
            template_interval: Some("0".into()),
            ..Default::default()
        };
        let message = load(&args, &[]).unwrap_err().to_string();
        assert!(message.contains("flag --template-interval"), "{message}");
    }

    #[test]
    fn the_template_budget_leaves_room_for_every_group() {
        let (config, _) = load(&ConfigArgs::default(), &[]).unwrap();
        assert_eq!(config.max_templates_held, 128);
        assert_eq!(config.max_template_bytes_held, 256 << 20);
        for (key, value) in [
            ("SV2TPD_MAX_TEMPLATES_HELD", "0"),
            ("SV2TPD_MAX_TEMPLATES_HELD", "32"),
            ("SV2TPD_MAX_TEMPLATE_BYTES_HELD", "0"),
        ] {
            let message = load(&ConfigArgs::default(), &[(key, value)])
                .unwrap_err()
                .to_string();
            assert!(message.contains(key), "{message}");
        }
        let message = load(
            &ConfigArgs::default(),
            &[("SV2TPD_MAX_TEMPLATES_HELD", "32")],
        )
        .unwrap_err()
        .to_string();
        assert!(message.contains("at least 33"), "{message}");
        let (config, _) = load(
            &ConfigArgs::default(),
            &[("SV2TPD_MAX_TEMPLATES_HELD", "33")],
        )
        .unwrap();
        assert_eq!(config.max_templates_held, 33);
    }

    #[test]
    fn missing_home_is_reported_for_tilde_paths() {
        let args = ConfigArgs {
            datadir: Some("/srv/tpd".into()),
            bitcoin_datadir: Some("/srv/bitcoin".into()),
            ..Default::default()
        };
        assert!(Config::load_from(&args, env(&[]), None).is_ok());
        let err = Config::load_from(&ConfigArgs::default(), env(&[]), None).unwrap_err();
        assert!(matches!(err, ConfigError::NoHome { .. }), "{err}");
    }

    #[test]
    fn annotated_output_is_toml() {
        let (config, provenance) = load(&ConfigArgs::default(), &[]).unwrap();
        let text = config.to_annotated_toml(&provenance);
        let table: toml::Table = text.parse().unwrap();
        assert_eq!(table.len(), KEYS.len());
        assert_eq!(table["sv2_port"].as_integer(), Some(8442));
    }

    #[test]
    fn each_source_overrides_the_one_below() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sv2-tpd.toml");
        std::fs::write(
            &file,
            "fee_delta = 2000\ntemplate_interval = 20\nmax_clients = 50\n",
        )
        .unwrap();
        let args = ConfigArgs {
            config: Some(file.clone()),
            max_clients: Some("70".into()),
            ..Default::default()
        };
        let vars = [
            ("SV2TPD_TEMPLATE_INTERVAL", "25"),
            ("SV2TPD_MAX_CLIENTS", "60"),
        ];
        let (config, provenance) = load(&args, &vars).unwrap();
        let cases: [(&str, u64, Source); 4] = [
            ("stale_template_grace", 60, Source::Default),
            ("fee_delta", 2000, Source::File(file.clone())),
            (
                "template_interval",
                25,
                Source::Env("SV2TPD_TEMPLATE_INTERVAL".into()),
            ),
            ("max_clients", 70, Source::Flag("--max-clients")),
        ];
        for (key, value, source) in cases {
            let got = match key {
                "stale_template_grace" => config.stale_template_grace.as_secs(),
                "fee_delta" => config.fee_delta,
                "template_interval" => config.template_interval.as_secs(),
                "max_clients" => config.max_clients as u64,
                _ => unreachable!(),
            };
            assert_eq!(got, value, "{key}");
            assert_eq!(provenance.source(key), Some(&source), "{key}");
        }
    }
}
