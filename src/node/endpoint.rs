//! Where a node's IPC interface is reached: its unix socket, or a TCP port that an
//! operator's tunnel (`ssh -L`, `socat` over WireGuard, `stunnel`) forwards to one.
//! Bitcoin Core's IPC has no authentication: a TCP endpoint is only ever a tunnel's
//! local end that the operator trusts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// A node's IPC endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// The node's own unix socket (`unix:PATH`), checked before it is trusted.
    Unix(PathBuf),
    /// A tunnel to a node on another machine (`tcp:HOST:PORT`).
    Tcp(String),
}

impl Endpoint {
    /// The unix socket's path, for a unix endpoint.
    pub fn socket_path(&self) -> Option<&Path> {
        match self {
            Endpoint::Unix(path) => Some(path),
            Endpoint::Tcp(_) => None,
        }
    }
}

impl From<PathBuf> for Endpoint {
    fn from(path: PathBuf) -> Self {
        Endpoint::Unix(path)
    }
}

impl From<&Path> for Endpoint {
    fn from(path: &Path) -> Self {
        Endpoint::Unix(path.to_path_buf())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// `unix:PATH` or `tcp:HOST:PORT` (an IPv6 host in brackets).
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("`unix:` needs the socket's path".into());
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = s.strip_prefix("tcp:") {
            let (host, port) = addr
                .rsplit_once(':')
                .ok_or_else(|| format!("`tcp:{addr}` needs HOST:PORT"))?;
            let port: u16 = port
                .parse()
                .map_err(|_| format!("`{port}` in `tcp:{addr}` is not a port"))?;
            if host.is_empty() || port == 0 {
                return Err(format!("`tcp:{addr}` needs a host and a port above 0"));
            }
            return Ok(Endpoint::Tcp(addr.to_string()));
        }
        Err(format!(
            "`{s}` is not an endpoint: write unix:PATH (the node's node.sock) or \
             tcp:HOST:PORT (a tunnel to it)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_and_print_back() {
        for text in [
            "unix:/var/lib/bitcoind/node.sock",
            "tcp:127.0.0.1:8336",
            "tcp:[::1]:9",
        ] {
            let endpoint: Endpoint = text.parse().expect(text);
            assert_eq!(endpoint.to_string(), text);
        }
        assert_eq!(
            "unix:/a/node.sock"
                .parse::<Endpoint>()
                .map(|e| e.socket_path().map(Path::to_path_buf)),
            Ok(Some(PathBuf::from("/a/node.sock")))
        );
    }

    #[test]
    fn a_node_on_another_chain_is_named() {
        let regtest = ExpectedChain {
            name: "regtest",
            subdir: Some("regtest"),
        };
        let main = ExpectedChain {
            name: "main",
            subdir: None,
        };
        let sock = |p: &str| Endpoint::Unix(PathBuf::from(p));
        let tcp = Endpoint::Tcp("127.0.0.1:9".into());
        assert!(regtest.check(&sock("/d/regtest/node.sock"), true).is_ok());
        assert!(regtest.check(&tcp, true).is_ok());
        assert!(main.check(&sock("/d/node.sock"), false).is_ok());
        assert!(regtest.check(&tcp, false).is_err());
        assert!(main.check(&tcp, true).is_err());
        let error = regtest
            .check(&sock("/d/signet/node.sock"), true)
            .expect_err("a signet socket");
        assert!(error.to_string().contains("signet"), "{error}");
    }

    #[test]
    fn bad_endpoints_say_what_is_wanted() {
        for bad in [
            "/a/node.sock",
            "unix:",
            "tcp:host",
            "tcp:host:x",
            "tcp::80",
            "tcp:h:0",
        ] {
            let error = bad.parse::<Endpoint>().expect_err(bad);
            assert!(
                error.contains("unix:") || error.contains("tcp:"),
                "{bad}: {error}"
            );
        }
    }
}

/// One configured node: the name logs, metrics and `status` know it by, and where it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// The operator's name for it (the `node` label).
    pub name: String,
    /// Where its IPC interface is reached.
    pub endpoint: Endpoint,
}

/// The chain a node must be on, as far as the IPC interface can tell: `isTestChain`
/// separates mainnet from the test chains, and a unix socket's directory
/// (`<datadir>/<chain>/node.sock`) names the test chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpectedChain {
    /// The chain's name, for messages (`main`, `testnet4`, `signet`, `regtest`).
    pub name: &'static str,
    /// The sub-directory Bitcoin Core keeps this chain's files in (none on mainnet).
    pub subdir: Option<&'static str>,
}

/// The sub-directories Bitcoin Core names after its chains.
const CHAIN_SUBDIRS: [&str; 4] = ["testnet3", "testnet4", "signet", "regtest"];

impl ExpectedChain {
    /// Whether the node at `endpoint`, which says it runs a test chain when `is_test`, is
    /// on this chain; `Err` names what it is on instead.
    pub fn check(&self, endpoint: &Endpoint, is_test: bool) -> Result<(), crate::node::NodeError> {
        let wrong = |found: String| crate::node::NodeError::WrongChain {
            endpoint: endpoint.to_string(),
            found,
            expected: self.name.to_string(),
        };
        let main = self.subdir.is_none();
        if main && is_test {
            return Err(wrong("a test chain (isTestChain)".into()));
        }
        if !main && !is_test {
            return Err(wrong("mainnet (isTestChain is false)".into()));
        }
        let dir = endpoint
            .socket_path()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .and_then(|d| d.to_str());
        match dir {
            Some(dir) if CHAIN_SUBDIRS.contains(&dir) && Some(dir) != self.subdir => Err(wrong(
                format!("{dir} (its socket is in a `{dir}` directory)"),
            )),
            _ => Ok(()),
        }
    }
}
