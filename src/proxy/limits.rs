//! Admission limits checked by the accept loop before a session starts:
//! `[limits] max_sessions`, a listener's `max_sessions` and
//! `max_sessions_per_client`, and the file-descriptor reserve
//! (`[limits] fd_reserve`). A client over a limit is accepted and closed at
//! once; it is counted, and warned about once per burst.
//!
//! It owns the counters and the [`Slot`] guard that gives a session's place
//! back when the session ends; it does not own sockets or sessions
//! (`proxy`), nor `max_held_sessions` (the backend and the session driver).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{REJECT_FD_RESERVE, REJECT_MAX_SESSIONS, REJECT_PER_CLIENT};

/// How often the open descriptors are counted (`/proc/self/fd`) at most,
/// while the estimate says there is no room.
const FD_COUNT_INTERVAL: Duration = Duration::from_millis(100);
/// How old a count may get while the estimate says there is room: a count
/// reads one directory entry per open descriptor (milliseconds with tens of
/// thousands open, on the accept path), so a process far from its limit
/// counts once a second, not ten times.
const FD_COUNT_MAX_AGE: Duration = Duration::from_secs(1);
/// Descriptors a session is assumed to take between two counts: its client
/// and its server connection.
const FDS_PER_SESSION: usize = 2;

/// Why a client was refused: the `reason` label of
/// `holdfast_client_connections_rejected_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `[limits] max_sessions` or the listener's `max_sessions`.
    MaxSessions,
    /// The listener's `max_sessions_per_client`.
    PerClient,
    /// Within `fd_reserve` descriptors of `RLIMIT_NOFILE`.
    FdReserve,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxSessions => REJECT_MAX_SESSIONS,
            Refusal::PerClient => REJECT_PER_CLIENT,
            Refusal::FdReserve => REJECT_FD_RESERVE,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One listener's open sessions, in total and by client IP address. Kept
/// across reloads (the listener's socket is kept, so are its counts).
#[derive(Debug, Default)]
pub struct ListenerLimits {
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
    /// Per [`Refusal`]: a refusal was warned about and no client was
    /// admitted since (one warning per burst, not per client).
    warned: [AtomicBool; 3],
}

impl ListenerLimits {
    /// Sessions of this listener now open.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether `refusal` should be logged: the first of a burst only.
    pub fn first_of_burst(&self, refusal: Refusal) -> bool {
        !self.warned[refusal.index()].swap(true, Ordering::Relaxed)
    }

    fn admitted(&self) {
        for w in &self.warned {
            w.store(false, Ordering::Relaxed);
        }
    }
}

/// The process's descriptor budget: `RLIMIT_NOFILE` (read once at start)
/// minus what is open, which is counted from `/proc/self/fd` and estimated
/// in between (2 per session admitted since): counted again once the count
/// is [`FD_COUNT_MAX_AGE`] old, or [`FD_COUNT_INTERVAL`] old when the
/// estimate finds no room.
#[derive(Debug)]
pub struct FdBudget {
    /// The soft `RLIMIT_NOFILE`; `None` (unlimited or unknown) turns the
    /// reserve off.
    limit: Option<usize>,
    /// `[limits] fd_reserve` (a reload may change it); 0 is off.
    reserve: AtomicUsize,
    count: Mutex<FdCount>,
}

#[derive(Debug, Default)]
struct FdCount {
    at: Option<Instant>,
    /// Descriptors open at `at`.
    open: usize,
    /// Sessions admitted since `at`.
    admitted: usize,
}

impl FdBudget {
    pub fn new(limit: Option<u64>, reserve: usize) -> FdBudget {
        FdBudget {
            limit: limit.map(|l| usize::try_from(l).unwrap_or(usize::MAX)),
            reserve: AtomicUsize::new(reserve),
            count: Mutex::new(FdCount::default()),
        }
    }

    /// A budget for this process: `RLIMIT_NOFILE` read now.
    pub fn for_process(reserve: usize) -> FdBudget {
        FdBudget::new(crate::transport::sockopt::nofile_limit(), reserve)
    }

    pub fn set_reserve(&self, reserve: usize) {
        self.reserve.store(reserve, Ordering::Relaxed);
    }

    /// Whether a new session leaves at least `fd_reserve` descriptors free.
    fn has_room(&self) -> bool {
        self.has_room_at(Instant::now(), || {
            std::fs::read_dir("/proc/self/fd").map(|dir| dir.count())
        })
    }

    /// [`FdBudget::has_room`] at `now`, counting with `count`.
    fn has_room_at(&self, now: Instant, count: impl FnOnce() -> std::io::Result<usize>) -> bool {
        let reserve = self.reserve.load(Ordering::Relaxed);
        let Some(limit) = self.limit.filter(|_| reserve > 0) else {
            return true;
        };
        let Ok(mut c) = self.count.lock() else {
            return true;
        };
        let fits = |c: &FdCount| c.open + (c.admitted + 1) * FDS_PER_SESSION + reserve <= limit;
        let age = c.at.map(|at| now.saturating_duration_since(at));
        let stale = match age {
            None => true,
            Some(age) if fits(&c) => age >= FD_COUNT_MAX_AGE,
            Some(age) => age >= FD_COUNT_INTERVAL,
        };
        if stale {
            // Counting needs a descriptor itself: failing to get one means
            // there is no room.
            match count() {
                Ok(open) => {
                    c.open = open;
                    c.admitted = 0;
                    c.at = Some(now);
                }
                Err(_) => return false,
            }
        }
        fits(&c)
    }

    fn admitted(&self) {
        if let Ok(mut c) = self.count.lock() {
            c.admitted += 1;
        }
    }
}

/// Everything a new client is checked against.
pub struct Admission<'a> {
    pub global_open: &'a Arc<AtomicUsize>,
    pub global_max: usize,
    pub listener: &'a Arc<ListenerLimits>,
    pub listener_max: Option<usize>,
    pub per_client_max: Option<usize>,
    pub fds: &'a FdBudget,
}

impl Admission<'_> {
    /// Admits a client from `ip` (`None` for a Unix-socket client: no
    /// per-client limit), or says which limit refuses it and its value.
    pub fn admit(&self, ip: Option<IpAddr>) -> Result<Slot, (Refusal, usize)> {
        if self.global_open.load(Ordering::Relaxed) >= self.global_max {
            return Err((Refusal::MaxSessions, self.global_max));
        }
        if let Some(max) = self.listener_max {
            if self.listener.open() >= max {
                return Err((Refusal::MaxSessions, max));
            }
        }
        let client = match (ip, self.per_client_max) {
            (Some(ip), Some(max)) => {
                let mut map = self
                    .listener
                    .per_client
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let n = map.entry(ip).or_insert(0);
                if *n >= max {
                    return Err((Refusal::PerClient, max));
                }
                if !self.fds.has_room() {
                    if *n == 0 {
                        map.remove(&ip);
                    }
                    return Err((Refusal::FdReserve, self.fds.reserve.load(Ordering::Relaxed)));
                }
                *n += 1;
                Some(ip)
            }
            _ => {
                if !self.fds.has_room() {
                    return Err((Refusal::FdReserve, self.fds.reserve.load(Ordering::Relaxed)));
                }
                None
            }
        };
        self.fds.admitted();
        self.global_open.fetch_add(1, Ordering::Relaxed);
        self.listener.open.fetch_add(1, Ordering::Relaxed);
        self.listener.admitted();
        Ok(Slot {
            global_open: self.global_open.clone(),
            listener: self.listener.clone(),
            client,
            thread: None,
        })
    }
}

impl Admission<'_> {
    /// Counts a session taken over from the old process, whatever the
    /// limits say: it is open already, and refusing it would close it.
    pub fn count(&self, ip: Option<IpAddr>) -> Slot {
        let client = match (ip, self.per_client_max) {
            (Some(ip), Some(_)) => {
                let mut map = self
                    .listener
                    .per_client
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                *map.entry(ip).or_insert(0) += 1;
                Some(ip)
            }
            _ => None,
        };
        self.fds.admitted();
        self.global_open.fetch_add(1, Ordering::Relaxed);
        self.listener.open.fetch_add(1, Ordering::Relaxed);
        self.listener.admitted();
        Slot {
            global_open: self.global_open.clone(),
            listener: self.listener.clone(),
            client,
            thread: None,
        }
    }
}

/// A session's place under the limits; dropping it gives the place back.
#[derive(Debug)]
pub struct Slot {
    global_open: Arc<AtomicUsize>,
    listener: Arc<ListenerLimits>,
    /// Counted in the listener's per-client map.
    client: Option<IpAddr>,
    /// Counted on the session thread it runs on.
    thread: Option<super::workers::Placed>,
}

impl Slot {
    /// Counts the session on the session thread it runs on, too.
    pub fn set_thread(&mut self, placed: super::workers::Placed) {
        self.thread = Some(placed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.global_open.fetch_sub(1, Ordering::Relaxed);
        self.listener.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.client {
            let mut map = self
                .listener
                .per_client
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admission<'a>(
        global: &'a Arc<AtomicUsize>,
        listener: &'a Arc<ListenerLimits>,
        fds: &'a FdBudget,
    ) -> Admission<'a> {
        Admission {
            global_open: global,
            global_max: 10,
            listener,
            listener_max: Some(3),
            per_client_max: Some(2),
            fds,
        }
    }

    #[test]
    fn limits_refuse_in_order_and_slots_give_places_back() {
        let global = Arc::new(AtomicUsize::new(0));
        let listener = Arc::new(ListenerLimits::default());
        let fds = FdBudget::new(None, 64);
        let a = admission(&global, &listener, &fds);
        let ip1: IpAddr = "10.0.0.1".parse().unwrap();
        let ip2: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = a.admit(Some(ip1)).unwrap();
        let s2 = a.admit(Some(ip1)).unwrap();
        assert_eq!(a.admit(Some(ip1)).unwrap_err(), (Refusal::PerClient, 2));
        let s3 = a.admit(Some(ip2)).unwrap();
        assert_eq!(a.admit(Some(ip2)).unwrap_err(), (Refusal::MaxSessions, 3));
        assert_eq!(a.admit(None).unwrap_err(), (Refusal::MaxSessions, 3));
        assert_eq!(global.load(Ordering::Relaxed), 3);
        drop(s1);
        let s4 = a.admit(Some(ip1)).unwrap();
        drop((s2, s3, s4));
        assert_eq!(global.load(Ordering::Relaxed), 0);
        assert_eq!(listener.open(), 0);
        assert!(listener.per_client.lock().unwrap().is_empty());
        // The global limit, then bursts: warned once until someone gets in.
        global.store(10, Ordering::Relaxed);
        assert_eq!(a.admit(None).unwrap_err(), (Refusal::MaxSessions, 10));
        assert!(listener.first_of_burst(Refusal::MaxSessions));
        assert!(!listener.first_of_burst(Refusal::MaxSessions));
        global.store(0, Ordering::Relaxed);
        drop(a.admit(None).unwrap());
        assert!(listener.first_of_burst(Refusal::MaxSessions));
    }

    #[test]
    fn fd_reserve_sheds_near_the_limit() {
        let global = Arc::new(AtomicUsize::new(0));
        let listener = Arc::new(ListenerLimits::default());
        // This process has a few descriptors open already: a limit of 4 with
        // a reserve of 64 has no room; a huge limit has.
        let tight = FdBudget::new(Some(4), 64);
        let a = admission(&global, &listener, &tight);
        assert_eq!(a.admit(None).unwrap_err(), (Refusal::FdReserve, 64));
        tight.set_reserve(0);
        assert!(a.admit(None).is_ok(), "a reserve of 0 is off");
        let roomy = FdBudget::new(Some(1 << 30), 64);
        let a = admission(&global, &listener, &roomy);
        assert!(a.admit(Some("10.0.0.9".parse().unwrap())).is_ok());
        assert!(listener.per_client.lock().unwrap().is_empty());
    }

    /// Far from the limit the descriptors are counted once a second; near
    /// it, every 100 ms; the estimate in between counts 2 per admission.
    #[test]
    fn fds_are_counted_rarely_while_far_from_the_limit() {
        let budget = FdBudget::new(Some(1000), 100);
        let counts = std::cell::Cell::new(0);
        let open = std::cell::Cell::new(10);
        let count = || {
            counts.set(counts.get() + 1);
            Ok(open.get())
        };
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        // The first admission counts; then 100 admissions in 900 ms do not.
        for i in 0..100 {
            assert!(budget.has_room_at(at(i * 9), count));
            budget.admitted();
        }
        assert_eq!(counts.get(), 1);
        // A second after the count: counted again.
        assert!(budget.has_room_at(at(1000), count));
        assert_eq!(counts.get(), 2);
        budget.admitted();
        // Near the limit: 10 open + 2 per admission reaches 900 (1000 minus
        // the reserve) after 445 admissions; the estimate refuses, and a
        // count 100 ms after the last one finds what is really open.
        for _ in 0..444 {
            budget.admitted();
        }
        assert!(!budget.has_room_at(at(1050), count), "the estimate is full");
        assert_eq!(counts.get(), 2, "within 100 ms of a count: not counted");
        open.set(500);
        assert!(budget.has_room_at(at(1100), count), "500 open: room");
        assert_eq!(counts.get(), 3);
        open.set(899);
        assert!(
            budget.has_room_at(at(1150), count),
            "no count, 500 + 2 fits"
        );
        assert!(!budget.has_room_at(at(2100), count), "899 open: no room");
        assert_eq!(counts.get(), 4);
        // Counting fails (no descriptor to count with): no room.
        assert!(!budget.has_room_at(at(3200), || Err(std::io::Error::other("EMFILE"))));
    }
}
