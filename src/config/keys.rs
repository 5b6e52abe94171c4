//! Every configuration key, declared once: its name, type, default, parser, section and
//! documentation. [`declare_keys!`] turns the list into the [`Config`] struct, the
//! command-line flags ([`ConfigArgs`]), the loader's resolution, `sv2-tpd config`'s
//! output and the per-key documentation ([`KEY_DOCS`]) that the example files and the
//! README's table are generated from (see [`super::docs`]).
//!
//! A default is text read by the key's own parser. A default that depends on keys
//! declared above it (`ipc_socket`, `sv2_port`) is an expression over their values, with
//! a `derived` description for the documentation.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::values::{self, ConfigValue, NodeList};
use super::{Chain, Provenance, Resolver, Source, SourcedValues, CONFIG_ENV_VAR};
use crate::logging::LogFormat;

/// The groups keys are listed in, in the example files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Section {
    /// The chain, first and on its own.
    Network,
    /// Reaching the node.
    BitcoinCore,
    /// Serving SV2 clients.
    Server,
    /// When templates are made.
    Templates,
    /// The data directory and the authority key.
    Keys,
    /// Metrics and logs.
    Monitoring,
}

impl Section {
    /// Every section, in the order the example files list them.
    pub const ALL: [Section; 6] = [
        Section::Network,
        Section::BitcoinCore,
        Section::Server,
        Section::Templates,
        Section::Keys,
        Section::Monitoring,
    ];

    /// The section's heading in the example files (none for [`Section::Network`]).
    pub fn title(self) -> Option<&'static str> {
        match self {
            Section::Network => None,
            Section::BitcoinCore => Some("Bitcoin Core"),
            Section::Server => Some("Stratum V2 server"),
            Section::Templates => Some("Templates"),
            Section::Keys => Some("Keys"),
            Section::Monitoring => Some("Monitoring"),
        }
    }
}

/// What the documentation says about one key.
#[derive(Clone, Copy, Debug)]
pub struct KeyDoc {
    /// The key, as written in the file.
    pub key: &'static str,
    /// Its flag, with the dashes.
    pub flag: &'static str,
    /// The flag's value placeholder.
    pub value_name: &'static str,
    /// One sentence: the flag's help and the README's meaning.
    pub help: &'static str,
    /// The default as written, or how it is derived from other keys.
    pub default: &'static str,
    /// Whether the default depends on other keys.
    pub derived: bool,
    /// Where the example files list the key.
    pub section: Section,
    /// The example files' comment above the key (`{chain_dir}` is the chain's
    /// sub-directory with a slash, empty on main); empty to share the comment above.
    pub about: &'static str,
}

impl KeyDoc {
    /// The environment variable that sets the key.
    pub fn env_var(&self) -> String {
        format!("{}{}", super::ENV_PREFIX, self.key.to_ascii_uppercase())
    }
}

/// `--` then `key` with dashes for underscores (`N` is the key's length plus 2).
const fn flag_bytes<const N: usize>(key: &str) -> [u8; N] {
    let key = key.as_bytes();
    let mut out = [b'-'; N];
    let mut i = 0;
    while i < key.len() {
        if key[i] != b'_' {
            out[i + 2] = key[i];
        }
        i += 1;
    }
    out
}

/// The flag's help: the sentence and its default.
fn flag_help(help: &str, default: &str) -> String {
    let mut chars = help.chars();
    let first = chars.next().map(|c| c.to_ascii_uppercase());
    format!(
        "{}{} [default: {}]",
        first.into_iter().collect::<String>(),
        chars.as_str(),
        default.replace('`', "")
    )
}

/// The derived description when there is one, else the default's text.
macro_rules! shown_default {
    (($derived:literal) $default:expr) => {
        $derived
    };
    (() $default:expr) => {
        $default
    };
}

/// Whether a key declares a `derived` description.
macro_rules! has_derived {
    ($derived:literal) => {
        true
    };
    () => {
        false
    };
}

macro_rules! declare_keys {
    ($(
        $key:ident: $ty:ty {
            section: $section:ident,
            value_name: $value_name:literal,
            parse: $parse:expr,
            default: $default:expr,
            $(derived: $derived:literal,)?
            help: $help:literal,
            about: $about:literal $(,)?
        }
    ),* $(,)?) => {
        /// Every configuration key, in the order `sv2-tpd config` lists them.
        pub const KEYS: &[&str] = &[$(stringify!($key)),*];

        /// The documentation of every key, in [`KEYS`] order.
        pub const KEY_DOCS: &[KeyDoc] = &[$(KeyDoc {
            key: stringify!($key),
            flag: flags::$key::FLAG,
            value_name: $value_name,
            help: $help,
            default: shown_default!(($($derived)?) $default),
            derived: has_derived!($($derived)?),
            section: Section::$section,
            about: $about,
        }),*];

        mod flags {
            $(pub mod $key {
                const N: usize = stringify!($key).len() + 2;
                const BYTES: [u8; N] = super::super::flag_bytes::<N>(stringify!($key));
                pub const FLAG: &str = match std::str::from_utf8(&BYTES) {
                    Ok(flag) => flag,
                    Err(_) => panic!("keys are ASCII"),
                };
            })*
        }

        /// The effective configuration of the daemon.
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct Config {
            $(#[doc = $help] pub $key: $ty,)*
        }

        /// One source's values, all as text: parsing and checking happen once, after
        /// merging, so every error can name the source of the value that won.
        #[derive(Debug, Default, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub(super) struct Layer {
            $($key: Option<values::LayerText>,)*
        }

        impl Layer {
            /// Each key's text; `Err` names a key given a list that takes one value.
            pub(super) fn into_values(self) -> Result<Vec<(&'static str, String)>, String> {
                let mut values = Vec::new();
                $(if let Some(value) = self.$key {
                    values.push((stringify!($key), value.into_text(stringify!($key))?));
                })*
                Ok(values)
            }
        }

        /// Command-line flags, one per configuration key plus `--config`.
        ///
        /// Values are taken as text and checked with the other sources, so a bad flag is
        /// reported the same way as a bad file entry.
        #[derive(clap::Args, Clone, Debug, Default)]
        pub struct ConfigArgs {
            /// Configuration file [default: <datadir>/sv2-tpd.toml, if present]
            #[arg(long, global = true, env = CONFIG_ENV_VAR, value_name = "PATH")]
            pub config: Option<PathBuf>,
            /// A node to take templates from, as NAME=ENDPOINT (`unix:PATH` or
            /// `tcp:HOST:PORT`); repeat the flag for each node (the `nodes` key)
            #[arg(long = "node", global = true, value_name = "NAME=ENDPOINT")]
            pub node: Vec<String>,
            $(
                #[doc = $help]
                #[arg(
                    long,
                    global = true,
                    value_name = $value_name,
                    help = flag_help($help, shown_default!(($($derived)?) $default)),
                )]
                pub $key: Option<String>,
            )*
        }

        impl ConfigArgs {
            pub(super) fn values(&self) -> SourcedValues {
                let mut values = Vec::new();
                $(if let Some(value) = &self.$key {
                    values.push((stringify!($key), (value.clone(), Source::Flag(flags::$key::FLAG))));
                })*
                if !self.node.is_empty() {
                    values.retain(|(key, _)| *key != "nodes");
                    values.push(("nodes", (self.node.join(","), Source::Flag("--node"))));
                }
                values
            }
        }

        impl Resolver<'_> {
            /// Every key's value, in declaration order so derived defaults can use the
            /// keys above them.
            pub(super) fn resolve(mut self) -> Result<(Config, Provenance), super::ConfigError> {
                $(
                    #[allow(unused_variables)]
                    let $key: $ty = self.get(stringify!($key), $parse, || {
                        ($default).to_string()
                    })?;
                )*
                let mut config = Config { $($key,)* };
                config.authority_key_path = config.datadir.join(&config.authority_key_path);
                super::check_nodes(&config, &self.provenance)?;
                Ok((config, self.provenance))
            }
        }

        impl Config {
            /// Each key's value as text, in [`KEYS`] order.
            pub fn texts(&self) -> Vec<(&'static str, String)> {
                vec![$((stringify!($key), self.$key.to_text()),)*]
            }
        }
    };
}

declare_keys! {
    chain: Chain {
        section: Network,
        value_name: "CHAIN",
        parse: values::chain,
        default: "main",
        help: "Bitcoin network: `main`, `testnet4`, `signet` or `regtest`",
        about: "",
    },
    datadir: PathBuf {
        section: Keys,
        value_name: "DIR",
        parse: values::path,
        default: super::DEFAULT_DATADIR,
        help: "our data directory: keys, the default config file, `solutions/`",
        about: "Our data directory; relative key paths below are inside it.",
    },
    bitcoin_datadir: PathBuf {
        section: BitcoinCore,
        value_name: "DIR",
        parse: values::path,
        default: "~/.bitcoin",
        help: "Bitcoin Core's data directory, to find the IPC socket",
        about: "The node must run `bitcoin-node -ipcbind=unix`{chain_flag}; its socket is
<bitcoin_datadir>/{chain_dir}node.sock. With Bitcoin Core's systemd unit the node's data
directory is /var/lib/bitcoind, so the socket is /var/lib/bitcoind/{chain_dir}node.sock.",
    },
    ipc_socket: PathBuf {
        section: BitcoinCore,
        value_name: "PATH",
        parse: values::path,
        default: bitcoin_datadir.join(chain.bitcoin_subdir().unwrap_or("")).join(super::NODE_SOCKET_NAME).display(),
        derived: "`<bitcoin_datadir>/[<chain>/]node.sock`",
        help: "the node's IPC socket (no sub-directory on main)",
        about: "",
    },
    nodes: NodeList {
        section: BitcoinCore,
        value_name: "NAME=ENDPOINT,...",
        parse: values::nodes,
        default: "none",
        help: "several nodes, each `NAME=unix:PATH` or `NAME=tcp:HOST:PORT` (a tunnel), comma-separated or a list; `--node` once per node; `none`: the one node at `ipc_socket`, named `default`",
        about: "Several nodes behind one Template Provider: each NAME=unix:PATH (the node's
node.sock) or NAME=tcp:HOST:PORT (a tunnel you trust: IPC has no authentication,
never expose it). The best tip any healthy node reports is served, built by the
first node to report it; every found block goes to every healthy node. \"none\":
the one node at ipc_socket. Example: nodes = [\"a=unix:/var/lib/bitcoind/node.sock\",
\"b=tcp:127.0.0.1:8336\"]",
    },
    sv2_bind: IpAddr {
        section: Server,
        value_name: "IP",
        parse: values::ip,
        default: "127.0.0.1",
        help: "address to serve Stratum V2 on",
        about: "Address and port pools (or job declarators) connect to. Listen on 0.0.0.0 or ::
only behind a firewall that admits your pool's servers.",
    },
    sv2_port: u16 {
        section: Server,
        value_name: "PORT",
        parse: values::port,
        default: chain.default_sv2_port(),
        derived: "8442 (testnet4 48442, signet 38442, regtest 18447)",
        help: "port to serve Stratum V2 on",
        about: "",
    },
    fee_delta: u64 {
        section: Templates,
        value_name: "SATS",
        parse: values::sats,
        default: "1000",
        help: "fee rise (sats) worth a new template on the same tip",
        about: "A new template is sent when the fees in the block rise by at least this many
satoshis, checked every template_interval seconds. A new tip always sends one.",
    },
    template_interval: Duration {
        section: Templates,
        value_name: "SECS",
        parse: values::seconds::<1>,
        default: "30",
        help: "least seconds between two fee-driven templates of one group; tips never wait",
        about: "",
    },
    stale_template_grace: Duration {
        section: Templates,
        value_name: "SECS",
        parse: values::seconds::<0>,
        default: "60",
        help: "seconds the previous tip's templates still accept solutions (within `max_templates_held`)",
        about: "Seconds the previous tip's templates still accept solutions, so work in flight
when a new block arrives is not lost (while max_templates_held leaves room for
them). Transaction data is only served for the current tip's templates (older ones
get \"stale-template-id\").",
    },
    tip_first: bool {
        section: Templates,
        value_name: "BOOL",
        parse: values::boolean,
        default: "true",
        help: "on a new tip, send a template without mempool transactions at once and the full one when the node has built it; `false` waits for the full one",
        about: "On a new tip, send a template without mempool transactions at once (the node
builds it without selecting from the mempool, so it is ready in a few
milliseconds however full the mempool is), then the full template as soon as the
node has built it. Miners switch to the new tip sooner; a block found in between
carries no fees. false waits for the full template before anything goes out.",
    },
    max_clients: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<1>,
        default: "1024",
        help: "most set-up SV2 clients served at once (connections in their setup do not count)",
        about: "Most set-up clients (past their first CoinbaseOutputConstraints) served at once;
further connections are refused. Connections still in their setup do not count.",
    },
    metrics_bind: Option<SocketAddr> {
        section: Monitoring,
        value_name: "ADDR",
        parse: values::listen_or_off,
        default: "127.0.0.1:9842",
        help: "`/metrics` and `/health` address, or `off`",
        about: "Prometheus metrics at http://<metrics_bind>/metrics and a health check at
/health. The endpoint has no authentication; \"off\" disables it.",
    },
    log_level: String {
        section: Monitoring,
        value_name: "FILTER",
        parse: values::log_level,
        default: "info",
        help: "level or tracing directives; `RUST_LOG` overrides it",
        about: "A level (error, warn, info, debug, trace) or tracing directives such as
\"sv2_tpd=debug,info\". RUST_LOG, when set, replaces it.",
    },
    log_format: LogFormat {
        section: Monitoring,
        value_name: "FORMAT",
        parse: values::log_format,
        default: "text",
        help: "`text` or `json` (to stderr)",
        about: "\"text\" for people, \"json\" for log collectors (one object per line).",
    },
    authority_key_path: PathBuf {
        section: Keys,
        value_name: "PATH",
        parse: values::path,
        default: super::AUTHORITY_KEY_FILE,
        help: "authority secret key; relative to `datadir`",
        about: "The authority key signs the certificates of our Noise static keys (fresh for every
connection). Pools configure its public half (see `sv2-tpd keys show`). Keep it private.",
    },
    cert_validity: Duration {
        section: Keys,
        value_name: "SECS",
        parse: values::seconds::<1>,
        default: "31536000",
        help: "seconds our Noise certificates stay valid (one year)",
        about: "Seconds each certificate we issue stays valid (default: one year).",
    },
    handshake_timeout: Duration {
        section: Server,
        value_name: "SECS",
        parse: values::seconds::<1>,
        default: "10",
        help: "seconds a client has for its whole setup: Noise, `SetupConnection` and its first `CoinbaseOutputConstraints`, counted once it has a setup place",
        about: "Seconds a client has for its whole setup: the Noise handshake, SetupConnection
and its first CoinbaseOutputConstraints, counted once it has a setup place (see
max_pending_handshakes). A connection that sends nothing for this long is closed.",
    },
    max_pending_handshakes: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<1>,
        default: "64",
        help: "most setups in progress at once (one address at most half of them); more connections wait for a place, 16 per place; beyond that the address with the most waiting loses one",
        about: "Setups in progress (Noise, SetupConnection, first constraints) at once; one
address holds at most half of them. More connections wait for a place in arrival
order, up to 16 per place; a setup in progress is never evicted. When the waiting
list is full, the address with the most waiting connections loses one (a silent
one first), so one address cannot keep the others out.",
    },
    max_clients_per_ip: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<0>,
        default: "0",
        help: "most connections from one IP address; 0 for no limit; loopback is never limited",
        about: "Connections (in setup or set up) from one IP address at once; 0 for no limit.
Loopback addresses are never limited.",
    },
    max_bad_messages: u32 {
        section: Server,
        value_name: "N",
        parse: values::count32,
        default: "16",
        help: "unknown or out-of-order messages tolerated from one client before it is disconnected",
        about: "Unknown, unnegotiated or out-of-order messages tolerated from one client; one
more disconnects it.",
    },
    max_solutions_in_flight_per_client: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<1>,
        default: "4",
        help: "solutions of one client whose verdict is awaited at once; more are still sent to the node, unawaited (`sv2_tpd_solutions_unawaited_total`)",
        about: "Solutions of one client whose verdict is awaited at once; further ones are still
sent to the node, only their verdict is not awaited (sv2_tpd_solutions_unawaited_total).",
    },
    max_bad_solutions: u32 {
        section: Server,
        value_name: "N",
        parse: values::count32,
        default: "3",
        help: "solutions whose header misses its target tolerated from one client before it is disconnected",
        about: "Solutions whose header misses its target (not blocks: never saved nor submitted)
tolerated from one client before it is disconnected.",
    },
    max_solutions_in_flight: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<1>,
        default: "64",
        help: "solutions with valid proof of work on their way to the node at once, all clients together; as many again wait (saved) for a place",
        about: "Solutions with valid proof of work on their way to the node at once, all clients
together; as many again are saved and wait for a place; only beyond that is one
refused (sv2_tpd_solutions_total{result=\"throttled\"}, alerted on).",
    },
    max_node_calls: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<1>,
        default: "4",
        help: "node calls clients can cause at once, all together (a new constraint group's first template, block reads for transaction data); template updates and solutions never wait for them",
        about: "Node calls clients can cause at once, all together: a new constraint group's first
template, block reads for transaction data. Template updates never wait for these.",
    },
    max_tx_data_requests_per_client: usize {
        section: Server,
        value_name: "N",
        parse: values::count::<1>,
        default: "4",
        help: "`RequestTransactionData` of one client answered at once; more get the error `throttled`",
        about: "RequestTransactionData of one client answered at once; more get \"throttled\".",
    },
    max_tx_data_bytes_in_flight: usize {
        section: Server,
        value_name: "BYTES",
        parse: values::count::<1>,
        default: "67108864",
        help: "bytes of transaction-data answers encoded and not yet written, all clients together (64 MiB)",
        about: "Bytes of transaction-data answers encoded and not yet written, all clients (64 MiB).",
    },
    constraints_interval: Duration {
        section: Server,
        value_name: "SECS",
        parse: values::seconds::<0>,
        default: "1",
        help: "least seconds between two applied `CoinbaseOutputConstraints` changes of one client (each message is still answered at once); changes in between are coalesced, the latest winning",
        about: "Least seconds between two applied CoinbaseOutputConstraints changes of one client;
changes in between are coalesced, the latest winning. Every message is answered at
once with the current template pair of the client's group.",
    },
    node_call_timeout: Duration {
        section: BitcoinCore,
        value_name: "SECS",
        parse: values::seconds::<1>,
        default: "5",
        help: "seconds the node has to answer an IPC call that is not a wait; a node that misses it on the periodic probe is reported as not responding",
        about: "Seconds the node has to answer an IPC call that is not a wait (everything but
createNewBlock and waitTipChanged). Submits and block reads are never abandoned:
past the deadline they are reported overdue (sv2_tpd_node_calls_overdue) and
still waited for. The node is also probed every few seconds; one that misses this
deadline is reported as not responding (/health 503, sv2_tpd_node_responsive 0)
until it answers again.",
    },
    max_templates_held: usize {
        section: Templates,
        value_name: "N",
        parse: values::count::<{ crate::template::MAX_GROUPS + 1 }>,
        default: "128",
        help: "templates held at once, all constraint groups together (each one a block the node keeps for us); at least 33",
        about: "Templates held at once, all constraint groups together; each is a block the node
keeps for us. Each group's current template is always kept (hence at least 33: 32
groups and the standing one); beyond the budget, the oldest others go first, the
previous tip's before the current tip's.",
    },
    max_template_bytes_held: usize {
        section: Templates,
        value_name: "BYTES",
        parse: values::count::<1>,
        default: "268435456",
        help: "bytes of cached template transactions held at once, all groups together (a list shared by templates with the same transactions counted once; 256 MiB)",
        about: "Bytes of cached template transactions held at once, all groups together; a list
shared by templates with the same transactions counts once (256 MiB).",
    },
}
