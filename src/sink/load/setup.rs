//! From a pipeline config and the run's flags to a ready [`Loader`]: resolves the target (or
//! starts the embedded sandbox with its store in the state directory), loads credentials, and
//! refuses `production` without an explicit confirmation.
//!
//! It sends nothing: the first request is made by the loader (or by `check`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::credentials::{Credentials, CredentialsError, Secret};
use super::target::{self, Endpoints, TargetError, TargetOverrides};
use super::{Auth, LedgerHook, LoadError, Loader, LoaderConfig};
use crate::config::{CridMode, GrantType, PipelineConfig, TargetKind};
use crate::ledger::{Ledger, Scope, StopSignal};
use crate::sandbox::{Account, SandboxConfig, SandboxError, SandboxHandle};

/// The embedded sandbox's store, inside the state directory.
pub const SANDBOX_STORE: &str = "sandbox.sqlite";

/// The run's flags that shape the load (the command line's `--target`, `--state`, …).
#[derive(Clone, Debug)]
pub struct LoadFlags {
    pub overrides: TargetOverrides,
    /// Overrides the config's state directory.
    pub state_dir: Option<PathBuf>,
    pub confirm_production: bool,
    pub concurrency: usize,
    pub bundle_size: usize,
    pub progress: bool,
}

impl Default for LoadFlags {
    fn default() -> Self {
        LoadFlags {
            overrides: TargetOverrides::default(),
            state_dir: None,
            confirm_production: false,
            concurrency: 8,
            bundle_size: 0,
            progress: false,
        }
    }
}

/// Why the loader could not be set up. Nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("cannot start the embedded sandbox")]
    Sandbox(#[from] SandboxError),
    #[error(
        "refusing to send {} for center {ccn} to production without --confirm-production (or target.confirm_production = true); rehearse with --target production-test first",
        match .resources { Some(n) => format!("{n} resources"), None => "data".to_string() }
    )]
    ProductionNotConfirmed {
        ccn: String,
        /// What the run would send, when the sources were mapped to count it.
        resources: Option<u64>,
    },
    #[error(
        "target.crid.mode = \"service\" needs a CIBMTR-style target; a generic FHIR server (kind = \"fhir\") takes mode \"column\" or \"none\""
    )]
    CridModeForFhir,
}

/// A loader ready to run, and what to tell the user about it.
pub struct Prepared {
    pub loader: Loader,
    /// Where the data goes, in words (`embedded sandbox at http://127.0.0.1:PORT`).
    pub description: String,
    /// The ledger scope of this target and center.
    pub scope: Scope,
    pub state_dir: PathBuf,
    /// The embedded sandbox's store, when the target is the sandbox.
    pub sandbox_store: Option<PathBuf>,
}

/// The state directory of a run: `--state`, else the config's.
pub fn state_dir(config: &PipelineConfig, flags: &LoadFlags) -> PathBuf {
    flags
        .state_dir
        .clone()
        .unwrap_or_else(|| config.state_dir())
}

/// The checks that need no network, no lock and no file: production confirmation, CRID mode,
/// target URLs and credentials. `run` calls it before taking the state directory's lock.
pub fn precheck(config: &PipelineConfig, flags: &LoadFlags) -> Result<(), SetupError> {
    remote(config, flags).map(|_| ())
}

/// The ledger scope of the target and center: the FHIR base URL, or for the embedded sandbox
/// (whose port changes every run) its store.
pub fn scope(config: &PipelineConfig, flags: &LoadFlags) -> Result<Scope, SetupError> {
    let target = match remote(config, flags)? {
        Some((endpoints, _)) => endpoints.fhir_base.to_string(),
        None => format!(
            "sandbox:{}",
            absolute(&sandbox_store(config, flags)).display()
        ),
    };
    Ok(Scope::new(target, config.center.ccn.clone()))
}

fn sandbox_store(config: &PipelineConfig, flags: &LoadFlags) -> PathBuf {
    state_dir(config, flags).join(SANDBOX_STORE)
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The endpoints and authentication of a non-sandbox target (`None` for the sandbox), after the
/// checks every run must pass.
fn remote(
    config: &PipelineConfig,
    flags: &LoadFlags,
) -> Result<Option<(Endpoints, Auth)>, SetupError> {
    let kind = flags.overrides.kind.unwrap_or(config.target.kind);
    let confirmed = flags.confirm_production || config.target.confirm_production;
    if kind == TargetKind::Production && !confirmed {
        return Err(SetupError::ProductionNotConfirmed {
            ccn: config.center.ccn.clone(),
            resources: None,
        });
    }
    if kind == TargetKind::Fhir && config.target.crid == CridMode::Service {
        return Err(SetupError::CridModeForFhir);
    }
    if kind == TargetKind::Sandbox {
        return Ok(None);
    }
    let endpoints = target::resolve(&config.target, &flags.overrides)?;
    let auth = match config.target.grant {
        GrantType::None => Auth::None,
        grant => Auth::OAuth {
            grant,
            credentials: Credentials::load(config.target.secrets_file.as_deref(), grant)?,
            scope: Some(
                config
                    .target
                    .scope
                    .clone()
                    .unwrap_or_else(|| crate::config::DEFAULT_SCOPE.to_string()),
            ),
        },
    };
    Ok(Some((endpoints, auth)))
}

/// Builds the loader for `config` and `flags`. For the `sandbox` target this starts the embedded
/// sandbox on an ephemeral loopback port with its store in the state directory (it lives as long
/// as the loader). Sends nothing.
pub fn prepare(
    config: &PipelineConfig,
    flags: &LoadFlags,
    ledger: Option<Arc<Ledger>>,
    stop: Option<StopSignal>,
) -> Result<Prepared, SetupError> {
    let kind = flags.overrides.kind.unwrap_or(config.target.kind);
    let state = state_dir(config, flags);
    let scope = scope(config, flags)?;
    let (endpoints, auth, description, keepalive, store) = match remote(config, flags)? {
        Some((endpoints, auth)) => {
            let description = format!("{} ({})", target::kind_name(kind), endpoints.fhir_base);
            (endpoints, auth, description, None, None)
        }
        None => {
            std::fs::create_dir_all(&state)
                .map_err(|e| SetupError::Sandbox(SandboxError::Runtime(e)))?;
            let store = sandbox_store(config, flags);
            let account = Account {
                ccns: vec![config.center.ccn.clone()],
                ..Account::default()
            };
            let sandbox = SandboxHandle::start(
                SandboxConfig {
                    accounts: vec![account.clone()],
                    db: Some(store.clone()),
                    ..SandboxConfig::default()
                },
                "127.0.0.1:0",
            )?;
            let base = target::checked_url("sandbox URL", &sandbox.base_url())?;
            let token = target::checked_url("sandbox token URL", &sandbox.token_url())?;
            let endpoints = Endpoints::cibmtr(TargetKind::Sandbox, &base, Some(token));
            // The embedded sandbox has one account: its documented demo account.
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
            let description = format!(
                "the embedded sandbox at {} (store {})",
                sandbox.base_url(),
                store.display()
            );
            let keep: Box<dyn Send> = Box::new(sandbox);
            (endpoints, auth, description, Some(keep), Some(store))
        }
    };
    let mut lc = LoaderConfig::new(endpoints, auth, &config.center.ccn);
    lc.target_label = description.clone();
    lc.crid = config.target.crid.clone();
    lc.uris = config.fhir.clone();
    lc.concurrency = flags.concurrency;
    lc.bundle_size = flags.bundle_size;
    lc.ca_bundle = config.target.ca_bundle.clone();
    lc.confirm_production = flags.confirm_production || config.target.confirm_production;
    lc.progress = flags.progress;
    lc.timeout = Duration::from_secs(120);
    let hook = ledger.map(|ledger| LedgerHook {
        ledger,
        scope: scope.clone(),
    });
    let mut loader = Loader::new(lc, hook, stop)?;
    if let Some(k) = keepalive {
        loader = loader.keep_alive(k);
    }
    Ok(Prepared {
        loader,
        description,
        scope,
        state_dir: state,
        sandbox_store: store,
    })
}
