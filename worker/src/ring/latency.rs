//! Asks the kernel to run the calling thread promptly when it wakes.
//!
//! The ring's threads mostly wait (for a neighbour's frame, for the next
//! bucket) and then have a moment of work that everything else waits for.
//! On a busy machine (more ranks than cores) a woken ring thread otherwise
//! queues behind compute threads for a few milliseconds at every wake-up,
//! and the whole ring waits with it. Linux's EEVDF scheduler (6.12 and
//! later) takes a per-thread time slice: a short slice gives an earlier
//! deadline, so the thread preempts a long-running one when it wakes, while
//! its share of the CPU stays what it was. No privilege is needed; on older
//! kernels or other systems this does nothing.

/// The slice asked for: short enough to preempt at wake-up, long enough not
/// to be preempted in the middle of summing a segment.
const SLICE_NS: u64 = 300_000;

/// Applies the short slice to the calling thread (best effort, once per
/// thread).
pub fn prefer_prompt_wakeups() {
    #[cfg(target_os = "linux")]
    linux::apply();
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    use std::cell::Cell;

    /// `struct sched_attr` (include/uapi/linux/sched/types.h), first version.
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

    thread_local! {
        static DONE: Cell<bool> = const { Cell::new(false) };
    }

    pub fn apply() {
        if DONE.with(|d| d.replace(true)) {
            return;
        }
        // Keep the thread's nice value: lowering it would need a privilege.
        // SAFETY: getpriority reads the calling thread's nice value (who 0).
        let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let attr = SchedAttr {
            size: std::mem::size_of::<SchedAttr>() as u32,
            policy: libc::SCHED_OTHER as u32,
            flags: 0,
            nice,
            priority: 0,
            runtime: super::SLICE_NS,
            deadline: 0,
            period: 0,
        };
        // SAFETY: sched_setattr(2) on the calling thread (pid 0) with a
        // valid, fully initialised attribute of the size it declares; a
        // failure (older kernel, seccomp) leaves the thread as it was.
        let _ =
            unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0u32) };
    }
}
