//! Graceful stop on SIGINT/SIGTERM, or when `--max-rejects` is exceeded: a shared flag the pipeline and the loader check between
//! requests, so requests in flight finish (or are recorded as unknown) and the ledger stays
//! consistent. A second signal ends the process at once (exit 130); SQLite's journal keeps the
//! ledger consistent even then.
//!
//! Must not: do any work inside the signal handling beyond setting the flag and waking waiters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};

use tokio::sync::Notify;

/// A stop request shared by every part of a run. Cloning shares the same flag.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stopped: AtomicBool,
    /// The first reason given (0: none yet).
    reason: AtomicU8,
    notify: Notify,
}

/// Why a run was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    /// SIGINT or SIGTERM (exit 130).
    Signal,
    /// More rejects than `--max-rejects` allows (exit 1).
    TooManyRejects,
}

impl StopReason {
    fn code(self) -> u8 {
        match self {
            StopReason::Signal => 1,
            StopReason::TooManyRejects => 2,
        }
    }

    /// What the report and the log say.
    pub fn describe(self) -> &'static str {
        match self {
            StopReason::Signal => "interrupted by a signal",
            StopReason::TooManyRejects => "aborted: more rejects than --max-rejects allows",
        }
    }
}

impl StopSignal {
    /// A flag no signal sets (tests, library use); [`StopSignal::trigger`] sets it.
    pub fn new() -> StopSignal {
        StopSignal::default()
    }

    /// A flag set by the first SIGINT or SIGTERM the process receives. The listener runs on its
    /// own thread, so it works whether or not the caller runs a tokio runtime.
    pub fn install() -> std::io::Result<StopSignal> {
        let signal = StopSignal::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        // Register before returning, so a signal right after `install` is not missed.
        let (mut int, mut term) = rt.block_on(async {
            use tokio::signal::unix::{SignalKind, signal};
            Ok::<_, std::io::Error>((
                signal(SignalKind::interrupt())?,
                signal(SignalKind::terminate())?,
            ))
        })?;
        let flag = signal.clone();
        std::thread::Builder::new()
            .name("fhirlift-signals".into())
            .spawn(move || {
                rt.block_on(async move {
                    let mut received = 0u32;
                    loop {
                        tokio::select! {
                            _ = int.recv() => {}
                            _ = term.recv() => {}
                        }
                        received += 1;
                        if received == 1 {
                            tracing::warn!(
                                "Stop requested: finishing requests in flight; signal again to stop at once"
                            );
                            flag.trigger_for(StopReason::Signal);
                        } else {
                            std::process::exit(crate::cli::Outcome::Interrupted as i32);
                        }
                    }
                })
            })?;
        Ok(signal)
    }

    /// Requests a stop as a signal would.
    pub fn trigger(&self) {
        self.trigger_for(StopReason::Signal);
    }

    /// Requests a stop; the first reason given is the one kept.
    pub fn trigger_for(&self, reason: StopReason) {
        let _ = self.inner.reason.compare_exchange(
            0,
            reason.code(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
    }

    /// Why the stop was requested, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        match self.inner.reason.load(Ordering::SeqCst) {
            1 => Some(StopReason::Signal),
            2 => Some(StopReason::TooManyRejects),
            _ => None,
        }
    }

    /// `true` once a stop was requested.
    pub fn is_stopped(&self) -> bool {
        self.inner.stopped.load(Ordering::SeqCst)
    }

    /// Resolves when a stop is requested (at once if it already was).
    pub async fn stopped(&self) {
        loop {
            let notified = self.inner.notify.notified();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }
}

/// The `--max-rejects` guard: counts the run's rejects and stops the run once there are more than
/// allowed, so a broken mapping does not hammer the service with thousands of doomed requests.
#[derive(Debug)]
pub struct RejectGuard {
    max: Option<u64>,
    seen: AtomicU64,
    stop: StopSignal,
}

impl RejectGuard {
    /// `max`: the number of rejects tolerated (`None`: no limit).
    pub fn new(max: Option<u64>, stop: StopSignal) -> RejectGuard {
        RejectGuard {
            max,
            seen: AtomicU64::new(0),
            stop,
        }
    }

    /// Counts one reject; returns `true` when this one exceeded the limit (the stop is requested).
    pub fn note_reject(&self) -> bool {
        let n = self.seen.fetch_add(1, Ordering::SeqCst) + 1;
        match self.max {
            Some(max) if n > max => {
                if n == max + 1 {
                    tracing::error!(max, "Too many rejects: stopping the run");
                }
                self.stop.trigger_for(StopReason::TooManyRejects);
                true
            }
            _ => false,
        }
    }

    /// Rejects counted so far.
    pub fn count(&self) -> u64 {
        self.seen.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let a = StopSignal::new();
        let b = a.clone();
        assert!(!b.is_stopped());
        a.trigger();
        assert!(b.is_stopped());
    }

    #[test]
    fn the_reject_guard_stops_after_the_limit() {
        let stop = StopSignal::new();
        let guard = RejectGuard::new(Some(2), stop.clone());
        assert!(!guard.note_reject());
        assert!(!guard.note_reject());
        assert!(!stop.is_stopped());
        assert!(guard.note_reject());
        assert_eq!(stop.reason(), Some(StopReason::TooManyRejects));
        // A later signal does not change the recorded reason.
        stop.trigger();
        assert_eq!(stop.reason(), Some(StopReason::TooManyRejects));
        let unlimited = RejectGuard::new(None, StopSignal::new());
        for _ in 0..1000 {
            assert!(!unlimited.note_reject());
        }
    }

    #[tokio::test]
    async fn waiters_wake_on_trigger() {
        let s = StopSignal::new();
        let waiter = {
            let s = s.clone();
            tokio::spawn(async move { s.stopped().await })
        };
        tokio::task::yield_now().await;
        s.trigger();
        waiter.await.unwrap();
        // Already stopped: returns at once.
        s.stopped().await;
    }
}
