//! Worker threads: each runs a single-threaded Tokio runtime with its own listeners
//! (`SO_REUSEPORT`) and its own upstream connection pools, as Envoy's and nginx's workers do,
//! so the request path never contends on a lock shared between cores.

use std::cell::Cell;

thread_local! {
    static WORKER_ID: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The index of the worker running on this thread, or `usize::MAX` off the workers.
pub fn current() -> usize {
    WORKER_ID.with(Cell::get)
}

pub(crate) fn set_current(id: usize) {
    WORKER_ID.with(|w| w.set(id));
}
