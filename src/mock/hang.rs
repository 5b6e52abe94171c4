//! The "hang" fault: a node that stops answering, as under `kill -STOP`, a stalled disk or
//! a wedged lock. Every connection's socket is frozen in both directions (nothing is read,
//! nothing is written) until the fault is lifted; new connections are accepted, as the
//! kernel would, and freeze the same way.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

/// Whether the node is hung, and who is waiting for it to answer again.
#[derive(Debug, Default)]
pub(crate) struct HangSwitch {
    hung: AtomicBool,
    waiting: Mutex<Vec<Waker>>,
}

impl HangSwitch {
    /// Freezes (`true`) or thaws every connection.
    pub(crate) fn set(&self, hung: bool) {
        self.hung.store(hung, Ordering::SeqCst);
        if !hung {
            let waiting = std::mem::take(&mut *self.lock());
            for waker in waiting {
                waker.wake();
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Waker>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ready while not hung; otherwise registers `cx` to be woken when thawed.
    fn poll_thawed(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.hung.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        let mut waiting = self.lock();
        if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
            waiting.push(cx.waker().clone());
        }
        // Thawed between the check and the registration: do not sleep forever.
        if self.hung.load(Ordering::SeqCst) {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }
}

/// A socket half that stops moving bytes while its [`HangSwitch`] is on.
pub(crate) struct Freezable<S> {
    inner: S,
    switch: Arc<HangSwitch>,
}

impl<S> Freezable<S> {
    pub(crate) fn new(inner: S, switch: Arc<HangSwitch>) -> Self {
        Self { inner, switch }
    }
}

impl<S: futures::AsyncRead + Unpin> futures::AsyncRead for Freezable<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.switch.poll_thawed(cx));
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: futures::AsyncWrite + Unpin> futures::AsyncWrite for Freezable<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.switch.poll_thawed(cx));
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.switch.poll_thawed(cx));
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
