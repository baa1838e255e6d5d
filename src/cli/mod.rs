//! The command line: argument parsing and one file per command. Commands call into the library
//! stages and turn outcomes into the documented exit codes; they hold no pipeline logic.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod check;
pub mod inspect;
pub mod live;
pub mod render;
pub mod run;
pub mod sandbox;
pub mod status;
pub mod validate;

/// Exit codes, as documented in the README.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 0: everything was read, mapped and submitted (or written).
    Success = 0,
    /// 1: the run finished but some rows were rejected.
    RowsRejected = 1,
    /// 2: configuration, usage, input or template error; nothing was sent.
    ConfigError = 2,
    /// 3: authentication or target failure aborted the run.
    TargetError = 3,
    /// 4: another run holds the state directory's lock.
    Locked = 4,
    /// 130: interrupted (SIGINT/SIGTERM) and stopped gracefully.
    Interrupted = 130,
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        ExitCode::from(o as u8)
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "fhirlift",
    version,
    about = "Registry files in, CIBMTR FHIR submissions out"
)]
pub struct Cli {
    /// Write logs to this file instead of stderr.
    #[arg(long, global = true, value_name = "FILE")]
    pub log_file: Option<std::path::PathBuf>,
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show a file's rows exactly as the pipeline will see them.
    Inspect(inspect::InspectArgs),
    /// Check a pipeline config and its sources without touching the network.
    Validate(validate::ValidateArgs),
    /// Run the pipeline: read, map, validate, then write files (--dry-run) or submit.
    Run(run::RunArgs),
    /// Render one row through one mapping and show the context, resources and validation.
    Render(render::RenderArgs),
    /// Serve the local CIBMTR sandbox.
    Sandbox(sandbox::SandboxArgs),
    /// Ask the target what it supports and whether this config can work against it.
    Check(check::CheckArgs),
    /// Show the last runs, what they sent, what failed and what is pending.
    Status(status::StatusArgs),
}

/// Parses the command line, sets up logging and runs the command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = crate::logging::init(cli.verbose, cli.log_file.as_deref()) {
        eprintln!("error: {e}");
        return Outcome::ConfigError.into();
    }
    let outcome = match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Validate(a) => validate::run(a),
        Command::Run(a) => run::run(a),
        Command::Render(a) => render::run(a),
        Command::Sandbox(a) => sandbox::run(a),
        Command::Check(a) => check::run(a),
        Command::Status(a) => status::run(a),
    };
    match outcome {
        Ok(o) => o.into(),
        Err(e) => {
            eprintln!("error: {}", crate::cli::error_chain(&*e));
            Outcome::ConfigError.into()
        }
    }
}

/// A command's result: its exit outcome, or an error to print with its whole chain (exit 2).
pub type CommandResult = Result<Outcome, Box<dyn std::error::Error + Send + Sync>>;

/// Formats an error and its sources as `outer: inner: innermost`, skipping repeats.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}
