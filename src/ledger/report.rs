//! The JSON run report written into the state directory for every run:
//! `reports/<run uuid>.json`, with the run's identity, counts, exit code, the records the source no
//! longer holds, and one line per resource that was sent, refused or left unknown.
//!
//! Written atomically (a temporary file renamed into place), so a reader never sees half a report.
//! Must not: hold resource bodies or values; outcomes carry locations, identifiers and reasons.

use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{RecordRef, RunCounts, RunMode, RunRecord, Scope};
use crate::sink::RowOutcome;

/// The reports folder inside the state directory.
pub const REPORTS_DIR: &str = "reports";

/// One run's report.
#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub run_id: i64,
    pub run_uuid: String,
    pub fhirlift_version: String,
    pub config: String,
    pub config_hash: String,
    pub scope: Scope,
    pub mode: RunMode,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    pub exit_code: i32,
    /// Why the run stopped early, if it did (interrupted, too many rejects, target failure).
    pub stopped: Option<String>,
    pub counts: RunCounts,
    /// Records confirmed on the server earlier that the source no longer holds.
    pub missing: Vec<RecordRef>,
    /// One line per resource that was not unchanged: created, updated, rejected (with the
    /// reason) or unknown.
    pub outcomes: Vec<RowOutcome>,
}

impl RunReport {
    /// A report for `run` (as `begin_run` recorded it), ended now.
    pub fn new(
        run: &RunRecord,
        config: &Path,
        counts: RunCounts,
        exit_code: i32,
        outcomes: Vec<RowOutcome>,
    ) -> RunReport {
        RunReport {
            run_id: run.id.0,
            run_uuid: run.uuid.clone(),
            fhirlift_version: run.version.clone(),
            config: config.display().to_string(),
            config_hash: run.config_hash.clone(),
            scope: run.scope.clone(),
            mode: run.mode,
            started_at: run.started_at,
            ended_at: Utc::now(),
            exit_code,
            stopped: None,
            counts,
            missing: Vec::new(),
            outcomes,
        }
    }

    /// The report's path for a run in a state directory.
    pub fn path_for(state_dir: &Path, run_uuid: &str) -> PathBuf {
        state_dir.join(REPORTS_DIR).join(format!("{run_uuid}.json"))
    }

    /// Writes the report atomically; returns its path.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<PathBuf> {
        let dir = state_dir.join(REPORTS_DIR);
        std::fs::create_dir_all(&dir)?;
        let path = Self::path_for(state_dir, &self.run_uuid);
        let tmp = dir.join(format!(".{}.json.tmp", self.run_uuid));
        {
            // Outcomes carry record keys and row locations: owner-only, like every other output.
            let mut w = crate::report::create_private(&tmp)?;
            serde_json::to_writer_pretty(&mut w, self).map_err(std::io::Error::other)?;
            use std::io::Write;
            w.write_all(b"\n")?;
            w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        }
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }
}
