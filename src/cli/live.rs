//! The submitting half of `fhirlift run`: resolves the target (starting the embedded sandbox when
//! it is the target), takes the state directory's run lock, builds the loader with the ledger
//! hooked in, runs the pipeline into it, and records the run (ledger row, JSON run report).
//!
//! Holds no pipeline or loader logic; it only puts the stages together and maps their results to
//! exit codes. Never prints credentials or row values.

use super::Outcome;
use super::run::RunArgs;
use crate::config::PipelineConfig;
use crate::ledger::{RunEnd, RunMode, RunSession, SessionOptions};
use crate::mapping::MappingSet;
use crate::pipeline::{self, ConfigSources, PipelineError, RunOptions};
use crate::sink::SinkError;
use crate::sink::load::setup::{self, LoadFlags};
use crate::sink::load::target::TargetOverrides;

/// Submits: the whole of `run` without `--dry-run`.
pub fn run_live(args: &RunArgs, config: &PipelineConfig, set: &MappingSet) -> super::CommandResult {
    let state_dir = args.state.clone().unwrap_or_else(|| config.state_dir());
    let mode = match (args.full, args.retry_rejected) {
        (true, true) => return Err("--full and --retry-rejected exclude each other".into()),
        (true, false) => RunMode::Full,
        (false, true) => RunMode::RetryRejected,
        (false, false) => RunMode::Incremental,
    };
    let flags = LoadFlags {
        overrides: TargetOverrides {
            kind: args.target,
            base_url: args.base_url.clone(),
            token_url: args.token_url.clone(),
        },
        state_dir: Some(state_dir.clone()),
        confirm_production: args.confirm_production,
        concurrency: args.concurrency,
        bundle_size: args.bundle_size,
        progress: !args.no_progress,
    };
    // Everything that needs no lock and no network is checked first: a bad target, missing
    // credentials or an unconfirmed production run fail before anything is recorded.
    match setup::precheck(config, &flags) {
        Err(setup::SetupError::ProductionNotConfirmed { ccn, .. }) => {
            // Say what would have gone: the sources mapped into a counting sink, nothing sent.
            let resources = count_resources(args, config, set);
            return Err(setup::SetupError::ProductionNotConfirmed { ccn, resources }.into());
        }
        checked => checked?,
    }
    let scope = setup::scope(config, &flags)?;
    let session = match RunSession::start(
        config,
        &state_dir,
        scope.clone(),
        SessionOptions {
            mode,
            max_rejects: args.max_rejects,
            handle_signals: true,
        },
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {}", super::error_chain(&e));
            return Ok(e.outcome());
        }
    };

    let prepared = match setup::prepare(
        config,
        &flags,
        Some(session.ledger().clone()),
        Some(session.stop().clone()),
    ) {
        Ok(p) => p,
        Err(e) => {
            // The run was recorded as started: record how it ended too.
            let message = super::error_chain(&e);
            session.finish(RunEnd {
                fatal: Some(message.clone()),
                ..RunEnd::default()
            })?;
            eprintln!("error: {message}");
            return Ok(Outcome::TargetError);
        }
    };
    eprintln!("Sending to {}", prepared.description);
    let loader = prepared.loader;
    let summary = loader.summary_handle();
    let sink = session.wrap(Box::new(loader))?;

    let report_dir = state_dir
        .join(crate::ledger::report::REPORTS_DIR)
        .join(format!("run-{}", session.run_id()));
    let opts = RunOptions {
        jobs: args.jobs,
        batch_size: args.batch_size,
        report_dir: report_dir.clone(),
        config_sha256: pipeline::config_sha256(&config.file)?,
        dry_run: false,
        progress: !args.no_progress,
        known_rows: session.known_rows()?,
    };
    let result = pipeline::run(set, &mut ConfigSources { config }, sink, &opts);
    let retried = summary
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.retried))
        .unwrap_or(0);
    let (end, input_error) = match &result {
        Ok(report) => (
            RunEnd {
                row_errors: report.rows_rejected,
                retried,
                ..RunEnd::default()
            },
            None,
        ),
        Err(PipelineError::Sink(SinkError::Interrupted)) => (RunEnd::default(), None),
        Err(PipelineError::Sink(e)) => (
            RunEnd {
                fatal: Some(super::error_chain(e)),
                retried,
                ..RunEnd::default()
            },
            None,
        ),
        // The source or the report folder failed: nothing more can be read.
        Err(e) => (
            RunEnd {
                fatal: Some(super::error_chain(e)),
                ..RunEnd::default()
            },
            Some(Outcome::ConfigError),
        ),
    };
    let finished = session.finish(end)?;
    if let Ok(Some(s)) = summary.lock().map(|s| s.clone()) {
        eprintln!("{s}");
    }
    if let Ok(report) = &result {
        eprint!("{}", report.summary());
    }
    if let Err(e) = &result {
        eprintln!("error: {}", super::error_chain(e));
    }
    let c = &finished.counts;
    if c.missing > 0 {
        eprintln!(
            "{} records sent earlier are no longer in the source (the API cannot delete them); see the run report",
            c.missing
        );
    }
    if let Some(why) = &finished.stopped {
        eprintln!("run stopped: {why}");
    }
    // The target's answers and the rows that never reached it, side by side: "0 rejected" alone
    // read as if every row had gone through.
    let rows_rejected = result.as_ref().map_or(0, |r| r.rows_rejected);
    eprintln!(
        "run #{} {}: {} created, {} updated, {} unchanged, {} refused by the target, {} unknown; {} rows rejected before sending; report {}; rejects {}",
        finished.run_id,
        if result.is_ok() && finished.stopped.is_none() {
            "finished"
        } else {
            "ended early"
        },
        c.created,
        c.updated,
        c.unchanged,
        c.rejected,
        c.unknown,
        rows_rejected,
        finished.report.display(),
        report_dir.join("rejects.csv").display()
    );
    if let Some(store) = &prepared.sandbox_store {
        eprintln!(
            "the submitted resources are in the sandbox store {}: serve it with `fhirlift sandbox --db {}`, or export it with `--dump DIR`",
            store.display(),
            store.display()
        );
    }
    Ok(input_error.unwrap_or(finished.outcome))
}

/// How many resources the run would submit: the pipeline into a [`crate::sink::CountSink`], its
/// report and rejects in a temporary folder removed afterwards. `None` when that fails.
fn count_resources(args: &RunArgs, config: &PipelineConfig, set: &MappingSet) -> Option<u64> {
    let dir = tempfile::tempdir().ok()?;
    let opts = RunOptions {
        jobs: args.jobs,
        batch_size: args.batch_size,
        report_dir: dir.path().to_path_buf(),
        config_sha256: String::new(),
        dry_run: true,
        progress: false,
        known_rows: None,
    };
    let report = pipeline::run(
        set,
        &mut ConfigSources { config },
        Box::new(crate::sink::CountSink),
        &opts,
    )
    .ok()?;
    Some(report.resources.values().sum())
}
