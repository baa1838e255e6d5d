//! One run's bookkeeping around the pipeline: the run lock, the ledger, the run's row, the stop
//! signal and the reject guard at the start; at the end the counts, the records that disappeared
//! from the source, the outstanding rejects, the JSON run report and the exit outcome.
//!
//! `run` calls [`RunSession::start`] before reading anything, hands the pipeline
//! [`RunSession::wrap`]`(sink)` instead of the sink, and calls [`RunSession::finish`] at the end
//! (also after a failure, with `fatal` set). Must not: decide what to send (the loader does, consulting the ledger), or
//! keep resource bodies.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::{
    Ledger, LedgerError, LockError, RecordRef, RejectGuard, RunCounts, RunId, RunInfo, RunLock,
    RunMode, RunRecord, RunReport, Scope, StopReason, StopSignal,
};
use crate::cli::Outcome;
use crate::config::PipelineConfig;
use crate::sink::{OutcomeStatus, RowOutcome, Sink};

use super::sink::{Capture, LedgerSink};

/// How a run is set up.
#[derive(Clone, Debug, Default)]
pub struct SessionOptions {
    pub mode: RunMode,
    /// `--max-rejects`: stop the run after more rejects than this.
    pub max_rejects: Option<u64>,
    /// Listen for SIGINT/SIGTERM (the CLI does; tests driving the library may not).
    pub handle_signals: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("cannot listen for SIGINT/SIGTERM: {0}")]
    Signals(#[source] std::io::Error),
    #[error("{}: cannot write the run report: {source}", .path.display())]
    Report {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SessionError {
    /// The exit outcome this error stands for: another run holding the lock is exit 4.
    pub fn outcome(&self) -> Outcome {
        match self {
            SessionError::Lock(LockError::Held { .. }) => Outcome::Locked,
            _ => Outcome::ConfigError,
        }
    }
}

/// What the pipeline reports back at the end of a run. The outcomes and the records seen by the
/// sink returned from [`RunSession::wrap`] are added automatically.
#[derive(Clone, Debug, Default)]
pub struct RunEnd {
    /// Outcomes of resources that did not go through the wrapped sink.
    pub outcomes: Vec<RowOutcome>,
    /// Every record the source produced this run, when the whole source was read and mapped and
    /// the wrapped sink was not used (`None`: nothing is reported missing).
    pub seen: Option<Vec<RecordRef>>,
    /// Rows rejected before the sink (reading, mapping, validation).
    pub row_errors: u64,
    /// Requests retried, as the loader counted them.
    pub retried: u64,
    /// A failure that aborted the run (authentication, unreachable target).
    pub fatal: Option<String>,
    /// `fatal` was an input or configuration failure (exit 2), not the target's (exit 3).
    pub input_error: bool,
}

/// A finished run.
#[derive(Clone, Debug)]
pub struct Finished {
    pub run_id: RunId,
    pub outcome: Outcome,
    pub counts: RunCounts,
    pub missing: Vec<RecordRef>,
    pub report: PathBuf,
    pub stopped: Option<String>,
}

/// A run in progress: holds the lock until it is finished or dropped.
#[derive(Debug)]
pub struct RunSession {
    lock: RunLock,
    ledger: Arc<Ledger>,
    run: RunRecord,
    state_dir: PathBuf,
    config_file: PathBuf,
    stop: StopSignal,
    guard: Arc<RejectGuard>,
    capture: Arc<Mutex<Capture>>,
}

impl RunSession {
    /// Takes the state directory's lock, opens the ledger and records the run's start.
    pub fn start(
        config: &PipelineConfig,
        state_dir: &Path,
        scope: Scope,
        options: SessionOptions,
    ) -> Result<RunSession, SessionError> {
        let lock = RunLock::acquire(state_dir)?;
        let ledger = Arc::new(Ledger::open(state_dir)?);
        let stop = if options.handle_signals {
            StopSignal::install().map_err(SessionError::Signals)?
        } else {
            StopSignal::new()
        };
        let guard = Arc::new(RejectGuard::new(options.max_rejects, stop.clone()));
        let info = RunInfo {
            scope,
            mode: options.mode,
            version: env!("CARGO_PKG_VERSION").to_string(),
            config_hash: super::config_hash(config),
        };
        if options.mode == RunMode::Full {
            ledger.set_forget_known(true);
        }
        ledger.set_reject_guard(Some(guard.clone()));
        let id = ledger.begin_run(&info)?;
        // The lock is held: this process is the only writer, so the run may decide from memory.
        ledger.preload(&info.scope)?;
        let run = ledger.run(id)?.ok_or_else(|| LedgerError::Sqlite {
            path: ledger.path().to_path_buf(),
            op: "read the run just begun",
            source: rusqlite::Error::QueryReturnedNoRows,
        })?;
        tracing::info!(run = id.0, mode = ?options.mode, "Run started");
        Ok(RunSession {
            lock,
            ledger,
            run,
            state_dir: state_dir.to_path_buf(),
            config_file: config.file.clone(),
            stop,
            guard,
            capture: Arc::new(Mutex::new(Capture::default())),
        })
    }

    /// Wraps the run's sink so that the session sees every record and outcome, and, for
    /// `--retry-rejected`, so that only the records rejected before (and their patients) reach
    /// `sink`. Call once per run.
    pub fn wrap(&self, sink: Box<dyn Sink>) -> Result<Box<dyn Sink>, LedgerError> {
        let retry = match self.run.mode {
            RunMode::RetryRejected => Some(self.rejected_keys()?),
            _ => None,
        };
        Ok(Box::new(LedgerSink::new(
            sink,
            retry,
            self.capture.clone(),
            self.stop.clone(),
        )))
    }

    /// The ledger, to hand to the loader.
    /// What earlier runs settled row by row, for an incremental run; `None` for `--full` (which
    /// re-checks everything) and `--retry-rejected`.
    pub fn known_rows(&self) -> Result<Option<Arc<dyn crate::pipeline::KnownRows>>, LedgerError> {
        if self.mode() != RunMode::Incremental {
            return Ok(None);
        }
        let rows = super::SourceRows::load(self.ledger().clone(), self.scope().clone())?;
        Ok(Some(Arc::new(rows)))
    }

    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.ledger
    }

    pub fn scope(&self) -> &Scope {
        &self.run.scope
    }

    pub fn run_id(&self) -> RunId {
        self.run.id
    }

    pub fn mode(&self) -> RunMode {
        self.run.mode
    }

    /// The stop flag: check it between requests.
    pub fn stop(&self) -> &StopSignal {
        &self.stop
    }

    /// The `--max-rejects` guard: the loader calls `note_reject` for each reject.
    pub fn reject_guard(&self) -> &Arc<RejectGuard> {
        &self.guard
    }

    pub fn lock(&self) -> &RunLock {
        &self.lock
    }

    /// The records `--retry-rejected` re-submits.
    pub fn rejected_keys(&self) -> Result<std::collections::BTreeSet<RecordRef>, LedgerError> {
        self.ledger.rejected_keys(&self.run.scope)
    }

    /// Records the end of the run: rejects and unknowns from the outcomes, the records that left
    /// the source, the counts and exit code, and the JSON run report. Releases the lock.
    pub fn finish(self, end: RunEnd) -> Result<Finished, SessionError> {
        let scope = &self.run.scope;
        // Settle why the run stopped before recording anything: the rejects recorded below must
        // not count against --max-rejects.
        self.ledger.set_reject_guard(None);
        let reason = self.stop.reason();
        let (mut outcomes, seen) = {
            let mut c = self.capture.lock().map_err(|_| LedgerError::Poisoned {
                path: self.ledger.path().to_path_buf(),
            })?;
            let seen = if c.finished {
                Some(std::mem::take(&mut c.seen))
            } else {
                None
            };
            (std::mem::take(&mut c.outcomes), seen)
        };
        outcomes.extend(end.outcomes);
        let seen = match (seen, end.seen) {
            (Some(mut a), Some(b)) => {
                a.extend(b);
                Some(a)
            }
            (a, b) => a.or(b),
        };
        let mut counts = RunCounts {
            row_errors: end.row_errors,
            retried: end.retried,
            ..RunCounts::default()
        };
        for o in &outcomes {
            counts.add(o.status);
            let Some(id) = &o.identifier else { continue };
            let key = super::record_key(id);
            match o.status {
                // Also recorded by the loader as they happen; repeating it here is harmless and
                // keeps `--retry-rejected` working whatever the sink did.
                OutcomeStatus::Rejected => self.ledger.record_reject(
                    scope,
                    &o.resource_type,
                    &key,
                    &o.location.to_string(),
                    o.message.as_deref().unwrap_or("rejected"),
                )?,
                // Only a request that went out can have an unknown result; a row the run never
                // got to keeps what the ledger knew.
                OutcomeStatus::Unknown if o.attempts > 0 => {
                    self.ledger.record_unknown(scope, &o.resource_type, &key)?
                }
                _ => {}
            }
        }
        let complete = reason.is_none() && end.fatal.is_none();
        let mut missing = Vec::new();
        let whole_source = matches!(self.run.mode, RunMode::Incremental | RunMode::Full);
        if let (Some(seen), true) = (&seen, complete && whole_source) {
            self.ledger.mark_seen(
                scope,
                seen.iter()
                    .map(|r| (r.resource_type.as_str(), r.record_key.as_str())),
            )?;
            missing = self.ledger.missing_since(scope, self.run.id)?;
        }
        counts.missing = missing.len() as u64;
        let outcome = match (reason, &end.fatal) {
            (Some(StopReason::Signal), _) => Outcome::Interrupted,
            (_, Some(_)) if end.input_error => Outcome::ConfigError,
            (_, Some(_)) => Outcome::TargetError,
            (Some(StopReason::TooManyRejects), _) => Outcome::RowsRejected,
            (None, None) if counts.rejected + counts.unknown + counts.row_errors > 0 => {
                Outcome::RowsRejected
            }
            (None, None) => Outcome::Success,
        };
        let stopped = match (reason, &end.fatal) {
            (Some(r), _) => Some(r.describe().to_string()),
            (None, Some(f)) => Some(format!("aborted: {f}")),
            (None, None) => None,
        };
        let mut report = RunReport::new(
            &self.run,
            &self.config_file,
            counts.clone(),
            outcome as i32,
            // An unchanged resource says nothing the counts do not: a nightly report lists only
            // what was sent, refused or left unknown.
            outcomes
                .into_iter()
                .filter(|o| o.status != OutcomeStatus::Unchanged)
                .collect(),
        );
        report.stopped = stopped.clone();
        report.missing = missing.clone();
        let path = RunReport::path_for(&self.state_dir, &self.run.uuid);
        report
            .write(&self.state_dir)
            .map_err(|source| SessionError::Report {
                path: path.clone(),
                source,
            })?;
        self.ledger.end_run(self.run.id, &counts, outcome as i32)?;
        tracing::info!(
            run = self.run.id.0,
            exit_code = outcome as i32,
            created = counts.created,
            updated = counts.updated,
            unchanged = counts.unchanged,
            rejected = counts.rejected,
            missing = counts.missing,
            "Run finished"
        );
        Ok(Finished {
            run_id: self.run.id,
            outcome,
            counts,
            missing,
            report: path,
            stopped,
        })
    }
}
