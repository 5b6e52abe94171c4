//! A serial executor: what a node-side `Thread` is. Calls take a place in line when they
//! are dispatched and run one at a time in that order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use futures::channel::oneshot;

#[derive(Default)]
struct QueueState {
    busy: bool,
    waiting: VecDeque<oneshot::Sender<Permit>>,
}

/// FIFO line of calls for one `Thread`.
#[derive(Default)]
pub(crate) struct SerialQueue {
    state: Rc<RefCell<QueueState>>,
}

/// The right to run on the queue's thread; dropping it lets the next call in.
pub(crate) struct Permit {
    queue: Option<Rc<RefCell<QueueState>>>,
}

/// A place in line, taken synchronously so the order is the dispatch order.
pub(crate) enum Ticket {
    Ready(Permit),
    Waiting(oneshot::Receiver<Permit>),
}

impl SerialQueue {
    /// Takes the next place in line.
    pub fn enqueue(&self) -> Ticket {
        let mut state = self.state.borrow_mut();
        if !state.busy {
            state.busy = true;
            return Ticket::Ready(Permit {
                queue: Some(self.state.clone()),
            });
        }
        let (sender, receiver) = oneshot::channel();
        state.waiting.push_back(sender);
        Ticket::Waiting(receiver)
    }
}

impl Ticket {
    /// Waits for this call's turn.
    pub async fn wait(self) -> Result<Permit, capnp::Error> {
        match self {
            Ticket::Ready(permit) => Ok(permit),
            Ticket::Waiting(receiver) => receiver
                .await
                .map_err(|_| capnp::Error::disconnected("mock node: thread went away".into())),
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        loop {
            let next = queue.borrow_mut().waiting.pop_front();
            let Some(sender) = next else {
                queue.borrow_mut().busy = false;
                return;
            };
            let handover = Permit {
                queue: Some(queue.clone()),
            };
            match sender.send(handover) {
                Ok(()) => return,
                // That caller gave up waiting; disarm the returned permit and try the next.
                Err(mut unclaimed) => unclaimed.queue = None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn permits_pass_in_arrival_order_and_skip_abandoned() {
        let queue = SerialQueue::default();
        let first = queue
            .enqueue()
            .wait()
            .now_or_never()
            .expect("free")
            .expect("ok");
        let second = queue.enqueue();
        let abandoned = queue.enqueue();
        let mut third = queue.enqueue().wait().boxed_local();
        drop(abandoned);
        assert!((&mut third).now_or_never().is_none());
        drop(first);
        let second = second
            .wait()
            .now_or_never()
            .expect("handed over")
            .expect("ok");
        assert!((&mut third).now_or_never().is_none());
        drop(second);
        assert!(third.now_or_never().is_some());
        assert!(!queue.state.borrow().busy);
    }
}
