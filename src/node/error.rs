//! Errors from the IPC client, worded for the operator who has to act on them.

use std::path::PathBuf;

/// Why a request to the node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    /// Nothing listens at the socket path.
    #[error(
        "no IPC socket at {path}: start the node as `bitcoin -m node -ipcbind=unix` \
         (Bitcoin Core v31 or later) and check that chain and datadir match"
    )]
    SocketMissing {
        /// The path tried.
        path: PathBuf,
    },
    /// The socket exists but this user may not open it.
    #[error(
        "permission denied on {path}: run sv2-tpd as a user in the node's group \
         (e.g. `usermod -aG bitcoin sv2-tpd`) or relax the socket directory's mode"
    )]
    PermissionDenied {
        /// The path tried.
        path: PathBuf,
    },
    /// The socket could have been put there by someone other than root, the node's user or
    /// this daemon's user (see `socket_check`), so the daemon will not send it anything.
    #[error("refusing the node's IPC socket {path}: {reason}")]
    UntrustedSocket {
        /// The path configured.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Any other failure to open the socket.
    #[error("cannot connect to the node's IPC socket {path}: {reason}")]
    Connect {
        /// The path tried.
        path: PathBuf,
        /// The OS error.
        reason: String,
    },
    /// Nothing answers at a TCP endpoint (the tunnel to the node is down, or points
    /// nowhere).
    #[error("cannot reach the node at tcp:{endpoint}: {reason} (is the tunnel to the node up?)")]
    Unreachable {
        /// The HOST:PORT tried.
        endpoint: String,
        /// The OS error.
        reason: String,
    },
    /// The node is on another chain than the daemon is configured for.
    #[error("the node at {endpoint} is on {found}, not on {expected}: point it at a node of the daemon's chain, or set `chain`")]
    WrongChain {
        /// The node's endpoint.
        endpoint: String,
        /// What the node said (or its socket's directory shows).
        found: String,
        /// The daemon's chain.
        expected: String,
    },
    /// The node speaks an interface line sv2-tpd cannot drive.
    #[error(
        "the node speaks Bitcoin Core's {line} IPC Mining interface, which sv2-tpd does not \
         support yet: upgrade the node to v31 or later"
    )]
    UnsupportedVersion {
        /// The interface line detected (e.g. `v30`).
        line: &'static str,
    },
    /// The node answered null because it is shutting down or the wait was interrupted.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The IPC connection is gone (node stopped, crashed or restarted).
    #[error("lost the IPC connection to the node")]
    Disconnected,
    /// The node did not answer a call that should be quick within the deadline
    /// (`node_call_timeout`): it is hung, or badly overloaded.
    #[error("the node did not answer {method} within {after:?}")]
    Timeout {
        /// The IPC method.
        method: &'static str,
        /// The deadline that passed.
        after: std::time::Duration,
    },
    /// The node does not have this method (an earlier interface line), so it did nothing.
    #[error("the node does not implement {method}")]
    Unimplemented {
        /// The IPC method.
        method: &'static str,
    },
    /// The node refused a call.
    #[error("the node failed {method}: {message}")]
    Call {
        /// The IPC method.
        method: &'static str,
        /// The node's message.
        message: String,
    },
    /// The node's answer could not be decoded.
    #[error("the node sent a malformed {what}: {detail}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// Why it did not decode.
        detail: String,
    },
}

impl NodeError {
    /// Maps a Cap'n Proto error from `method` to a [`NodeError`].
    pub(crate) fn from_capnp(method: &'static str, err: capnp::Error) -> Self {
        match err.kind {
            capnp::ErrorKind::Disconnected => NodeError::Disconnected,
            capnp::ErrorKind::Unimplemented => NodeError::Unimplemented { method },
            _ => NodeError::Call {
                method,
                message: err.extra,
            },
        }
    }

    /// True when the connection is gone and a reconnect is the way forward.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, NodeError::Disconnected)
    }
}

/// True when `err` says the node does not know the method (another interface line).
pub(crate) fn is_unimplemented(err: &capnp::Error) -> bool {
    err.kind == capnp::ErrorKind::Unimplemented
}
