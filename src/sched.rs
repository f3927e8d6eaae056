//! The calling thread's time slice under Linux's EEVDF scheduler:
//! `sched_setattr(2)` with `sched_runtime` for a `SCHED_OTHER` thread
//! (Linux 6.12 and later; earlier kernels ignore it). A shorter slice gives
//! a woken thread an earlier deadline, so it runs sooner on a busy CPU; it
//! needs no privilege. Neither libc nor rustix wraps the call: the raw
//! syscall is this module's one `unsafe` block.

use std::io;
use std::time::Duration;

/// `struct sched_attr` as of `SCHED_ATTR_SIZE_VER0` (48 bytes).
#[repr(C)]
struct SchedAttr {
    size: u32,
    policy: u32,
    flags: u64,
    nice: i32,
    priority: u32,
    runtime: u64,
    deadline: u64,
    period: u64,
}

/// Sets the calling thread's slice (zero: the kernel's default) and its
/// nice value (the call sets both: pass the one it has to keep it; a lower
/// one needs CAP_SYS_NICE). The kernel clamps a slice to 0.1–100 ms.
pub fn set_thread_slice(slice: Duration, nice: i32) -> io::Result<()> {
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: libc::SCHED_OTHER as u32,
        flags: 0,
        nice,
        priority: 0,
        runtime: u64::try_from(slice.as_nanos()).unwrap_or(u64::MAX),
        deadline: 0,
        period: 0,
    };
    // SAFETY: `attr` is an initialised `sched_attr` whose `size` field says
    // how many bytes the kernel may read, alive for the call; pid 0 is the
    // calling thread and flags 0 asks for nothing else.
    #[allow(unsafe_code)]
    let r = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the kernel takes a slice for a `SCHED_OTHER` thread (6.12+).
    fn custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut v = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0)) >= (6, 12)
    }

    /// `se.slice` of the calling thread, in ns, when the kernel shows it.
    fn slice_now() -> Option<u64> {
        let s = std::fs::read_to_string("/proc/thread-self/sched").ok()?;
        let line = s.lines().find(|l| l.starts_with("se.slice"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    }

    #[test]
    fn a_thread_gets_its_slice_and_gives_it_back() {
        std::thread::spawn(|| {
            let Some(default) = slice_now().filter(|_| custom_slices()) else {
                eprintln!("no custom slices or no se.slice here: not checked");
                return;
            };
            let nice = rustix::process::getpriority_process(None).unwrap();
            set_thread_slice(Duration::from_micros(100), nice).unwrap();
            assert_eq!(slice_now(), Some(100_000));
            assert_eq!(rustix::process::getpriority_process(None).unwrap(), nice);
            set_thread_slice(Duration::ZERO, nice).unwrap();
            assert_eq!(slice_now(), Some(default));
        })
        .join()
        .unwrap();
    }
}
