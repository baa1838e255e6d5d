//! `fhirlift run`: loads the config and the mappings, picks the sink, and hands both to the
//! pipeline. Holds no pipeline logic: reading, mapping and ordering live in [`crate::pipeline`].

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::{CommandResult, Outcome};
use crate::config::PipelineConfig;
use crate::mapping::MappingSet;
use crate::pipeline::{self, ConfigSources, DEFAULT_BATCH, RunOptions};
use crate::sink::dry_run::{self, DryRunOptions, DryRunSink};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The pipeline config (TOML).
    pub config: PathBuf,
    /// Write what would be sent to files under --out instead of submitting: no network, no CRID
    /// call.
    #[arg(long)]
    pub dry_run: bool,
    /// Output folder of a dry run (created; a previous dry run's files there are replaced).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Worker threads for mapping (0: one per core). The output is the same for any value.
    #[arg(short, long, default_value_t = 0, value_name = "N")]
    pub jobs: usize,
    /// Also write the transaction Bundles (at most 50 entries each) under DIR/bundles.
    #[arg(long)]
    pub bundles: bool,
    /// Rows read and mapped per batch.
    #[arg(long, default_value_t = DEFAULT_BATCH, value_name = "ROWS")]
    pub batch_size: usize,
    /// No progress bar (it is never shown when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// The state directory: ledger, run reports, run lock, the embedded sandbox's store
    /// (default: the config's `state_dir`, or `.fhirlift` beside the config).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Send to this target instead of the config's.
    #[arg(long, value_enum)]
    pub target: Option<crate::config::TargetKind>,
    /// The target's base URL (overrides the config and the preset).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// The target's OAuth2 token URL (overrides the config and the preset).
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 8, value_name = "N")]
    pub concurrency: usize,
    /// Send resources in transaction Bundles of up to N entries (at most 50); 0 sends single
    /// requests.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub bundle_size: usize,
    /// Required to send to the production target.
    #[arg(long)]
    pub confirm_production: bool,
    /// Ignore what the ledger remembers: ask for every CRID again and check every resource
    /// against the server (unchanged ones are still not re-sent).
    #[arg(long)]
    pub full: bool,
    /// Re-submit only the records rejected by earlier runs (after the data was fixed).
    #[arg(long)]
    pub retry_rejected: bool,
    /// Stop the run once more than N resources were rejected (a broken mapping should not
    /// hammer the service).
    #[arg(long, value_name = "N")]
    pub max_rejects: Option<u64>,
}

/// Loads a pipeline config and its mappings, printing every problem found; `Err` is the exit
/// outcome to return.
pub fn load(path: &Path) -> Result<(PipelineConfig, MappingSet), Outcome> {
    let config = PipelineConfig::load(path).map_err(|problems| {
        for p in problems {
            eprintln!("error: {p}");
        }
        Outcome::ConfigError
    })?;
    let set = MappingSet::load(&config).map_err(|problems| {
        for p in problems {
            eprintln!("error: {p}");
        }
        Outcome::ConfigError
    })?;
    Ok((config, set))
}

pub fn run(args: RunArgs) -> CommandResult {
    let (config, set) = match load(&args.config) {
        Ok(x) => x,
        Err(outcome) => return Ok(outcome),
    };
    if !args.dry_run {
        return super::live::run_live(&args, &config, &set);
    }
    let Some(out) = args.out else {
        return Err("--dry-run needs --out DIR (the folder to write the files to)".into());
    };
    let config_sha256 = pipeline::config_sha256(&config.file)?;
    let sink = DryRunSink::create(
        &out,
        DryRunOptions {
            ccn: config.center.ccn.clone(),
            bundles: args.bundles,
        },
    )?;
    let opts = RunOptions {
        jobs: args.jobs,
        batch_size: args.batch_size,
        report_dir: out.clone(),
        config_sha256: config_sha256.clone(),
        dry_run: true,
        progress: !args.no_progress,
        known_rows: None,
    };
    let started = Instant::now();
    let report = pipeline::run(
        &set,
        &mut ConfigSources { config: &config },
        Box::new(sink),
        &opts,
    )?;
    dry_run::write_manifest(&out, &config_sha256, &report.resources)?;
    let secs = started.elapsed().as_secs_f64();
    eprint!("{}", report.summary());
    eprintln!(
        "dry run written to {} in {secs:.2}s ({:.0} rows/s); files hold patient data (mode 0600)",
        out.display(),
        report.rows_read as f64 / secs.max(1e-9)
    );
    Ok(if report.has_rejects() {
        Outcome::RowsRejected
    } else {
        Outcome::Success
    })
}
