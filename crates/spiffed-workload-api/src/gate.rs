//! Polling a stream's waits only when they were woken.
//!
//! A response stream's task is polled much more often than its waits are woken: tonic polls the
//! response stream again right after each message (to batch the next one), hyper polls it once
//! more after handing the message to HTTP/2, and on an SDS stream every ACK from the client
//! wakes the same task. Each such poll went all the way down to the stream's wait on the agent
//! (entry feed, bundle watch, SVID watches: about a thousand instructions when nothing moved)
//! and, on an SDS stream, to the client's request stream. In a rotation pushed to 1,000
//! streams (callgrind), the polls of the waits were a sixth of the agent's instructions per SDS
//! stream and a fifth per `FetchX509SVID` stream; gated, the agent runs a tenth fewer.
//!
//! A [`Gate`] gives one future (or stream) a waker of its own, which records that it fired
//! before it wakes the task. The gated future is polled only when its waker fired since it
//! last returned `Pending`, when it last returned `Ready`, or when it is new ([`Gate::open`]).

use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures::task::AtomicWaker;
use futures::{Stream, StreamExt as _};

/// The waker a gated future registers: it marks the gate open and wakes the task that last
/// polled it.
#[derive(Debug)]
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

/// One gated future's waker and whether it fired. Starts open.
#[derive(Debug)]
pub(crate) struct Gate {
    flag: Arc<Flag>,
    waker: Waker,
}

impl Default for Gate {
    fn default() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self {
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl Gate {
    /// The gated future is new: its next poll goes through.
    pub(crate) fn open(&self) {
        self.flag.woken.store(true, Ordering::SeqCst);
    }

    /// Polls the gated future with `poll` if its waker fired since it last returned `Pending`
    /// (or it returned `Ready`, or is new); otherwise `Pending` at once. Either way the task
    /// behind `cx` is woken when the gated future's waker fires.
    pub(crate) fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        // Register before looking at the flag: a wake between the two still reaches the task.
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::SeqCst) {
            return Poll::Pending;
        }
        let out = poll(&mut Context::from_waker(&self.waker));
        if out.is_ready() {
            // Nothing is registered for what comes next: the next poll must go through.
            self.open();
        }
        out
    }

    /// Runs `fut`, a new future, through the gate.
    pub(crate) async fn run<F: Future>(&self, fut: F) -> F::Output {
        let mut fut = pin!(fut);
        self.open();
        poll_fn(|cx| self.poll(cx, |cx| fut.as_mut().poll(cx))).await
    }

    /// The next item of `stream`, which this gate has watched since it was made.
    pub(crate) async fn next<S: Stream + Unpin>(&self, stream: &mut S) -> Option<S::Item> {
        poll_fn(|cx| self.poll(cx, |cx| stream.poll_next_unpin(cx))).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    /// A future that counts its polls and is ready once `ready` is set, waking whatever
    /// waker it was last polled with when `fire` is called.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        ready: AtomicBool,
        waker: std::sync::Mutex<Option<Waker>>,
    }

    impl Probe {
        fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.ready.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn fire(&self) {
            self.ready.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }

        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }
    }

    /// Counts the task's wake-ups.
    #[derive(Default)]
    struct Task(AtomicUsize);

    impl Wake for Task {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn the_gated_future_is_polled_only_when_woken() {
        let gate = Gate::default();
        let probe = Probe::default();
        let task = Arc::new(Task::default());
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);

        // New: polled.
        assert!(gate.poll(&mut cx, |cx| probe.poll(cx)).is_pending());
        assert_eq!(probe.polls(), 1);
        // The task is polled for other reasons: the probe is not.
        for _ in 0..5 {
            assert!(gate.poll(&mut cx, |cx| probe.poll(cx)).is_pending());
        }
        assert_eq!(probe.polls(), 1);
        assert_eq!(task.0.load(Ordering::SeqCst), 0);
        // The probe's waker fires: the task is woken and the next poll reaches the probe.
        probe.fire();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(gate.poll(&mut cx, |cx| probe.poll(cx)).is_ready());
        assert_eq!(probe.polls(), 2);
        // After Ready the next poll goes through (nothing is registered for the next item).
        let _ = gate.poll(&mut cx, |cx| probe.poll(cx));
        assert_eq!(probe.polls(), 3);
    }

    #[test]
    fn a_new_future_is_polled_and_the_task_that_polled_last_is_woken() {
        let gate = Gate::default();
        let probe = Probe::default();
        let waker = Waker::from(Arc::new(Task::default()));
        let mut cx = Context::from_waker(&waker);
        assert!(gate.poll(&mut cx, |cx| probe.poll(cx)).is_pending());
        assert!(gate.poll(&mut cx, |cx| probe.poll(cx)).is_pending());
        assert_eq!(probe.polls(), 1);
        // Replaced by a new future: open lets its first poll through.
        let fresh = Probe::default();
        gate.open();
        assert!(gate.poll(&mut cx, |cx| fresh.poll(cx)).is_pending());
        assert_eq!(fresh.polls(), 1);
        // The gate's waker fires while the task is polled with another waker: that one is
        // woken.
        let other = Arc::new(Task::default());
        let other_waker = Waker::from(other.clone());
        let mut other_cx = Context::from_waker(&other_waker);
        assert!(gate.poll(&mut other_cx, |cx| fresh.poll(cx)).is_pending());
        assert_eq!(fresh.polls(), 1);
        fresh.fire();
        assert_eq!(other.0.load(Ordering::SeqCst), 1);
        assert!(gate.poll(&mut other_cx, |cx| fresh.poll(cx)).is_ready());
    }
}
