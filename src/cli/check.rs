//! `fhirlift check`: gets a token, reads the target's CapabilityStatement and says whether this
//! configuration can work against it. Sends no data (no CRID request, no resource).

use std::path::PathBuf;

use super::{CommandResult, Outcome};
use crate::config::{CridMode, PipelineConfig, TargetKind};
use crate::mapping::spec::MappingSpec;
use crate::sink::load::capability;
use crate::sink::load::setup::{self, LoadFlags, SetupError};
use crate::sink::load::target::TargetOverrides;

/// Where to send: flags shared by `run` and `check`; each overrides the config's `[target]`.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct TargetArgs {
    /// The target: sandbox (embedded, the default), test, production-test, production, custom, fhir.
    #[arg(long, value_enum)]
    pub target: Option<TargetKind>,
    /// Base URL of a custom or generic FHIR target (overrides target.base_url).
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Token endpoint of a custom target (overrides target.token_url).
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,
    /// State directory: ledger, reports, the embedded sandbox's store (default: .fhirlift beside
    /// the config).
    #[arg(long = "state", value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Required to send to production.
    #[arg(long)]
    pub confirm_production: bool,
}

impl TargetArgs {
    pub fn flags(&self) -> LoadFlags {
        LoadFlags {
            overrides: TargetOverrides {
                kind: self.target,
                base_url: self.base_url.clone(),
                token_url: self.token_url.clone(),
            },
            state_dir: self.state.clone(),
            confirm_production: self.confirm_production,
            ..LoadFlags::default()
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The pipeline config (TOML).
    pub config: PathBuf,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Check for transaction Bundles of this size too.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub bundle_size: usize,
}

pub fn run(args: CheckArgs) -> CommandResult {
    let config = match PipelineConfig::load(&args.config) {
        Ok(c) => c,
        Err(problems) => {
            for p in &problems {
                eprintln!("error: {p}");
            }
            return Ok(Outcome::ConfigError);
        }
    };
    let mut flags = args.target.flags();
    flags.bundle_size = args.bundle_size;
    // Checking production sends nothing, so it needs no confirmation.
    flags.confirm_production = true;
    let prepared = match setup::prepare(&config, &flags, None, None) {
        Ok(p) => p,
        Err(e @ SetupError::Sandbox(_)) => {
            eprintln!("error: {}", super::error_chain(&e));
            return Ok(Outcome::TargetError);
        }
        Err(e) => {
            eprintln!("error: {}", super::error_chain(&e));
            return Ok(Outcome::ConfigError);
        }
    };
    println!("Target: {}", prepared.description);
    let loader = &prepared.loader;
    if let Err(e) = loader.authenticate() {
        println!("  NO  token: {}", super::error_chain(&e));
        return Ok(Outcome::TargetError);
    }
    if loader.config().endpoints.token_url.is_some() {
        println!("  ok  token obtained");
    } else {
        println!("  ok  no authentication configured");
    }
    let reply = match loader.block_on(loader.fhir().capabilities()) {
        Ok(r) if r.status == 200 => r,
        Ok(r) => {
            println!("  NO  GET metadata answered HTTP {}", r.status);
            return Ok(Outcome::TargetError);
        }
        Err(e) => {
            println!("  NO  GET metadata: {}", super::error_chain(&e));
            return Ok(Outcome::TargetError);
        }
    };
    let statement: serde_json::Value = match serde_json::from_slice(&reply.body) {
        Ok(v) => v,
        Err(_) => {
            println!("  NO  the CapabilityStatement is not JSON");
            return Ok(Outcome::TargetError);
        }
    };
    let types = resource_types(&config);
    let by_crid = config.target.crid != CridMode::None;
    let a = capability::assess(&statement, &types, by_crid, args.bundle_size > 1);
    println!("Server: {}, FHIR {}", a.software, a.fhir_version);
    for f in &a.findings {
        println!("{f}");
    }
    match (
        &config.target.crid,
        loader.config().endpoints.crid_url.as_ref(),
    ) {
        (CridMode::Service, Some(url)) => println!(
            "  --  CRID service {url}: not called (it needs patient demographics; check sends no data)"
        ),
        (CridMode::Column { column }, _) => println!("  ok  CRIDs from column {column:?}"),
        _ => println!("  ok  no CRIDs (generic FHIR server)"),
    }
    if a.can_work() {
        println!("This configuration can work against this target.");
        Ok(Outcome::Success)
    } else {
        println!("This configuration cannot work against this target as it is (see NO above).");
        Ok(Outcome::TargetError)
    }
}

/// The resource types the config's mappings produce (Patient always).
fn resource_types(config: &PipelineConfig) -> Vec<String> {
    let mut types = vec!["Patient".to_string()];
    for path in &config.mappings {
        if let Ok(spec) = MappingSpec::load(path)
            && !types.contains(&spec.resource_type)
        {
            types.push(spec.resource_type);
        }
    }
    if types.len() == 1 {
        types.push("Observation".into());
    }
    types
}
