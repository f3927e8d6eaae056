//! Session threads for `[runtime] scheduler = "per-thread"`: beside the
//! main thread's current-thread runtime, one more thread per extra worker,
//! each with a current-thread runtime of its own (its own epoll, timers and
//! run queue). Every thread accepts on every plain listener (the kernel
//! wakes the threads waiting in `epoll_wait`; the first to call `accept`
//! gets the client) and runs the sessions it accepted until they end: a
//! session never moves, so a wake-up or a new session never wakes another
//! thread, and nothing is shared between threads on the data path.
//!
//! A hand-over's new process deals the sessions it takes over to the
//! threads in turn. `holdfast_thread_sessions{thread}` counts the sessions
//! on each thread.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

thread_local! {
    /// Which session thread this is, on one.
    static HERE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The session threads and their runtimes.
pub struct Workers {
    /// Every session thread's runtime, the main thread's first.
    handles: Vec<Handle>,
    /// Sessions placed on each thread (`holdfast_thread_sessions`).
    counts: Vec<IntGauge>,
    /// Where the next session taken over in a hand-over goes.
    next: AtomicUsize,
    stop: CancellationToken,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.handles.len())
            .finish_non_exhaustive()
    }
}

/// Where a client just accepted runs.
pub enum Placement<'a> {
    /// On the thread that accepted it.
    Here(Placed),
    /// On another session thread, with fewer sessions.
    There(&'a Handle, Placed),
}

impl Workers {
    /// Makes the calling thread, which runs a current-thread runtime,
    /// session thread 0 and starts `threads - 1` more.
    pub fn start(threads: usize, metrics: &Metrics) -> io::Result<Arc<Workers>> {
        HERE.with(|h| h.set(Some(0)));
        let stop = CancellationToken::new();
        let mut handles = vec![Handle::current()];
        let mut joins = Vec::new();
        for i in 1..threads.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let stopped = stop.clone();
            let join = std::thread::Builder::new()
                .name(format!("holdfast-s{i}"))
                .spawn(move || {
                    HERE.with(|h| h.set(Some(i)));
                    rt.block_on(stopped.cancelled());
                    // Whatever still runs here (nothing, once the proxy
                    // drained or handed its sessions over) is dropped.
                    rt.shutdown_background();
                });
            match join {
                Ok(j) => joins.push(j),
                Err(e) => {
                    stop.cancel();
                    return Err(e);
                }
            }
        }
        let counts = (0..handles.len())
            .map(|i| metrics.thread_sessions(i))
            .collect();
        Ok(Arc::new(Workers {
            handles,
            counts,
            next: AtomicUsize::new(0),
            stop,
            threads: Mutex::new(joins),
        }))
    }

    /// The runtimes of the threads beside the main one.
    pub fn others(&self) -> &[Handle] {
        &self.handles[1..]
    }

    /// Places a client accepted on this thread: here, unless another
    /// thread has fewer sessions (so a burst of clients that one thread
    /// happened to accept is shared out, one session apart at most).
    pub fn place(&self) -> Placement<'_> {
        let here = HERE.with(Cell::get).filter(|&i| i < self.counts.len());
        let Some(here) = here else {
            return Placement::Here(Placed::none());
        };
        let (least, fewest) = self
            .counts
            .iter()
            .map(IntGauge::get)
            .enumerate()
            .min_by_key(|&(_, n)| n)
            .unwrap_or((here, 0));
        if self.counts[here].get() > fewest {
            Placement::There(&self.handles[least], Placed::on(&self.counts[least]))
        } else {
            Placement::Here(Placed::on(&self.counts[here]))
        }
    }

    /// The runtime the next session taken over in a hand-over runs on,
    /// the threads in turn.
    pub fn deal(&self) -> (&Handle, Placed) {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        (&self.handles[i], Placed::on(&self.counts[i]))
    }

    /// Stops the threads beside the main one and waits for them.
    pub fn shut_down(&self) {
        self.stop.cancel();
        let joins = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for j in joins {
            let _ = j.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A session counted on its thread while this lives (it goes with the
/// session's [`super::limits::Slot`]).
#[derive(Debug)]
pub struct Placed(Option<IntGauge>);

impl Placed {
    /// Not counted: there are no session threads.
    pub fn none() -> Placed {
        Placed(None)
    }

    fn on(count: &IntGauge) -> Placed {
        count.inc();
        Placed(Some(count.clone()))
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        if let Some(g) = &self.0 {
            g.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(w: &Workers) -> Vec<i64> {
        w.counts.iter().map(IntGauge::get).collect()
    }

    /// A client stays on the thread that accepted it until that thread
    /// has more sessions than another; then it goes to the least busy one.
    /// Every count goes back down when its session's place is dropped, and
    /// sessions taken over are dealt in turn.
    #[test]
    fn clients_go_to_the_least_busy_thread_and_are_counted_down() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let metrics = Metrics::new();
            let w = Workers::start(3, &metrics).unwrap();
            let mut placed = Vec::new();
            let mut went = Vec::new();
            for _ in 0..6 {
                match w.place() {
                    Placement::Here(p) => {
                        went.push(0);
                        placed.push(p);
                    }
                    Placement::There(rt, p) => {
                        let i = w.handles.iter().position(|h| h.id() == rt.id()).unwrap();
                        went.push(i);
                        placed.push(p);
                    }
                }
            }
            // Accepted on thread 0 every time: here, then away while it
            // has more than another thread.
            assert_eq!(went[0], 0);
            assert!(
                went[1] != 0 && went[2] != 0 && went[1] != went[2],
                "{went:?}"
            );
            assert_eq!(counts(&w), vec![2, 2, 2]);
            placed.truncate(3);
            assert_eq!(counts(&w).iter().sum::<i64>(), 3);
            drop(placed);
            assert_eq!(counts(&w), vec![0, 0, 0]);
            let dealt: Vec<_> = (0..4).map(|_| w.deal()).collect();
            assert_eq!(counts(&w), vec![2, 1, 1]);
            drop(dealt);
            assert_eq!(counts(&w), vec![0, 0, 0]);
            w.shut_down();
        });
    }
}
