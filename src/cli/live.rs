//! The submitting half of `fhirlift run`: resolves the target (starting the embedded sandbox when
//! it is the target), takes the state directory's run lock, builds the loader with the ledger
//! hooked in, runs the pipeline into it, and records the run (ledger row, JSON run report).
//!
//! Holds no pipeline or loader logic; it only puts the stages together and maps their results to
//! exit codes. Never prints credentials or row values.

use std::path::{Path, PathBuf};

use super::Outcome;
use super::run::RunArgs;
use crate::config::{GrantType, PipelineConfig, TargetKind};
use crate::ledger::{RunEnd, RunMode, RunSession, Scope, SessionOptions};
use crate::mapping::MappingSet;
use crate::pipeline::{self, ConfigSources, PipelineError, RunOptions};
use crate::sandbox::{SandboxConfig, SandboxHandle};
use crate::sink::SinkError;
use crate::sink::load::credentials::{Credentials, Secret};
use crate::sink::load::target::{self, Endpoints, TargetOverrides};
use crate::sink::load::{Auth, LedgerHook, Loader, LoaderConfig};

/// The embedded sandbox's store, inside the state directory.
pub const SANDBOX_STORE: &str = "sandbox.sqlite";

/// Submits: the whole of `run` without `--dry-run`.
pub fn run_live(args: &RunArgs, config: &PipelineConfig, set: &MappingSet) -> super::CommandResult {
    let state_dir = args.state.clone().unwrap_or_else(|| config.state_dir());
    let kind = args.target.unwrap_or(config.target.kind);
    let mode = match (args.full, args.retry_rejected) {
        (true, true) => return Err("--full and --retry-rejected exclude each other".into()),
        (true, false) => RunMode::Full,
        (false, true) => RunMode::RetryRejected,
        (false, false) => RunMode::Incremental,
    };
    // Everything that needs no lock and no network is checked first: a bad target or missing
    // credentials fail before anything is recorded.
    let remote = if kind == TargetKind::Sandbox {
        None
    } else {
        let endpoints = target::resolve(
            &config.target,
            &TargetOverrides {
                kind: Some(kind),
                base_url: args.base_url.clone(),
                token_url: args.token_url.clone(),
            },
        )?;
        let auth = match config.target.grant {
            GrantType::None => Auth::None,
            grant => Auth::OAuth {
                grant,
                credentials: Credentials::load(config.target.secrets_file.as_deref(), grant)?,
                scope: config.target.scope.clone(),
            },
        };
        Some((endpoints, auth))
    };

    let store = state_dir.join(SANDBOX_STORE);
    let scope_target = match &remote {
        // The embedded sandbox's port changes every run; its store does not.
        None => format!("sandbox:{}", absolute(&store).display()),
        Some((endpoints, _)) => endpoints.fhir_base.to_string(),
    };
    let scope = Scope::new(scope_target, config.center.ccn.clone());
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

    let (sink, summary) = match build_sink(args, config, &session, scope, remote, &store) {
        Ok(x) => x,
        Err(e) => {
            // The run was recorded as started: record how it ended too.
            let message = super::error_chain(&*e);
            session.finish(RunEnd {
                fatal: Some(message.clone()),
                ..RunEnd::default()
            })?;
            eprintln!("error: {message}");
            return Ok(Outcome::TargetError);
        }
    };

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
    };
    let result = pipeline::run(set, &mut ConfigSources { config }, sink, &opts);
    let retried = summary
        .lock()
        .ok()
        .and_then(|s| s.as_ref().map(|s| s.retried))
        .unwrap_or(0);
    let end = match &result {
        Ok(report) => RunEnd {
            row_errors: report.rows_rejected,
            retried,
            ..RunEnd::default()
        },
        Err(PipelineError::Sink(SinkError::Interrupted)) => RunEnd::default(),
        Err(PipelineError::Sink(e)) => RunEnd {
            fatal: Some(super::error_chain(e)),
            retried,
            ..RunEnd::default()
        },
        // The source or the report folder failed: nothing more can be read.
        Err(e) => RunEnd {
            fatal: Some(super::error_chain(e)),
            input_error: true,
            ..RunEnd::default()
        },
    };
    let finished = session.finish(end)?;
    if let Ok(Some(s)) = summary.lock().map(|s| s.clone()) {
        eprint!("{s}");
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
    eprintln!(
        "run #{} finished: {} created, {} updated, {} unchanged, {} rejected, {} unknown; report {}; rejects {}",
        finished.run_id,
        c.created,
        c.updated,
        c.unchanged,
        c.rejected,
        c.unknown,
        finished.report.display(),
        report_dir.join("rejects.csv").display()
    );
    Ok(finished.outcome)
}

type BuildResult = Result<
    (
        Box<dyn crate::sink::Sink>,
        std::sync::Arc<std::sync::Mutex<Option<crate::sink::load::summary::LoadSummary>>>,
    ),
    Box<dyn std::error::Error + Send + Sync>,
>;

/// The loader (with the embedded sandbox when it is the target), wrapped by the session.
fn build_sink(
    args: &RunArgs,
    config: &PipelineConfig,
    session: &RunSession,
    scope: Scope,
    remote: Option<(Endpoints, Auth)>,
    store: &Path,
) -> BuildResult {
    let (endpoints, auth, keep_alive) = match remote {
        Some((endpoints, auth)) => (endpoints, auth, None),
        None => {
            let sandbox = SandboxHandle::start(
                SandboxConfig {
                    db: Some(store.to_path_buf()),
                    ..SandboxConfig::default()
                },
                "127.0.0.1:0",
            )?;
            let account = SandboxConfig::default()
                .accounts
                .into_iter()
                .next()
                .unwrap_or_default();
            let base = url::Url::parse(&sandbox.base_url())?;
            let token = url::Url::parse(&sandbox.token_url())?;
            let auth = Auth::OAuth {
                grant: GrantType::Password,
                credentials: Credentials {
                    client_id: Secret::new(account.client_id.as_str()),
                    client_secret: Secret::new(account.client_secret.expose()),
                    username: Some(Secret::new(account.username.as_str())),
                    password: Some(Secret::new(account.password.expose())),
                },
                scope: account.scopes.first().cloned(),
            };
            (
                Endpoints::cibmtr(TargetKind::Sandbox, &base, Some(token)),
                auth,
                Some(Box::new(sandbox) as Box<dyn Send>),
            )
        }
    };
    let mut lc = LoaderConfig::new(endpoints, auth, &config.center.ccn);
    lc.crid = config.target.crid.clone();
    lc.uris = config.fhir.clone();
    lc.concurrency = args.concurrency;
    lc.bundle_size = args.bundle_size;
    lc.ca_bundle = config.target.ca_bundle.clone();
    lc.confirm_production = args.confirm_production || config.target.confirm_production;
    lc.progress = !args.no_progress;
    let hook = LedgerHook {
        ledger: session.ledger().clone(),
        scope,
    };
    let mut loader = Loader::new(lc, Some(hook), Some(session.stop().clone()))?;
    if let Some(k) = keep_alive {
        loader = loader.keep_alive(k);
    }
    let summary = loader.summary_handle();
    let sink = session.wrap(Box::new(loader))?;
    Ok((sink, summary))
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
