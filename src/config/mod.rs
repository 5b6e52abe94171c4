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
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub mod docs;
mod keys;
mod values;

use keys::Layer;
pub use keys::{Config, ConfigArgs, KeyDoc, Section, KEYS, KEY_DOCS};
use values::{toml_value, ConfigValue, Parse};

/// The default data directory (the `datadir` key's default).
const DEFAULT_DATADIR: &str = "~/.sv2-tpd";

/// Prefix of the environment variables that set configuration keys.
pub const ENV_PREFIX: &str = "SV2TPD_";
/// Environment variable naming the configuration file (like `--config`).
pub const CONFIG_ENV_VAR: &str = "SV2TPD_CONFIG";
/// Name of the configuration file looked up in the data directory.
pub const CONFIG_FILE_NAME: &str = "sv2-tpd.toml";
/// Default file name of the authority key, inside the data directory.
pub const AUTHORITY_KEY_FILE: &str = "authority.key";
/// The name of the one node at `ipc_socket` when `nodes` lists none.
pub const DEFAULT_NODE_NAME: &str = "default";

/// Name of the node's IPC socket inside its chain data directory.
pub const NODE_SOCKET_NAME: &str = "node.sock";

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

    /// What a node on this chain must look like over IPC.
    pub fn expected(self) -> crate::node::ExpectedChain {
        crate::node::ExpectedChain {
            name: self.as_str(),
            subdir: self.bitcoin_subdir(),
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
                ..Provenance::default()
            },
        }
        .resolve()
    }

    /// The configuration of `chain` with every other key at its default, `~` expanded
    /// to `home`; no file or environment is read.
    pub fn defaults(chain: Chain, home: &Path) -> (Config, Provenance) {
        let values = [("chain", (chain.as_str().to_string(), Source::Default))];
        Resolver {
            values: values.into_iter().collect(),
            home: Some(home),
            provenance: Provenance::default(),
        }
        .resolve()
        .expect("every default is valid")
    }

    /// The nodes to take templates from: those `nodes` lists, or else the one node at
    /// `ipc_socket`, named `default`.
    pub fn node_list(&self) -> Vec<crate::node::NodeSpec> {
        match self.nodes.0.is_empty() {
            true => vec![crate::node::NodeSpec {
                name: DEFAULT_NODE_NAME.to_string(),
                endpoint: crate::node::Endpoint::Unix(self.ipc_socket.clone()),
            }],
            false => self.nodes.0.clone(),
        }
    }

    /// What the operator should hear about keys that take no effect: an `ipc_socket` set
    /// beside a `nodes` list that does not name it.
    pub fn unused_settings(&self, provenance: &Provenance) -> Option<String> {
        let set = !matches!(
            provenance.source("ipc_socket"),
            None | Some(Source::Default)
        );
        let listed = self
            .nodes
            .0
            .iter()
            .any(|n| n.endpoint.socket_path() == Some(self.ipc_socket.as_path()));
        (set && !self.nodes.0.is_empty() && !listed).then(|| {
            format!(
                "ipc_socket {} is not used: `nodes` lists the nodes (add it there)",
                self.ipc_socket.display()
            )
        })
    }

    /// The socket address the SV2 server listens on.
    pub fn sv2_listen(&self) -> SocketAddr {
        SocketAddr::new(self.sv2_bind, self.sv2_port)
    }

    /// The configuration as TOML, each line commented with where its value came from.
    pub fn to_annotated_toml(&self, provenance: &Provenance) -> String {
        let mut out = String::from("# Effective sv2-tpd configuration\n");
        match &provenance.config_file {
            Some(file) => out.push_str(&format!("# config file: {}\n", file.display())),
            None => out.push_str("# config file: none\n"),
        }
        for ((key, text), doc) in self.texts().into_iter().zip(KEY_DOCS) {
            let source = provenance.source(key).unwrap_or(&Source::Default);
            let derived = if doc.derived && *source == Source::Default {
                " (derived from other keys)"
            } else {
                ""
            };
            let value = toml_value(&text);
            out.push_str(&format!("{key:<21} = {value:<32} # {source}{derived}\n"));
        }
        out
    }
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
    /// The text of each default that was used (derived ones as derived).
    defaults: Vec<(&'static str, String)>,
}

impl Provenance {
    /// Where the value of `key` came from.
    pub fn source(&self, key: &str) -> Option<&Source> {
        self.sources
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, source)| source)
    }

    /// The default's text `key` was given, when it came from its default (derived
    /// defaults as derived, `~` unexpanded where it was written).
    pub fn default_text(&self, key: &str) -> Option<&str> {
        self.defaults
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, text)| text.as_str())
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
    let values = layer
        .into_values()
        .map_err(|message| ConfigError::Malformed {
            origin: "environment".to_string(),
            message,
        })?;
    Ok(values
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
        .map(|(_, (value, source))| expand_path("datadir", value, source, home))
        .unwrap_or_else(|| expand_path("datadir", DEFAULT_DATADIR, &Source::Default, home))?;
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
    let values = layer
        .into_values()
        .map_err(|message| ConfigError::Malformed {
            origin: source.to_string(),
            message,
        })?;
    Ok(values
        .into_iter()
        .map(|(key, value)| (key, (value, source.clone())))
        .collect())
}

/// `value` (of `key`, from `source`) as a path with `~` expanded.
fn expand_path(
    key: &'static str,
    value: &str,
    source: &Source,
    home: Option<&Path>,
) -> Result<PathBuf, ConfigError> {
    values::expand_home(PathBuf::from(value), home).ok_or_else(|| ConfigError::NoHome {
        key,
        from: source.clone(),
    })
}

/// Refuses a node list that names one node twice (after `~` and symlinks are resolved,
/// `localhost` read as 127.0.0.1).
fn check_nodes(config: &Config, provenance: &Provenance) -> Result<(), ConfigError> {
    let from = provenance
        .source("nodes")
        .cloned()
        .unwrap_or(Source::Default);
    let invalid = |allowed: String| ConfigError::InvalidValue {
        key: "nodes",
        value: config.nodes.to_text(),
        from: from.clone(),
        allowed,
    };
    if config.nodes.0.is_empty() {
        return Ok(());
    }
    let same_place = |e: &crate::node::Endpoint| match e {
        crate::node::Endpoint::Unix(path) => {
            format!(
                "unix:{}",
                std::fs::canonicalize(path)
                    .unwrap_or(path.clone())
                    .display()
            )
        }
        crate::node::Endpoint::Tcp(addr) => {
            let addr = addr.to_ascii_lowercase();
            let addr = addr
                .strip_prefix("localhost:")
                .map_or(addr.clone(), |port| format!("127.0.0.1:{port}"));
            format!("tcp:{addr}")
        }
    };
    for (i, a) in config.nodes.0.iter().enumerate() {
        for b in &config.nodes.0[..i] {
            if same_place(&a.endpoint) == same_place(&b.endpoint) {
                return Err(invalid(format!(
                    "each node once: `{}` and `{}` are the same node",
                    b.name, a.name
                )));
            }
        }
    }
    Ok(())
}

/// Turns the merged text values into a [`Config`], filling in defaults (the resolution
/// itself, key by key, is generated in [`keys`]).
struct Resolver<'a> {
    values: BTreeMap<&'static str, (String, Source)>,
    home: Option<&'a Path>,
    provenance: Provenance,
}

impl Resolver<'_> {
    /// Parses `key`'s value, or else its default, recording the source either way.
    fn get<T: ConfigValue>(
        &mut self,
        key: &'static str,
        parse: Parse<T>,
        default: impl FnOnce() -> String,
    ) -> Result<T, ConfigError> {
        let (value, source) = match self.values.get(key) {
            Some((value, source)) => (value.clone(), source.clone()),
            None => {
                let text = default();
                self.provenance.defaults.push((key, text.clone()));
                (text, Source::Default)
            }
        };
        let parsed = parse(value.trim()).map_err(|allowed| ConfigError::InvalidValue {
            key,
            value: value.clone(),
            from: source.clone(),
            allowed,
        })?;
        let expanded = parsed
            .expand_home(self.home)
            .ok_or_else(|| ConfigError::NoHome {
                key,
                from: source.clone(),
            })?;
        self.provenance.sources.push((key, source));
        Ok(expanded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn env(vars: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        vars.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn load(args: &ConfigArgs, vars: &[(&str, &str)]) -> Result<(Config, Provenance), ConfigError> {
        Config::load_from(args, env(vars), Some(Path::new("/home/op")))
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
