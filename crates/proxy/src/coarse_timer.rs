//! The timer behind the HTTP/1.1 request-header timeout (slowloris protection).
//!
//! hyper arms a new timer each time a connection starts waiting for a request head, and drops
//! it once the head is read: one timer per request. Through tokio's timer wheel that cost about
//! 1.1k instructions per request, and a quarter of the requests at a moderate rate also wrote
//! to the runtime's eventfd (tokio wakes its own driver whenever a new timer is due before the
//! one it last parked for), which then cost an extra `epoll_wait` round. A timeout of tens of
//! seconds needs none of that precision: here each thread keeps the pending deadlines in a
//! table, and one task per thread checks them every [`TICK`] while any are pending. A timeout
//! fires between its deadline and one tick later.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often pending deadlines are checked, and so how late a timeout may fire.
pub const TICK: Duration = Duration::from_millis(500);

/// A [`hyper::rt::Timer`] for long timeouts, with [`TICK`] resolution.
#[derive(Clone, Copy, Debug, Default)]
pub struct CoarseTimer;

impl hyper::rt::Timer for CoarseTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(CoarseSleep { deadline, slot: None })
    }
}

/// The pending deadlines of one thread.
#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    pending: usize,
    /// A ticker task is running for this table.
    ticking: bool,
}

#[derive(Default)]
struct Slot {
    /// `None` while the slot is free.
    deadline: Option<Instant>,
    fired: bool,
    waker: Option<Waker>,
}

type SharedTable = Arc<Mutex<Table>>;

thread_local! {
    static TABLE: SharedTable = SharedTable::default();
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // A panic elsewhere while the lock was held leaves plain data behind; keep using it.
    table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A sleep registered in its thread's table on first poll.
struct CoarseSleep {
    deadline: Instant,
    /// The table it is registered in (its own, should it be polled on another thread) and
    /// its slot there.
    slot: Option<(SharedTable, usize)>,
}

impl Future for CoarseSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some((table, index)) = &this.slot {
            let mut table = lock(table);
            let slot = &mut table.slots[*index];
            if slot.fired {
                return Poll::Ready(());
            }
            if !slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                slot.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let Ok(table) = TABLE.try_with(Arc::clone) else {
            // The thread is exiting: nothing would ever check the deadline, so end now.
            return Poll::Ready(());
        };
        let (index, start_ticker) = {
            let mut t = lock(&table);
            let slot = Slot {
                deadline: Some(this.deadline),
                fired: false,
                waker: Some(cx.waker().clone()),
            };
            let index = match t.free.pop() {
                Some(i) => {
                    t.slots[i] = slot;
                    i
                }
                None => {
                    t.slots.push(slot);
                    t.slots.len() - 1
                }
            };
            t.pending += 1;
            let start_ticker = !t.ticking;
            t.ticking = true;
            (index, start_ticker)
        };
        if start_ticker {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => {
                    runtime.spawn(tick(table.clone()));
                }
                // Outside a runtime nothing can drive the table; the next sleep tries again.
                Err(_) => lock(&table).ticking = false,
            }
        }
        this.slot = Some((table, index));
        Poll::Pending
    }
}

impl hyper::rt::Sleep for CoarseSleep {}

impl Drop for CoarseSleep {
    fn drop(&mut self) {
        if let Some((table, index)) = self.slot.take() {
            let waker = {
                let mut t = lock(&table);
                let slot = std::mem::take(&mut t.slots[index]);
                t.free.push(index);
                if !slot.fired {
                    t.pending -= 1;
                }
                slot.waker
            };
            drop(waker);
        }
    }
}

/// Clears `ticking` if the ticker is dropped before it ends (a runtime shutting down), so the
/// next sleep starts a new one.
struct Ticking {
    table: SharedTable,
    finished: bool,
}

impl Drop for Ticking {
    fn drop(&mut self) {
        if !self.finished {
            lock(&self.table).ticking = false;
        }
    }
}

/// Wakes the sleeps whose deadline passed, every [`TICK`], until none are pending.
async fn tick(table: SharedTable) {
    let mut ticking = Ticking { table, finished: false };
    let mut due = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        {
            let mut t = lock(&ticking.table);
            let mut fired = 0;
            for slot in t.slots.iter_mut() {
                if !slot.fired && slot.deadline.is_some_and(|d| d <= now) {
                    slot.fired = true;
                    fired += 1;
                    due.extend(slot.waker.take());
                }
            }
            t.pending -= fired;
            if t.pending == 0 && due.is_empty() {
                // Ends under the lock, so a sleep registered from now on starts a new ticker.
                t.ticking = false;
                drop(t);
                ticking.finished = true;
                return;
            }
        }
        for waker in due.drain(..) {
            waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Timer;

    #[tokio::test(flavor = "current_thread")]
    async fn fires_after_its_deadline_within_a_tick() {
        let started = Instant::now();
        CoarseTimer.sleep(Duration::from_millis(300)).await;
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(
            waited < Duration::from_millis(300) + TICK + Duration::from_millis(200),
            "{waited:?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_later_deadline_does_not_fire_early_and_dropped_sleeps_free_their_slot() {
        let started = Instant::now();
        // Registered, then dropped before its deadline: it must neither fire nor leak.
        let mut dropped = CoarseTimer.sleep(Duration::from_millis(100));
        assert!(futures_poll_once(&mut dropped).await.is_pending());
        drop(dropped);
        let long = CoarseTimer.sleep(Duration::from_millis(1200));
        tokio::time::timeout(Duration::from_millis(900), long)
            .await
            .expect_err("a 1.2 s sleep must not end within 0.9 s");
        CoarseTimer.sleep(Duration::from_millis(100)).await;
        assert!(started.elapsed() >= Duration::from_millis(1000));
        TABLE.with(|t| {
            let t = lock(t);
            assert_eq!(t.pending, 0);
            assert_eq!(t.free.len(), t.slots.len(), "every slot is free again");
        });
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_ticker_stops_when_nothing_is_pending_and_restarts() {
        CoarseTimer.sleep(Duration::from_millis(50)).await;
        // The ticker notices the table is empty on its next tick, then ends.
        tokio::time::sleep(TICK * 2).await;
        TABLE.with(|t| assert!(!lock(t).ticking, "no ticker runs for an empty table"));
        let started = Instant::now();
        CoarseTimer.sleep(Duration::from_millis(50)).await;
        assert!(started.elapsed() < TICK * 3);
    }

    /// Polls a future once, returning whether it finished.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut f).poll(cx))).await
    }
}
