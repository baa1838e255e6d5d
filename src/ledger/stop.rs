//! Graceful stop on SIGINT/SIGTERM: a shared flag the pipeline and the loader check between
//! requests, so requests in flight finish (or are recorded as unknown) and the ledger stays
//! consistent. A second signal ends the process at once (exit 130); SQLite's journal keeps the
//! ledger consistent even then.
//!
//! Must not: do any work inside the signal handling beyond setting the flag and waking waiters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A stop request shared by every part of a run. Cloning shares the same flag.
#[derive(Clone, Debug, Default)]
pub struct StopSignal {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    stopped: AtomicBool,
    notify: Notify,
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
                            flag.trigger();
                        } else {
                            std::process::exit(crate::cli::Outcome::Interrupted as i32);
                        }
                    }
                })
            })?;
        Ok(signal)
    }

    /// Requests a stop.
    pub fn trigger(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.notify.notify_waiters();
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
