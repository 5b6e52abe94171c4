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
