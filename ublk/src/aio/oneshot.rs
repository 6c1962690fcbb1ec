//! A completion that another thread fulfils: the way out of the queue's
//! ring for work done elsewhere (a thread pool, another runtime).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

struct Shared<T> {
    value: Option<T>,
    waker: Option<Waker>,
    /// The completer is gone (fulfilled or dropped).
    closed: bool,
}

/// The receiving half: a future that resolves to the value, or to `None`
/// if the [`Completer`] was dropped without one.
pub struct Completion<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

/// The sending half: `Send`, fulfilled from any thread, once.
pub struct Completer<T> {
    shared: Arc<Mutex<Shared<T>>>,
}

/// A (completer, completion) pair. The completion, awaited in a request's
/// future, parks the queue until the completer (moved to another thread) is
/// fulfilled; the queue is then woken through its eventfd.
pub fn completion<T: Send>() -> (Completer<T>, Completion<T>) {
    let shared = Arc::new(Mutex::new(Shared { value: None, waker: None, closed: false }));
    (Completer { shared: shared.clone() }, Completion { shared })
}

impl<T> Completer<T> {
    /// Fulfils the completion with `value`, waking the queue.
    pub fn complete(self, value: T) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).value = Some(value);
        // Drop wakes.
    }
}

impl<T> Drop for Completer<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Future for Completion<T> {
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = s.value.take() {
            return Poll::Ready(Some(v));
        }
        if s.closed {
            return Poll::Ready(None);
        }
        if !s.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            s.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl<T> std::fmt::Debug for Completion<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completion")
    }
}

impl<T> std::fmt::Debug for Completer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Completer")
    }
}
