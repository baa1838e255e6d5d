//! `fhirlift status`: what the last runs did, read from the state directory's ledger, lock and
//! reports. Read-only: it never creates a ledger, never takes the run lock, never touches the
//! network, and shows record keys and row locations only (no values).

use std::io::Write;
use std::path::PathBuf;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;

use super::{CommandResult, Outcome};
use crate::config::PipelineConfig;
use crate::ledger::lock::current_holder;
use crate::ledger::{
    LEDGER_FILE, Ledger, LockHolder, RejectRecord, RunRecord, RunReport, Scope, SubmissionStatus,
    UnconfirmedRecord,
};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The pipeline config (its CCN and state directory are used).
    pub config: PathBuf,
    /// Output format: `text` for people, `json` for monitoring.
    #[arg(long, value_enum, default_value_t = StatusFormat::Text)]
    pub format: StatusFormat,
    /// The state directory (default: the config's, or `.fhirlift` beside it).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// How many runs to show.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// How many pending, unknown and rejected records to list per target in text output
    /// (JSON lists them all).
    #[arg(long, default_value_t = 20)]
    pub list: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StatusFormat {
    Text,
    Json,
}

/// Everything `status` shows, as `--format json` prints it.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub state_dir: PathBuf,
    pub ccn: String,
    /// The run holding the lock right now, if any.
    pub running: Option<LockHolder>,
    pub runs: Vec<RunView>,
    pub targets: Vec<TargetView>,
}

#[derive(Debug, Serialize)]
pub struct RunView {
    #[serde(flatten)]
    pub run: RunRecord,
    /// `finished`, `running`, or `did-not-finish` (killed, crashed or power loss).
    pub state: &'static str,
    /// The run report, when it exists.
    pub report: Option<PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct TargetView {
    pub scope: Scope,
    pub sent: u64,
    pub pending: u64,
    pub unknown: u64,
    pub unconfirmed: Vec<UnconfirmedRecord>,
    pub rejects: Vec<RejectRecord>,
}

pub fn run(args: StatusArgs) -> CommandResult {
    let config = PipelineConfig::load(&args.config).map_err(|errs| {
        errs.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    })?;
    let state_dir = args.state.clone().unwrap_or_else(|| config.state_dir());
    let report = collect(&state_dir, &config.center.ccn, args.runs)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match args.format {
        StatusFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &report)?;
            writeln!(out)?;
        }
        StatusFormat::Text => print_text(&mut out, &report, args.list)?,
    }
    Ok(Outcome::Success)
}

/// Reads the state directory. A directory without a ledger gives an empty report.
pub fn collect(
    state_dir: &std::path::Path,
    ccn: &str,
    runs: usize,
) -> Result<StatusReport, Box<dyn std::error::Error + Send + Sync>> {
    let running = current_holder(state_dir)?;
    let mut report = StatusReport {
        state_dir: state_dir.to_path_buf(),
        ccn: ccn.to_string(),
        running: running.clone(),
        runs: Vec::new(),
        targets: Vec::new(),
    };
    if !state_dir.join(LEDGER_FILE).exists() {
        return Ok(report);
    }
    let ledger = Ledger::open(state_dir)?;
    for run in ledger
        .runs(runs.max(1))?
        .into_iter()
        .filter(|r| r.scope.ccn == ccn)
    {
        let state = if run.ended_at.is_some() {
            "finished"
        } else if running
            .as_ref()
            .is_some_and(|h| h.pid == run.pid && h.host == run.host)
        {
            "running"
        } else {
            "did-not-finish"
        };
        let path = RunReport::path_for(state_dir, &run.uuid);
        report.runs.push(RunView {
            report: path.exists().then_some(path),
            state,
            run,
        });
    }
    for scope in ledger.scopes()?.into_iter().filter(|s| s.ccn == ccn) {
        let mut view = TargetView {
            sent: 0,
            pending: 0,
            unknown: 0,
            unconfirmed: ledger.unconfirmed(&scope)?,
            rejects: ledger.rejects(&scope)?,
            scope: scope.clone(),
        };
        for (status, n) in ledger.submission_counts(&scope)? {
            match status {
                SubmissionStatus::Sent => view.sent += n,
                SubmissionStatus::Pending => view.pending += n,
                SubmissionStatus::Unknown => view.unknown += n,
            }
        }
        report.targets.push(view);
    }
    Ok(report)
}

fn when(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn print_text(out: &mut impl Write, r: &StatusReport, list: usize) -> std::io::Result<()> {
    writeln!(out, "State directory: {}", r.state_dir.display())?;
    match &r.running {
        Some(h) => writeln!(out, "Running now: {h}")?,
        None => writeln!(out, "Running now: no")?,
    }
    if r.runs.is_empty() {
        writeln!(out, "\nNo runs recorded for CCN {} yet.", r.ccn)?;
    } else {
        writeln!(out, "\nLast runs (newest first):")?;
    }
    for v in &r.runs {
        let run = &v.run;
        let end = match (run.ended_at, v.state) {
            (Some(t), _) => when(t),
            (None, "running") => "running".into(),
            (None, _) => "did not finish (killed or crashed)".into(),
        };
        let exit = run
            .exit_code
            .map_or_else(|| "-".to_string(), |c| c.to_string());
        writeln!(
            out,
            "  #{} {} → {}  mode {}  exit {}  fhirlift {}  config {}",
            run.id,
            when(run.started_at),
            end,
            serde_json::to_value(run.mode)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            exit,
            run.version,
            run.config_hash.get(..12).unwrap_or(&run.config_hash),
        )?;
        writeln!(out, "     target {}", run.scope.target)?;
        if let Some(c) = &run.counts {
            writeln!(
                out,
                "     {} resources: {} created, {} updated, {} unchanged, {} rejected, {} unknown; {} retried; {} missing from the source; {} row errors",
                c.resources,
                c.created,
                c.updated,
                c.unchanged,
                c.rejected,
                c.unknown,
                c.retried,
                c.missing,
                c.row_errors
            )?;
        }
        if let Some(p) = &v.report {
            writeln!(out, "     report {}", p.display())?;
        }
    }
    for t in &r.targets {
        writeln!(out, "\nTarget {} (CCN {}):", t.scope.target, t.scope.ccn)?;
        writeln!(
            out,
            "  {} confirmed, {} pending, {} unknown, {} rejected",
            t.sent,
            t.pending,
            t.unknown,
            t.rejects.len()
        )?;
        if !t.unconfirmed.is_empty() {
            writeln!(
                out,
                "  Unconfirmed (the next run checks these on the server before sending):"
            )?;
            for u in t.unconfirmed.iter().take(list) {
                let status = match u.status {
                    SubmissionStatus::Pending => "pending",
                    SubmissionStatus::Unknown => "unknown",
                    SubmissionStatus::Sent => "sent",
                };
                writeln!(
                    out,
                    "    {} {} {}{}",
                    status,
                    u.record.resource_type,
                    u.record.record_key,
                    u.run_id.map(|r| format!(" (run #{r})")).unwrap_or_default()
                )?;
            }
            more(out, t.unconfirmed.len(), list)?;
        }
        if !t.rejects.is_empty() {
            writeln!(
                out,
                "  Rejected (fix the data, then `fhirlift run --retry-rejected`):"
            )?;
            for j in t.rejects.iter().take(list) {
                writeln!(
                    out,
                    "    {} {} {}: {}{}",
                    j.location,
                    j.record.resource_type,
                    j.record.record_key,
                    j.reason,
                    j.run_id.map(|r| format!(" (run #{r})")).unwrap_or_default()
                )?;
            }
            more(out, t.rejects.len(), list)?;
        }
    }
    Ok(())
}

fn more(out: &mut impl Write, total: usize, shown: usize) -> std::io::Result<()> {
    if total > shown {
        writeln!(
            out,
            "    … and {} more (--list N, or --format json)",
            total - shown
        )?;
    }
    Ok(())
}
