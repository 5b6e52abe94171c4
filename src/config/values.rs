//! The value types of configuration keys: how each is read from text (with what a
//! rejected value should have looked like) and written back as text.
//!
//! Every value, defaults included, goes through the same parser, so a default is always
//! a value a user could have written, and `sv2-tpd config` prints what would be read back.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::Chain;
use crate::logging::{self, LogFormat};

/// A configuration value as text: the form files, the environment and flags use.
pub trait ConfigValue: Sized {
    /// The value as it would be written in the file (without TOML quoting).
    fn to_text(&self) -> String;

    /// The value with `~` expanded to `home` where it is a path; `None` when `~` needs
    /// a home and there is none.
    fn expand_home(self, _home: Option<&Path>) -> Option<Self> {
        Some(self)
    }
}

macro_rules! displayed {
    ($($ty:ty),*) => {$(
        impl ConfigValue for $ty {
            fn to_text(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
displayed!(Chain, IpAddr, u16, u32, u64, usize, bool, String, LogFormat);

impl ConfigValue for PathBuf {
    fn to_text(&self) -> String {
        self.display().to_string()
    }

    fn expand_home(self, home: Option<&Path>) -> Option<Self> {
        expand_home(self, home)
    }
}

/// `path` with a leading `~` (alone or before `/`) replaced by `home`; `~user/...` is
/// left alone: we only expand our own home.
pub fn expand_home(path: PathBuf, home: Option<&Path>) -> Option<PathBuf> {
    let Some(text) = path.to_str() else {
        return Some(path);
    };
    let rest = match text.strip_prefix('~') {
        Some(rest) if rest.is_empty() || rest.starts_with('/') => rest.trim_start_matches('/'),
        _ => return Some(path),
    };
    let home = home?;
    Some(if rest.is_empty() {
        home.to_path_buf()
    } else {
        home.join(rest)
    })
}

impl ConfigValue for Duration {
    fn to_text(&self) -> String {
        self.as_secs().to_string()
    }
}

impl ConfigValue for Option<SocketAddr> {
    fn to_text(&self) -> String {
        match self {
            Some(addr) => addr.to_string(),
            None => "off".to_string(),
        }
    }
}

/// `text` as a TOML value: numbers and booleans bare, everything else a string.
pub fn toml_value(text: &str) -> String {
    let bare = text.parse::<i64>().is_ok() || text == "true" || text == "false";
    if bare {
        text.to_string()
    } else {
        toml::Value::String(text.to_string()).to_string()
    }
}

/// A parser for one key's text; `Err` says what would have been accepted.
pub type Parse<T> = fn(&str) -> Result<T, String>;

/// `main`, `testnet4`, `signet` or `regtest`.
pub fn chain(s: &str) -> Result<Chain, String> {
    s.parse()
}

/// A non-empty path, `~` still unexpanded (the loader expands it).
pub fn path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("expected a path".to_string());
    }
    Ok(PathBuf::from(s))
}

/// An IP address.
pub fn ip(s: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| "expected an IP address such as 127.0.0.1, 0.0.0.0 or ::".into())
}

/// A TCP port.
pub fn port(s: &str) -> Result<u16, String> {
    s.parse()
        .map_err(|_| "expected a TCP port number, 0 to 65535".into())
}

/// An amount of satoshis.
pub fn sats(s: &str) -> Result<u64, String> {
    s.parse()
        .map_err(|_| "expected a whole number of satoshis".into())
}

/// `true` or `false`.
pub fn boolean(s: &str) -> Result<bool, String> {
    match s {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err("expected true or false".into()),
    }
}

/// A 32-bit count, 0 allowed.
pub fn count32(s: &str) -> Result<u32, String> {
    s.parse()
        .map_err(|_| "expected a whole number, 0 to 4294967295".into())
}

/// `IP:PORT`, or `off`.
pub fn listen_or_off(s: &str) -> Result<Option<SocketAddr>, String> {
    match s {
        "off" => Ok(None),
        _ => s
            .parse()
            .map(Some)
            .map_err(|_| "expected IP:PORT such as 127.0.0.1:9842 or [::1]:9842, or `off`".into()),
    }
}

/// A `tracing` filter: a level or directives.
pub fn log_level(s: &str) -> Result<String, String> {
    logging::validate_level(s).map(|()| s.to_string())
}

/// `text` or `json`.
pub fn log_format(s: &str) -> Result<LogFormat, String> {
    s.parse()
}

/// A count of at least `MIN`.
pub fn count<const MIN: usize>(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= MIN => Ok(n),
        _ => Err(format!("expected a whole number of at least {MIN}")),
    }
}

/// A whole number of seconds, at least `MIN`.
pub fn seconds<const MIN: u64>(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(n) if n >= MIN => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "expected a whole number of seconds, at least {MIN}"
        )),
    }
}

/// One key's value in a file or the environment: text (numbers and booleans as written),
/// or — for the keys that take several values — a list of texts.
#[derive(Debug)]
pub struct LayerText {
    text: String,
    list: bool,
}

/// The keys whose value may be a TOML list (read as its items, comma-separated).
const LIST_KEYS: [&str; 1] = ["nodes"];

impl LayerText {
    /// The value as one text; `Err` when `key` takes one value and was given a list.
    pub fn into_text(self, key: &str) -> Result<String, String> {
        match self.list && !LIST_KEYS.contains(&key) {
            true => Err(format!("`{key}` takes one value, not a list")),
            false => Ok(self.text),
        }
    }
}

impl<'de> serde::Deserialize<'de> for LayerText {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = LayerText;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string, a number, a boolean or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<LayerText, E> {
                Ok(LayerText {
                    text: v.to_string(),
                    list: false,
                })
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<LayerText, E> {
                Ok(LayerText {
                    text: v,
                    list: false,
                })
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<LayerText, E> {
                self.visit_string(v.to_string())
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<LayerText, E> {
                self.visit_string(v.to_string())
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<LayerText, E> {
                self.visit_string(v.to_string())
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<LayerText, E> {
                self.visit_string(v.to_string())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<LayerText, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    items.push(item);
                }
                Ok(LayerText {
                    text: items.join(","),
                    list: true,
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// The `nodes` key: the nodes templates come from, in the order given (the first is
/// preferred where the daemon has a choice); empty for the one node at `ipc_socket`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeList(pub Vec<crate::node::NodeSpec>);

impl ConfigValue for NodeList {
    fn to_text(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        let items: Vec<String> = self
            .0
            .iter()
            .map(|n| format!("{}={}", n.name, n.endpoint))
            .collect();
        items.join(",")
    }

    fn expand_home(self, home: Option<&Path>) -> Option<Self> {
        let mut nodes = Vec::with_capacity(self.0.len());
        for mut node in self.0 {
            if let crate::node::Endpoint::Unix(path) = node.endpoint {
                node.endpoint = crate::node::Endpoint::Unix(expand_home(path, home)?);
            }
            nodes.push(node);
        }
        Some(NodeList(nodes))
    }
}

/// Longest node name (it is a metric label and a log field).
const MAX_NODE_NAME: usize = 32;

/// `NAME=ENDPOINT` entries, comma-separated; names unique, of letters, digits, `-`, `_`;
/// `none` (or nothing) for the one node at `ipc_socket`.
pub fn nodes(s: &str) -> Result<NodeList, String> {
    let mut nodes: Vec<crate::node::NodeSpec> = Vec::new();
    if s.trim() == "none" {
        return Ok(NodeList(nodes));
    }
    for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, endpoint) = entry.split_once('=').ok_or_else(|| {
            format!("`{entry}` is not NAME=ENDPOINT (e.g. a=unix:/var/lib/bitcoind/node.sock)")
        })?;
        let name = name.trim();
        let good_name = !name.is_empty()
            && name.len() <= MAX_NODE_NAME
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !good_name {
            return Err(format!(
                "node name `{name}`: use 1 to {MAX_NODE_NAME} letters, digits, `-` or `_`"
            ));
        }
        if nodes.iter().any(|n| n.name == name) {
            return Err(format!("node name `{name}` is given twice"));
        }
        let endpoint = endpoint.trim().parse()?;
        if nodes.iter().any(|n| n.endpoint == endpoint) {
            return Err(format!("nodes `{name}` and another both use {endpoint}"));
        }
        nodes.push(crate::node::NodeSpec {
            name: name.to_string(),
            endpoint,
        });
    }
    Ok(NodeList(nodes))
}
