//! `sv2-tpd status`: reads a running daemon's `GET /status` over plain HTTP/1.1.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::status::Status;

/// Largest `/status` answer read (a few hundred bytes per client).
const MAX_RESPONSE_BYTES: u64 = 16 << 20;

/// Why the daemon's status could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing answered, or the exchange failed midway.
    #[error("cannot reach sv2-tpd's metrics endpoint at {addr}: {source}")]
    Unreachable {
        /// The address tried.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// No answer within the time limit.
    #[error("sv2-tpd at {0} did not answer within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// Something answered, but not with a daemon status.
    #[error("{addr} did not answer /status as sv2-tpd does: {reason}")]
    NotAStatus {
        /// The address asked.
        addr: SocketAddr,
        /// What was wrong with the answer.
        reason: String,
    },
}

/// Where to reach a daemon whose metrics listen on `bind`: an unspecified address
/// (`0.0.0.0`, `::`) is asked on the loopback of the same family.
pub fn local_address(bind: SocketAddr) -> SocketAddr {
    match bind.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), bind.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), bind.port())
        }
        _ => bind,
    }
}

/// Asks the daemon at `addr` for its status, within `limit`.
pub async fn fetch(addr: SocketAddr, limit: Duration) -> Result<Status, StatusError> {
    match tokio::time::timeout(limit, exchange(addr)).await {
        Ok(result) => result,
        Err(_) => Err(StatusError::Timeout(addr, limit)),
    }
}

async fn exchange(addr: SocketAddr) -> Result<Status, StatusError> {
    let unreachable = |source| StatusError::Unreachable { addr, source };
    let not_status = |reason: String| StatusError::NotAStatus { addr, reason };
    let mut stream = TcpStream::connect(addr).await.map_err(unreachable)?;
    let request =
        format!("GET /status HTTP/1.1\r\nHost: {addr}\r\nAccept: application/json\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(unreachable)?;
    let mut response = Vec::new();
    stream
        .take(MAX_RESPONSE_BYTES)
        .read_to_end(&mut response)
        .await
        .map_err(unreachable)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| not_status("no HTTP header".into()))?;
    let code = head
        .lines()
        .next()
        .and_then(|status_line| status_line.split_whitespace().nth(1))
        .ok_or_else(|| not_status("no HTTP status line".into()))?;
    // 503 carries the same JSON, with `healthy: false`.
    if code != "200" && code != "503" {
        return Err(not_status(format!("HTTP {code}")));
    }
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:"))
    {
        return Err(not_status("chunked answers are not expected".into()));
    }
    serde_json::from_str(body).map_err(|e| not_status(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_binds_are_asked_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:9842".parse().unwrap();
        assert_eq!(local_address(v4), "127.0.0.1:9842".parse().unwrap());
        let v6: SocketAddr = "[::]:9842".parse().unwrap();
        assert_eq!(local_address(v6), "[::1]:9842".parse().unwrap());
        let exact: SocketAddr = "10.0.0.5:9842".parse().unwrap();
        assert_eq!(local_address(exact), exact);
    }
}
