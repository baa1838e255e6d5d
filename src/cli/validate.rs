//! `fhirlift validate`: checks a pipeline config and everything it names, without touching the
//! network or writing anything. Every problem is reported, then the exit code is 0 (none) or 2.
//!
//! The checks are a list of steps feeding one [`Problems`] collector; a stage adds its checks as
//! another step here rather than printing or exiting on its own.

use std::path::PathBuf;

use super::{CommandResult, Outcome};
use crate::config::{PipelineConfig, Problems};

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {
    /// The pipeline file (TOML), e.g. samples/pipeline.toml.
    pub config: PathBuf,
}

pub fn run(args: ValidateArgs) -> CommandResult {
    let mut problems = Problems::new();
    let mut warnings = Vec::new();
    match PipelineConfig::load_unchecked(&args.config) {
        Err(e) => problems.push_error(&e),
        Ok(config) => check(&config, &mut problems, &mut warnings),
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if problems.is_empty() {
        match warnings.len() {
            0 => println!("{}: OK", args.config.display()),
            n => println!(
                "{}: OK, {n} warning{}",
                args.config.display(),
                if n == 1 { "" } else { "s" }
            ),
        }
        return Ok(Outcome::Success);
    }
    for p in problems.iter() {
        eprintln!("error: {p}");
    }
    eprintln!(
        "{}: {} problem{} found",
        args.config.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    Ok(Outcome::ConfigError)
}

/// Every check that needs the parsed config. Pure: reads files, never the network. Findings that
/// need not be mistakes go to `warnings`, as text.
pub fn check(config: &PipelineConfig, problems: &mut Problems, warnings: &mut Vec<String>) {
    for e in config.problems() {
        problems.push_error(&e);
    }
    crate::source::check_sources(config, problems);
    for mapping in &config.mappings {
        if !mapping.is_file() {
            problems.push_message(
                mapping.display().to_string(),
                "mapping file not found".to_string(),
            );
        }
    }
    if config.mappings.iter().all(|m| m.is_file()) {
        // The mappings, their templates and lookup tables; then every column a mapping names
        // (in its file or as `row.<column>` in a template) must be in its source's header.
        match crate::mapping::MappingSet::load(config) {
            Ok(set) => {
                let columns = set.check_columns(config);
                for e in &columns.errors {
                    problems.push_error(e);
                }
                warnings.extend(columns.warnings.iter().map(|w| crate::cli::error_chain(w)));
            }
            Err(errors) => {
                for e in errors {
                    problems.push_error(&e);
                }
            }
        }
    }
}
