//! The mock's server thread: a current-thread tokio runtime with a `LocalSet` (capnp-rpc is
//! `!Send`) accepting unix-socket connections, one `RpcSystem` each.

use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, LocalSet};

use super::server::{serve_connection, ServerCtx};
use super::{MockError, Shared};

/// How long `stop` lets pending waits send their null replies before closing connections.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(20);
/// How long the handle waits for the server thread to confirm dropped connections.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

enum Command {
    DropConnections(std::sync::mpsc::Sender<()>),
    Stop,
}

/// Control of one server thread.
pub(crate) struct ServerHandle {
    commands: mpsc::UnboundedSender<Command>,
    thread: std::thread::JoinHandle<()>,
}

/// Binds `socket_path` (replacing a stale socket file) and starts the server thread.
pub(crate) fn spawn(socket_path: &Path, shared: Arc<Shared>) -> Result<ServerHandle, MockError> {
    let bind_error = |source| MockError::Bind {
        path: socket_path.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(socket_path) {
        use std::os::unix::fs::FileTypeExt;
        if meta.file_type().is_socket() {
            std::fs::remove_file(socket_path).map_err(bind_error)?;
        }
    }
    let listener = std::os::unix::net::UnixListener::bind(socket_path).map_err(bind_error)?;
    listener.set_nonblocking(true).map_err(bind_error)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(MockError::Spawn)?;
    let (commands, receiver) = mpsc::unbounded_channel();
    let thread = std::thread::Builder::new()
        .name("mock-bitcoin-node".into())
        .spawn(move || {
            let local = LocalSet::new();
            local.block_on(&runtime, serve(listener, shared, receiver));
        })
        .map_err(MockError::Spawn)?;
    Ok(ServerHandle { commands, thread })
}

impl ServerHandle {
    /// Closes every client connection and waits until they are gone.
    pub fn drop_connections(&self) {
        let (ack, acked) = std::sync::mpsc::channel();
        if self.commands.send(Command::DropConnections(ack)).is_ok() {
            let _ = acked.recv_timeout(COMMAND_TIMEOUT);
        }
    }

    /// Stops the server thread and waits for it to end.
    pub fn stop(self) {
        let _ = self.commands.send(Command::Stop);
        if self.thread.join().is_err() {
            tracing::error!("mock node: server thread panicked");
        }
    }
}

async fn serve(
    listener: std::os::unix::net::UnixListener,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let listener = match UnixListener::from_std(listener) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!("mock node: cannot register the listener: {e}");
            return;
        }
    };
    let ctx = Rc::new(ServerCtx::new(shared));
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.retain(|c| !c.is_finished());
                    connections.push(tokio::task::spawn_local(serve_connection(stream, ctx.clone())));
                }
                Err(e) => tracing::warn!("mock node: accept failed: {e}"),
            },
            command = commands.recv() => match command {
                Some(Command::DropConnections(ack)) => {
                    close_all(&mut connections).await;
                    let _ = ack.send(());
                }
                Some(Command::Stop) | None => break,
            },
        }
    }
    drop(listener);
    tokio::time::sleep(SHUTDOWN_GRACE).await;
    close_all(&mut connections).await;
}

async fn close_all(connections: &mut Vec<JoinHandle<()>>) {
    for connection in connections.iter() {
        connection.abort();
    }
    for connection in connections.drain(..) {
        // Resolves once the task, and with it the socket and its RpcSystem, is dropped.
        let _ = connection.await;
    }
}
