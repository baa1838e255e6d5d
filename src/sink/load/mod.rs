//! The loader: the sink that submits mapped resources to a target, following the API contract step
//! by step — OAuth2 token, `PUT /CRID` per patient, the Patient (searched by CRID, created only
//! when absent), then the patient's other resources (searched by business identifier before any
//! create, or sent in transaction Bundles).
//!
//! Patients are processed in parallel; a patient's Patient always before its other resources; at
//! most `concurrency` requests are in flight. Every row ends with one outcome. A failure of the
//! target as a whole (authentication, unreachable) stops the run; a failure of one row does not.
//!
//! It must not log resource content, demographics, tokens or secrets above TRACE, retry outside
//! [`retry`], or create anything without first ruling out that an earlier attempt already did.

pub mod capability;
pub mod credentials;
pub mod crid;
pub mod fhir;
pub mod http;
pub mod retry;
pub mod setup;
pub mod summary;
pub mod synthetic;
pub mod target;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use self::credentials::Credentials;
use self::crid::{CridAssigner, CridError, CridOutcome};
use self::fhir::{FatalError, FhirClient, OnMatch, Query, Upserted};
use self::http::{CallError, Transport};
use self::retry::RetryPolicy;
use self::summary::LoadSummary;
use self::target::Endpoints;
use self::token::{AuthError, TokenManager};
use crate::config::{CridMode, FhirUris, GrantType, TargetKind};
use crate::ledger::{Ledger, Scope, StopSignal, content_hash, demographics_hash};
use crate::resource::{MappedPatient, MappedResource, patient_placeholder};
use crate::sink::{OutcomeStatus, RowOutcome, Sink, SinkError};

/// The most entries a transaction Bundle may carry (the service times out above it).
pub const MAX_BUNDLE_SIZE: usize = 50;

/// How the loader authenticates.
#[derive(Clone, Debug)]
pub enum Auth {
    /// No `Authorization` header (generic FHIR servers that need none).
    None,
    OAuth {
        grant: GrantType,
        credentials: Credentials,
        scope: Option<String>,
    },
}

/// Everything the loader needs to know about the target and the run.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub endpoints: Endpoints,
    /// How the target is named in the summary and the ledger scope.
    pub target_label: String,
    pub auth: Auth,
    pub crid: CridMode,
    pub ccn: String,
    pub uris: FhirUris,
    /// Requests in flight at most.
    pub concurrency: usize,
    /// Entries per transaction Bundle; 0 or 1 sends single requests.
    pub bundle_size: usize,
    pub retry: RetryPolicy,
    /// Per-request timeout.
    pub timeout: Duration,
    pub ca_bundle: Option<std::path::PathBuf>,
    /// Required to send anything to `production`.
    pub confirm_production: bool,
    /// Draw a progress bar on stderr (only shown on a terminal).
    pub progress: bool,
}

impl LoaderConfig {
    /// Defaults for everything but the target.
    pub fn new(endpoints: Endpoints, auth: Auth, ccn: &str) -> LoaderConfig {
        LoaderConfig {
            target_label: endpoints.fhir_base.to_string(),
            endpoints,
            auth,
            crid: CridMode::Service,
            ccn: ccn.to_string(),
            uris: FhirUris::default(),
            concurrency: 8,
            bundle_size: 0,
            retry: RetryPolicy::default(),
            timeout: Duration::from_secs(60),
            ca_bundle: None,
            confirm_production: false,
            progress: false,
        }
    }
}

/// The loader cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Client(#[from] http::ClientError),
    #[error("cannot start the loader's runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "--bundle-size {0} is out of range: 1 to {MAX_BUNDLE_SIZE} (0 or 1 for single requests)"
    )]
    BundleSize(usize),
    #[error("--concurrency must be at least 1")]
    Concurrency,
    #[error(
        "target {0}: the CRID service mode needs a CIBMTR-style target; use crid.mode = \"column\" or \"none\""
    )]
    NoCridService(String),
    #[error("target {kind} needs a token URL for authentication")]
    NoTokenUrl { kind: String },
}

/// The ledger the loader consults before each send and writes after each confirmation.
#[derive(Clone)]
pub struct LedgerHook {
    pub ledger: Arc<Ledger>,
    pub scope: Scope,
}

/// The loader sink. Collects the pipeline's patients and resources, then submits them in
/// [`Sink::finish`] on its own tokio runtime.
pub struct Loader {
    rt: tokio::runtime::Runtime,
    config: LoaderConfig,
    transport: Arc<Transport>,
    fhir: Arc<FhirClient>,
    crid: Arc<dyn CridAssigner>,
    ledger: Option<LedgerHook>,
    stop: StopSignal,
    patients: Vec<MappedPatient>,
    resources: Vec<MappedResource>,
    summary: Arc<Mutex<Option<LoadSummary>>>,
    /// Keeps an embedded server (the sandbox) alive as long as the loader.
    _keepalive: Option<Box<dyn Send>>,
}

impl Loader {
    pub fn new(
        config: LoaderConfig,
        ledger: Option<LedgerHook>,
        stop: Option<StopSignal>,
    ) -> Result<Loader, LoadError> {
        if config.bundle_size > MAX_BUNDLE_SIZE {
            return Err(LoadError::BundleSize(config.bundle_size));
        }
        if config.concurrency == 0 {
            return Err(LoadError::Concurrency);
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fhirlift-load")
            .enable_all()
            .build()
            .map_err(LoadError::Runtime)?;
        let client = http::build_client(
            config.ca_bundle.as_deref(),
            config.timeout,
            config.concurrency,
        )?;
        let token =
            match &config.auth {
                Auth::None => None,
                Auth::OAuth {
                    grant,
                    credentials,
                    scope,
                } => {
                    let url = config.endpoints.token_url.clone().ok_or_else(|| {
                        LoadError::NoTokenUrl {
                            kind: target::kind_name(config.endpoints.kind).into(),
                        }
                    })?;
                    Some(Arc::new(TokenManager::new(
                        client.clone(),
                        url,
                        *grant,
                        credentials.clone(),
                        scope.clone(),
                        config.retry.clone(),
                    )))
                }
            };
        let transport = Arc::new(Transport::new(
            client,
            token,
            config.retry.clone(),
            config.concurrency,
        ));
        let fhir = Arc::new(FhirClient::new(
            transport.clone(),
            config.endpoints.fhir_base.clone(),
        ));
        let crid: Arc<dyn CridAssigner> = match &config.crid {
            CridMode::Service => {
                let url = config.endpoints.crid_url.clone().ok_or_else(|| {
                    LoadError::NoCridService(target::kind_name(config.endpoints.kind).into())
                })?;
                Arc::new(crid::CridService {
                    transport: transport.clone(),
                    url,
                    ccn: config.ccn.clone(),
                })
            }
            CridMode::Column { .. } => Arc::new(crid::ColumnCrid),
            CridMode::None => Arc::new(crid::NoCrid),
        };
        Ok(Loader {
            rt,
            config,
            transport,
            fhir,
            crid,
            ledger,
            stop: stop.unwrap_or_default(),
            patients: Vec::new(),
            resources: Vec::new(),
            summary: Arc::new(Mutex::new(None)),
            _keepalive: None,
        })
    }

    /// Keeps `value` (e.g. an embedded server's handle) alive until the loader is dropped.
    pub fn keep_alive(mut self, value: Box<dyn Send>) -> Loader {
        self._keepalive = Some(value);
        self
    }

    /// Where the summary appears once [`Sink::finish`] has run.
    pub fn summary_handle(&self) -> Arc<Mutex<Option<LoadSummary>>> {
        self.summary.clone()
    }

    /// Gets a token now, so that bad credentials fail before anything else happens.
    pub fn authenticate(&self) -> Result<(), AuthError> {
        match self.transport.token() {
            Some(t) => self.rt.block_on(t.bearer()).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Runs `f` on the loader's runtime (for `check`, which reads the CapabilityStatement).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn fhir(&self) -> &Arc<FhirClient> {
        &self.fhir
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.config
    }
}

impl Sink for Loader {
    // Everything is settled in `finish`: a patient's resources arrive after all patients, and
    // the Patient must exist on the server before them.
    fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError> {
        self.patients.extend(batch);
        Ok(Vec::new())
    }

    fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError> {
        self.resources.extend(batch);
        Ok(Vec::new())
    }

    fn finish(self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError> {
        let this = *self;
        let total = this.patients.len() + this.resources.len();
        if this.config.endpoints.kind == TargetKind::Production {
            if !this.config.confirm_production {
                return Err(SinkError::Target(format!(
                    "refusing to send {total} resources for center {} to production without --confirm-production (or target.confirm_production = true)",
                    this.config.ccn
                )));
            }
            eprintln!(
                "Sending {total} resources for center {} to production.",
                this.config.ccn
            );
        }
        let started = Instant::now();
        tracing::info!(
            target = %this.config.target_label,
            patients = this.patients.len(),
            resources = this.resources.len(),
            concurrency = this.config.concurrency,
            bundle_size = this.config.bundle_size,
            "Load started."
        );
        let progress = if this.config.progress {
            let bar =
                ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "{spinner} {bar:40} {pos}/{len} resources ({per_sec}, {eta} left)",
            ) {
                bar.set_style(style);
            }
            bar
        } else {
            ProgressBar::hidden()
        };
        let shared = Arc::new(Shared {
            fhir: this.fhir.clone(),
            crid: this.crid.clone(),
            ledger: this.ledger.clone(),
            uris: this.config.uris.clone(),
            security_code: format!("rc_{}", this.config.ccn),
            bundle_size: this.config.bundle_size,
            patient_slots: Semaphore::new(this.config.concurrency),
            fatal: Mutex::new(None),
            stop: this.stop.clone(),
            progress: progress.clone(),
            packer: Mutex::new(Packer::default()),
            crids: Mutex::new(Default::default()),
            postponed: Mutex::new(Vec::new()),
        });
        let patients = this.patients;
        let resources = this.resources;
        let auth = match this.transport.token() {
            Some(t) => this.rt.block_on(t.bearer()).map(|_| ()),
            None => Ok(()),
        };
        if let Err(e) = auth {
            return Err(SinkError::Auth(crate::cli::error_chain(&e)));
        }
        let outcomes = this
            .rt
            .block_on(run_all(shared.clone(), patients, resources));
        progress.finish_and_clear();
        if let Some(fatal) = shared.fatal.lock().ok().and_then(|mut f| f.take()) {
            return Err(match fatal {
                Fatal::Auth(e) => SinkError::Auth(crate::cli::error_chain(&e)),
                other => SinkError::Target(crate::cli::error_chain(&other)),
            });
        }
        let mut summary = LoadSummary::from_outcomes(&this.config.target_label, &outcomes);
        summary.requests = this.transport.stats.requests();
        summary.retried = this.transport.stats.retries();
        summary.token_requests = this.transport.token().map_or(0, |t| t.requests());
        summary.latency = this.transport.stats.percentiles();
        summary.elapsed = started.elapsed();
        tracing::info!(
            created = summary.created,
            updated = summary.updated,
            unchanged = summary.unchanged,
            rejected = summary.rejected,
            requests = summary.requests,
            "Load finished."
        );
        if let Ok(mut s) = this.summary.lock() {
            *s = Some(summary);
        }
        Ok(outcomes)
    }
}

/// A failure that stops every worker.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error(transparent)]
    Auth(AuthError),
    #[error("{0}")]
    Target(String),
    #[error("ledger: {0}")]
    Ledger(String),
}

impl From<FatalError> for Fatal {
    fn from(e: FatalError) -> Fatal {
        match e {
            FatalError::Auth(a) => Fatal::Auth(a),
            FatalError::Unreachable(c) => Fatal::Target(format!("target unreachable: {c}")),
        }
    }
}

impl From<CridError> for Fatal {
    fn from(e: CridError) -> Fatal {
        match e {
            CridError::Auth(a) => Fatal::Auth(a),
            other => Fatal::Target(crate::cli::error_chain(&other)),
        }
    }
}

struct Shared {
    fhir: Arc<FhirClient>,
    crid: Arc<dyn CridAssigner>,
    ledger: Option<LedgerHook>,
    uris: FhirUris,
    security_code: String,
    bundle_size: usize,
    /// Patients whose Patient step runs at once (their requests still share the transport's
    /// limit); keeps early patients' resources flowing instead of every CRID request first.
    patient_slots: Semaphore,
    fatal: Mutex<Option<Fatal>>,
    stop: StopSignal,
    progress: ProgressBar,
    /// New patients with their resources, waiting to fill a transaction Bundle.
    packer: Mutex<Packer>,
    /// CRIDs a patient of this run already stands for.
    crids: Mutex<std::collections::HashSet<String>>,
    /// Patients whose CRID another patient of this run already stands for.
    postponed: Mutex<Vec<PatientJob>>,
}

/// Groups collected for the next Bundle, and their entry count.
#[derive(Default)]
struct Packer {
    groups: Vec<Group>,
    entries: usize,
}

impl Shared {
    /// Claims a CRID for the calling patient; `false` when another patient of this run has it.
    fn claim_crid(&self, crid: &str) -> bool {
        self.crids
            .lock()
            .map(|mut c| c.insert(crid.to_string()))
            .unwrap_or(true)
    }

    /// Adds a group; when it would overflow the Bundle, returns the groups collected so far
    /// (to be sent by the caller) and starts a new Bundle with this group.
    fn pack(&self, group: Group) -> Option<Vec<Group>> {
        let Ok(mut p) = self.packer.lock() else {
            return Some(vec![group]);
        };
        let size = group.items.len() + 1;
        let full = if p.entries + size > self.bundle_size {
            p.entries = 0;
            Some(std::mem::take(&mut p.groups))
        } else {
            None
        };
        p.entries += size;
        p.groups.push(group);
        full.filter(|g| !g.is_empty())
    }

    fn halted(&self) -> bool {
        self.stop.is_stopped() || self.fatal.lock().map_or(true, |f| f.is_some())
    }

    fn set_fatal(&self, e: Fatal) {
        if let Ok(mut f) = self.fatal.lock()
            && f.is_none()
        {
            tracing::error!(error = %e, "Load aborted.");
            *f = Some(e);
        }
    }

    fn ledger_err(&self, e: crate::ledger::LedgerError) {
        self.set_fatal(Fatal::Ledger(crate::cli::error_chain(&e)));
    }
}

/// One patient and everything that refers to it.
struct PatientJob {
    index: usize,
    patient: MappedPatient,
    resources: Vec<(usize, MappedResource)>,
}

/// Output slot index plus outcome.
type Indexed = (usize, RowOutcome);

async fn run_all(
    shared: Arc<Shared>,
    patients: Vec<MappedPatient>,
    resources: Vec<MappedResource>,
) -> Vec<RowOutcome> {
    let n_patients = patients.len();
    let total = n_patients + resources.len();
    let mut out: Vec<Option<RowOutcome>> = vec![None; total];
    let mut jobs: Vec<PatientJob> = Vec::with_capacity(n_patients);
    let mut by_key: HashMap<String, usize> = HashMap::new();
    for (i, p) in patients.into_iter().enumerate() {
        if let Some(&first) = by_key.get(&p.resource.patient_key) {
            let first_loc = jobs[first].patient.resource.location.to_string();
            out[i] = Some(rejected(
                &p.resource,
                format!("the same patient key as the patient at {first_loc}"),
                None,
                0,
            ));
            continue;
        }
        by_key.insert(p.resource.patient_key.clone(), jobs.len());
        jobs.push(PatientJob {
            index: i,
            patient: p,
            resources: Vec::new(),
        });
    }
    let mut seen: HashMap<(String, String, String), String> = HashMap::new();
    for (j, r) in resources.into_iter().enumerate() {
        let i = n_patients + j;
        let key = (
            r.resource_type.clone(),
            r.identifier.system.clone(),
            r.identifier.value.clone(),
        );
        if let Some(first) = seen.get(&key) {
            out[i] = Some(rejected(
                &r,
                format!("the same business identifier as the resource at {first}"),
                None,
                0,
            ));
            continue;
        }
        seen.insert(key, r.location.to_string());
        match by_key.get(&r.patient_key) {
            Some(&job) => jobs[job].resources.push((i, r)),
            None => {
                out[i] = Some(rejected(
                    &r,
                    "no Patient was mapped for this resource's patient key".into(),
                    None,
                    0,
                ))
            }
        }
    }
    shared
        .progress
        .inc(out.iter().filter(|o| o.is_some()).count() as u64);

    load_patients(&shared, jobs, false, &mut out).await;
    let rest = shared
        .packer
        .lock()
        .map(|mut p| std::mem::take(&mut p.groups));
    if let Ok(rest) = rest
        && !rest.is_empty()
    {
        for (i, o) in send_groups(&shared, rest).await {
            out[i] = Some(o);
        }
    }
    // Patients sharing a CRID with an earlier one: that Patient exists now; find and reuse it.
    let postponed = shared
        .postponed
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default();
    load_patients(&shared, postponed, true, &mut out).await;
    out.into_iter()
        .map(|o| {
            o.unwrap_or_else(|| RowOutcome {
                location: crate::source::RowLocation {
                    file: "".into(),
                    sheet: None,
                    row: 0,
                },
                resource_type: String::new(),
                identifier: None,
                status: OutcomeStatus::Unknown,
                server_id: None,
                http_status: None,
                attempts: 0,
                message: Some("lost by the loader".into()),
            })
        })
        .collect()
}

/// The outcome of a row that was not attempted because the run stopped.
fn not_sent(r: &MappedResource) -> RowOutcome {
    RowOutcome {
        location: r.location.clone(),
        resource_type: r.resource_type.clone(),
        identifier: Some(r.identifier.clone()),
        status: OutcomeStatus::Unknown,
        server_id: None,
        http_status: None,
        attempts: 0,
        message: Some("not sent: the run stopped first".into()),
    }
}

fn rejected(r: &MappedResource, message: String, http: Option<u16>, attempts: u32) -> RowOutcome {
    RowOutcome {
        location: r.location.clone(),
        resource_type: r.resource_type.clone(),
        identifier: Some(r.identifier.clone()),
        status: OutcomeStatus::Rejected,
        server_id: None,
        http_status: http,
        attempts,
        message: Some(message),
    }
}

fn outcome_of(r: &MappedResource, up: &Upserted) -> RowOutcome {
    let (status, http, attempts, message) = match up {
        Upserted::Created {
            status, attempts, ..
        } => (OutcomeStatus::Created, Some(*status), *attempts, None),
        Upserted::Updated {
            status, attempts, ..
        } => (OutcomeStatus::Updated, Some(*status), *attempts, None),
        Upserted::Unchanged { attempts, .. } => (OutcomeStatus::Unchanged, None, *attempts, None),
        Upserted::Rejected {
            status,
            message,
            attempts,
        } => (
            OutcomeStatus::Rejected,
            *status,
            *attempts,
            Some(message.clone()),
        ),
        Upserted::Unknown { message, attempts } => (
            OutcomeStatus::Unknown,
            None,
            *attempts,
            Some(message.clone()),
        ),
    };
    RowOutcome {
        location: r.location.clone(),
        resource_type: r.resource_type.clone(),
        identifier: Some(r.identifier.clone()),
        status,
        server_id: up.server_id().map(str::to_string),
        http_status: http,
        attempts,
        message,
    }
}

/// The ledger's record key for a resource: its business identifier value.
fn record_key(r: &MappedResource) -> &str {
    &r.identifier.value
}

/// Writes a row's result to the ledger (confirmed, refused, or unconfirmed).
fn ledger_after(shared: &Shared, r: &MappedResource, hash: &str, up: &Upserted) {
    let Some(h) = &shared.ledger else { return };
    let key = record_key(r);
    let res = match up {
        Upserted::Created { id, .. } => h.ledger.record_sent(
            &h.scope,
            &r.resource_type,
            key,
            hash,
            id,
            OutcomeStatus::Created,
        ),
        Upserted::Updated { id, .. } => h.ledger.record_sent(
            &h.scope,
            &r.resource_type,
            key,
            hash,
            id,
            OutcomeStatus::Updated,
        ),
        Upserted::Unchanged { id, .. } => h.ledger.record_sent(
            &h.scope,
            &r.resource_type,
            key,
            hash,
            id,
            OutcomeStatus::Unchanged,
        ),
        Upserted::Rejected { message, .. } => h.ledger.record_reject(
            &h.scope,
            &r.resource_type,
            key,
            &r.location.to_string(),
            message,
        ),
        Upserted::Unknown { .. } => h.ledger.record_unknown(&h.scope, &r.resource_type, key),
    };
    if let Err(e) = res {
        shared.ledger_err(e);
    }
}

/// What the ledger says before a send: skip, update at a known id, or search.
enum Plan {
    Skip(String),
    UpdateAt(String),
    Search { known: bool },
}

fn plan(shared: &Shared, r: &MappedResource, hash: &str) -> Plan {
    let Some(h) = &shared.ledger else {
        return Plan::Search { known: false };
    };
    let known = match h.ledger.known(&h.scope, &r.resource_type, record_key(r)) {
        Ok(k) => k,
        Err(e) => {
            shared.ledger_err(e);
            return Plan::Search { known: true };
        }
    };
    let planned = match &known {
        Some(k) if k.is_unchanged(hash) => {
            return Plan::Skip(k.server_id.clone().unwrap_or_default());
        }
        Some(k) => match k.confirmed_server_id() {
            Some(id) => Plan::UpdateAt(id.to_string()),
            None => Plan::Search { known: true },
        },
        None => Plan::Search { known: false },
    };
    if let Err(e) = h
        .ledger
        .record_pending(&h.scope, &r.resource_type, record_key(r), hash)
    {
        shared.ledger_err(e);
    }
    planned
}

/// Submits one resource: the ledger's plan, then update, or search-then-write.
async fn submit_one(
    shared: &Shared,
    r: &MappedResource,
    body: &Value,
    hash: &str,
    query: &Query,
    nothing_can_exist: bool,
    on_match: OnMatch,
) -> Result<Upserted, FatalError> {
    let up = match plan(shared, r, hash) {
        Plan::Skip(id) => Upserted::Unchanged { id, attempts: 0 },
        Plan::UpdateAt(id) => {
            let up = shared.fhir.update(&r.resource_type, &id, body, 0).await?;
            match up {
                // Gone from the server (deleted by hand): find or create it again.
                Upserted::Rejected {
                    status: Some(404 | 410),
                    attempts,
                    ..
                } => add_attempts(
                    shared.fhir.upsert(query, body, true, on_match).await?,
                    attempts,
                ),
                other => other,
            }
        }
        Plan::Search { known } => {
            shared
                .fhir
                .upsert(query, body, known || !nothing_can_exist, on_match)
                .await?
        }
    };
    ledger_after(shared, r, hash, &up);
    Ok(up)
}

fn add_attempts(up: Upserted, extra: u32) -> Upserted {
    match up {
        Upserted::Created {
            id,
            status,
            attempts,
        } => Upserted::Created {
            id,
            status,
            attempts: attempts + extra,
        },
        Upserted::Updated {
            id,
            status,
            attempts,
        } => Upserted::Updated {
            id,
            status,
            attempts: attempts + extra,
        },
        Upserted::Unchanged { id, attempts } => Upserted::Unchanged {
            id,
            attempts: attempts + extra,
        },
        Upserted::Rejected {
            status,
            message,
            attempts,
        } => Upserted::Rejected {
            status,
            message,
            attempts: attempts + extra,
        },
        Upserted::Unknown { message, attempts } => Upserted::Unknown {
            message,
            attempts: attempts + extra,
        },
    }
}

/// The Patient step's result.
enum PatientReady {
    /// Its server id, and whether it was created in this run (then nothing can refer to it yet).
    Ready {
        id: String,
        fresh: bool,
    },
    Rejected(String),
    /// Absent from the server; to be created inside a transaction Bundle with its resources.
    Deferred {
        body: Value,
        hash: String,
        query: Query,
    },
    /// Another patient of this run has the same CRID (one person under two record keys): this
    /// one waits until that Patient exists, then reuses it.
    Postponed,
}

/// Loads patients in parallel, one task per patient, and files each outcome at its index.
/// A task that fails (a panic in a worker) is a fatal target error, not a lost row.
async fn load_patients(
    shared: &Arc<Shared>,
    jobs: Vec<PatientJob>,
    second_wave: bool,
    out: &mut [Option<RowOutcome>],
) {
    let mut set = JoinSet::new();
    for job in jobs {
        set.spawn(load_patient(shared.clone(), job, second_wave));
    }
    while let Some(done) = set.join_next().await {
        match done {
            Ok(list) => {
                for (i, o) in list {
                    out[i] = Some(o);
                }
            }
            Err(e) => shared.set_fatal(Fatal::Target(format!("a worker failed: {e}"))),
        }
    }
}

async fn load_patient(shared: Arc<Shared>, job: PatientJob, second_wave: bool) -> Vec<Indexed> {
    let mut out = Vec::with_capacity(job.resources.len() + 1);
    let defer = !second_wave
        && shared.bundle_size > 1
        && job.resources.len() < shared.bundle_size
        && job.resources.iter().all(|(_, r)| !ledger_knows(&shared, r));
    let ready = {
        let _slot = shared.patient_slots.acquire().await;
        if shared.halted() {
            None
        } else {
            match patient_step(&shared, &job.patient, defer, second_wave).await {
                Ok((outcome, ready)) => {
                    if let Some(o) = outcome {
                        out.push((job.index, o));
                    }
                    Some(ready)
                }
                Err(e) => {
                    shared.set_fatal(e);
                    None
                }
            }
        }
    };
    let Some(ready) = ready else {
        shared.progress.inc(1);
        out.push((job.index, not_sent(&job.patient.resource)));
        out.extend(job.resources.iter().map(|(i, r)| (*i, not_sent(r))));
        shared.progress.inc(job.resources.len() as u64);
        return out;
    };
    let (patient_id, fresh) = match ready {
        PatientReady::Ready { id, fresh } => {
            shared.progress.inc(1);
            (id, fresh)
        }
        PatientReady::Postponed => {
            if let Ok(mut p) = shared.postponed.lock() {
                p.push(job);
            }
            return out;
        }
        PatientReady::Deferred { body, hash, query } => {
            let items = job
                .resources
                .into_iter()
                .map(|(index, resource)| {
                    let body = resource.body.value();
                    Item {
                        index,
                        hash: content_hash(&body),
                        body,
                        resource,
                    }
                })
                .collect();
            let group = Group {
                index: job.index,
                patient: job.patient.resource,
                body,
                hash,
                query,
                items,
            };
            if let Some(full) = shared.pack(group) {
                out.extend(send_groups(&shared, full).await);
            }
            return out;
        }
        PatientReady::Rejected(reason) => {
            shared.progress.inc(1);
            let why = format!(
                "its Patient ({}) was rejected: {reason}",
                job.patient.resource.location
            );
            out.extend(
                job.resources
                    .iter()
                    .map(|(i, r)| (*i, rejected(r, why.clone(), None, 0))),
            );
            shared.progress.inc(job.resources.len() as u64);
            return out;
        }
    };
    let placeholder = patient_placeholder(&job.patient.resource.patient_key);
    let reference = format!("Patient/{patient_id}");
    let items: Vec<Item> = job
        .resources
        .into_iter()
        .map(|(index, resource)| {
            let mut body = resource.body.value();
            let hash = content_hash(&body);
            fhir::replace_reference(&mut body, &placeholder, &reference);
            Item {
                index,
                resource,
                body,
                hash,
            }
        })
        .collect();
    let mut set = JoinSet::new();
    if shared.bundle_size > 1 {
        let mut items = items;
        while !items.is_empty() {
            let rest = items.split_off(items.len().min(shared.bundle_size));
            set.spawn(load_bundle(shared.clone(), items, fresh));
            items = rest;
        }
    } else {
        for item in items {
            let shared = shared.clone();
            set.spawn(async move { vec![load_single(&shared, item, fresh).await] });
        }
    }
    while let Some(done) = set.join_next().await {
        match done {
            Ok(list) => out.extend(list),
            Err(e) => shared.set_fatal(Fatal::Target(format!("a worker failed: {e}"))),
        }
    }
    out
}

/// A resource ready to send: its body with the Patient reference filled in.
struct Item {
    index: usize,
    resource: MappedResource,
    body: Value,
    hash: String,
}

async fn load_single(shared: &Shared, item: Item, fresh: bool) -> Indexed {
    let outcome = if shared.halted() {
        not_sent(&item.resource)
    } else {
        let query = Query::by_identifier(&item.resource.resource_type, &item.resource.identifier);
        match submit_one(
            shared,
            &item.resource,
            &item.body,
            &item.hash,
            &query,
            fresh,
            OnMatch::UpdateIfChanged,
        )
        .await
        {
            Ok(up) => outcome_of(&item.resource, &up),
            Err(e) => {
                shared.set_fatal(e.into());
                not_sent(&item.resource)
            }
        }
    };
    shared.progress.inc(1);
    (item.index, outcome)
}

/// The CRID, then the Patient: searched by CRID (or by its business identifier without CRIDs),
/// reused when found once, created when absent.
async fn patient_step(
    shared: &Shared,
    p: &MappedPatient,
    defer: bool,
    second_wave: bool,
) -> Result<(Option<RowOutcome>, PatientReady), Fatal> {
    let r = &p.resource;
    // A CRID the service has just made cannot be on any Patient yet.
    let mut new_crid = false;
    let crid = match known_crid(shared, p) {
        Some(c) => Some(c),
        None => match shared.crid.assign(p).await? {
            CridOutcome::Assigned { crid, new, .. } => {
                remember_crid(shared, p, crid.as_str());
                new_crid = new;
                Some(crid.as_str().to_string())
            }
            CridOutcome::NotUsed => None,
            CridOutcome::Rejected {
                reason,
                http_status,
                attempts,
            } => {
                let outcome = Some(rejected(r, reason.clone(), http_status, attempts));
                if let Some(h) = &shared.ledger
                    && let Err(e) = h.ledger.record_reject(
                        &h.scope,
                        &r.resource_type,
                        record_key(r),
                        &r.location.to_string(),
                        &reason,
                    )
                {
                    shared.ledger_err(e);
                }
                return Ok((outcome, PatientReady::Rejected(reason)));
            }
        },
    };
    if let Some(c) = &crid
        && !second_wave
        && !shared.claim_crid(c)
    {
        return Ok((None, PatientReady::Postponed));
    }
    let mut body = r.body.value();
    let query = match &crid {
        Some(c) => {
            fhir::set_identifier(&mut body, &shared.uris.crid_system, c);
            Query::patient_by_crid(
                (&shared.uris.security_system, &shared.security_code),
                &shared.uris.crid_system,
                c,
            )
        }
        None => Query::by_identifier("Patient", &r.identifier),
    };
    let hash = content_hash(&body);
    if defer && let Plan::Search { known: false } = plan(shared, r, &hash) {
        // The contract's search comes first (unless the CRID is new: then no Patient can carry
        // it); only a Patient the server does not hold is deferred to a Bundle. Anything else
        // takes the ordinary way below.
        if new_crid {
            return Ok((None, PatientReady::Deferred { body, hash, query }));
        }
        if let Ok((hits, attempts)) = shared.fhir.search(&query).await {
            match hits.as_slice() {
                [] => return Ok((None, PatientReady::Deferred { body, hash, query })),
                [one] => {
                    if let Some(id) = one.get("id").and_then(Value::as_str) {
                        let up = Upserted::Unchanged {
                            id: id.to_string(),
                            attempts,
                        };
                        ledger_after(shared, r, &hash, &up);
                        return Ok((
                            Some(outcome_of(r, &up)),
                            PatientReady::Ready {
                                id: id.to_string(),
                                fresh: false,
                            },
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    let up = submit_one(shared, r, &body, &hash, &query, new_crid, OnMatch::Reuse).await?;
    let outcome = outcome_of(r, &up);
    let ready = match (&up, up.server_id()) {
        (Upserted::Created { .. }, Some(id)) => PatientReady::Ready {
            id: id.to_string(),
            fresh: true,
        },
        (_, Some(id)) => PatientReady::Ready {
            id: id.to_string(),
            fresh: false,
        },
        _ => PatientReady::Rejected(
            outcome
                .message
                .clone()
                .unwrap_or_else(|| "the Patient could not be submitted".into()),
        ),
    };
    Ok((Some(outcome), ready))
}

fn crid_request(shared: &Shared, p: &MappedPatient) -> Option<Value> {
    let d = p.crid_demographics.as_ref()?;
    let ccn = shared.security_code.trim_start_matches("rc_");
    Some(crid::request_body(ccn, d))
}

/// The CRID the ledger holds for this patient, when the same request obtained it.
fn known_crid(shared: &Shared, p: &MappedPatient) -> Option<String> {
    let h = shared.ledger.as_ref()?;
    let request = crid_request(shared, p)?;
    let k = h
        .ledger
        .known_crid(&h.scope, &p.resource.patient_key)
        .ok()??;
    k.matches(&demographics_hash(&request)).then_some(k.crid)
}

fn remember_crid(shared: &Shared, p: &MappedPatient, crid: &str) {
    let (Some(h), Some(request)) = (&shared.ledger, crid_request(shared, p)) else {
        return;
    };
    if let Err(e) = h.ledger.record_crid(
        &h.scope,
        &p.resource.patient_key,
        crid,
        &demographics_hash(&request),
    ) {
        shared.ledger_err(e);
    }
}

/// Whether the ledger holds anything about a resource (then it cannot ride in a new patient's
/// Bundle: it may exist already).
fn ledger_knows(shared: &Shared, r: &MappedResource) -> bool {
    shared.ledger.as_ref().is_some_and(|h| {
        !matches!(
            h.ledger.known(&h.scope, &r.resource_type, record_key(r)),
            Ok(None)
        )
    })
}

/// A patient the server does not hold, with its resources: created together in one Bundle, the
/// resources referring to the Patient by its placeholder `fullUrl`.
struct Group {
    index: usize,
    patient: MappedResource,
    body: Value,
    hash: String,
    query: Query,
    /// Bodies still carry the placeholder reference.
    items: Vec<Item>,
}

/// Sends whole groups (new patients and their resources) in one transaction Bundle. When the
/// Bundle is refused or its answer lost, each group goes the single way: the Patient searched
/// (if the Bundle may have been stored) or created, then its resources.
async fn send_groups(shared: &Arc<Shared>, groups: Vec<Group>) -> Vec<Indexed> {
    let mut out = Vec::new();
    if shared.halted() {
        for g in &groups {
            out.push((g.index, not_sent(&g.patient)));
            out.extend(g.items.iter().map(|i| (i.index, not_sent(&i.resource))));
        }
        shared.progress.inc(out.len() as u64);
        return out;
    }
    let mut entries = Vec::new();
    for g in &groups {
        entries.push(json!({
            "fullUrl": patient_placeholder(&g.patient.patient_key),
            "resource": g.body,
            "request": {"method": "POST", "url": "Patient"},
        }));
        for item in &g.items {
            entries.push(json!({
                "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                "resource": item.body,
                "request": {"method": "POST", "url": item.resource.resource_type},
            }));
        }
    }
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let search_again = match shared.fhir.transaction(&bundle).await {
        Ok(reply) if (200..300).contains(&reply.status) => {
            let answer: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
            let answers = answer
                .get("entry")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let id_at = |n: usize, rtype: &str| {
                answers
                    .get(n)
                    .and_then(|e| e.pointer("/response/location"))
                    .and_then(Value::as_str)
                    .and_then(|l| fhir::id_from_location(l, rtype))
            };
            let mut n = 0;
            let mut unreadable = Vec::new();
            for g in groups {
                let ids: Vec<Option<String>> = std::iter::once(id_at(n, "Patient"))
                    .chain(
                        g.items
                            .iter()
                            .enumerate()
                            .map(|(k, i)| id_at(n + 1 + k, &i.resource.resource_type)),
                    )
                    .collect();
                n += 1 + g.items.len();
                if ids.iter().any(Option::is_none) {
                    // Stored, but an answer is unreadable: settle this group by searching.
                    unreadable.push(g);
                    continue;
                }
                let created = |id: &Option<String>| Upserted::Created {
                    id: id.clone().unwrap_or_default(),
                    status: 201,
                    attempts: reply.attempts,
                };
                let up = created(&ids[0]);
                ledger_after(shared, &g.patient, &g.hash, &up);
                out.push((g.index, outcome_of(&g.patient, &up)));
                for (item, id) in g.items.iter().zip(&ids[1..]) {
                    let up = created(id);
                    ledger_after(shared, &item.resource, &item.hash, &up);
                    out.push((item.index, outcome_of(&item.resource, &up)));
                }
                shared.progress.inc(1 + g.items.len() as u64);
            }
            for g in unreadable {
                out.extend(group_single(shared, g, true).await);
            }
            return out;
        }
        // A transaction is all-or-nothing: refused means nothing was stored.
        Ok(_) => false,
        Err(CallError::Auth(e)) => {
            shared.set_fatal(Fatal::Auth(e));
            true
        }
        Err(_) => true,
    };
    for g in groups {
        out.extend(group_single(shared, g, search_again).await);
    }
    out
}

/// One group the single way: its Patient (searched first when a Bundle may have stored it),
/// then its resources.
async fn group_single(shared: &Arc<Shared>, g: Group, search: bool) -> Vec<Indexed> {
    let mut out = Vec::with_capacity(g.items.len() + 1);
    if shared.halted() {
        out.push((g.index, not_sent(&g.patient)));
        out.extend(g.items.iter().map(|i| (i.index, not_sent(&i.resource))));
        shared.progress.inc(out.len() as u64);
        return out;
    }
    let up = match shared
        .fhir
        .upsert(&g.query, &g.body, search, OnMatch::Reuse)
        .await
    {
        Ok(up) => up,
        Err(e) => {
            shared.set_fatal(e.into());
            out.push((g.index, not_sent(&g.patient)));
            out.extend(g.items.iter().map(|i| (i.index, not_sent(&i.resource))));
            shared.progress.inc(out.len() as u64);
            return out;
        }
    };
    ledger_after(shared, &g.patient, &g.hash, &up);
    out.push((g.index, outcome_of(&g.patient, &up)));
    shared.progress.inc(1);
    let (id, fresh) = match &up {
        Upserted::Created { id, .. } => (id.clone(), true),
        other => match other.server_id() {
            Some(id) => (id.to_string(), false),
            None => {
                let why = format!(
                    "its Patient ({}) was rejected: {}",
                    g.patient.location,
                    outcome_of(&g.patient, &up).message.unwrap_or_default()
                );
                out.extend(
                    g.items
                        .iter()
                        .map(|i| (i.index, rejected(&i.resource, why.clone(), None, 0))),
                );
                shared.progress.inc(g.items.len() as u64);
                return out;
            }
        },
    };
    let placeholder = patient_placeholder(&g.patient.patient_key);
    let reference = format!("Patient/{id}");
    let mut set = JoinSet::new();
    for mut item in g.items {
        fhir::replace_reference(&mut item.body, &placeholder, &reference);
        let shared = shared.clone();
        set.spawn(async move { load_single(&shared, item, fresh).await });
    }
    while let Some(done) = set.join_next().await {
        match done {
            Ok(o) => out.push(o),
            Err(e) => shared.set_fatal(Fatal::Target(format!("a worker failed: {e}"))),
        }
    }
    out
}

/// Sends up to `bundle_size` resources of one patient in a transaction Bundle. Resources the
/// ledger marks unchanged are skipped; resources that may already exist without a known id, and
/// every entry of a Bundle the server refuses or whose answer is lost, go through the single path
/// (which searches first), so one bad resource never blocks the others and none is duplicated.
async fn load_bundle(shared: Arc<Shared>, items: Vec<Item>, fresh: bool) -> Vec<Indexed> {
    let mut out = Vec::with_capacity(items.len());
    let mut entries = Vec::new();
    let mut in_bundle: Vec<(Item, Option<String>)> = Vec::new();
    let mut single: Vec<(Item, bool)> = Vec::new();
    for item in items {
        if shared.halted() {
            out.push((item.index, not_sent(&item.resource)));
            shared.progress.inc(1);
            continue;
        }
        match plan(&shared, &item.resource, &item.hash) {
            Plan::Skip(id) => {
                let up = Upserted::Unchanged { id, attempts: 0 };
                ledger_after(&shared, &item.resource, &item.hash, &up);
                out.push((item.index, outcome_of(&item.resource, &up)));
                shared.progress.inc(1);
            }
            Plan::UpdateAt(id) => {
                let mut body = item.body.clone();
                if let Some(o) = body.as_object_mut() {
                    o.insert("id".into(), Value::String(id.clone()));
                }
                entries.push(json!({
                    "fullUrl": format!("{}/{}", item.resource.resource_type, id),
                    "resource": body,
                    "request": {"method": "PUT", "url": format!("{}/{}", item.resource.resource_type, id)},
                }));
                in_bundle.push((item, Some(id)));
            }
            Plan::Search { known: false } if fresh => {
                entries.push(json!({
                    "fullUrl": format!("urn:uuid:{}", uuid::Uuid::new_v4()),
                    "resource": item.body,
                    "request": {"method": "POST", "url": item.resource.resource_type},
                }));
                in_bundle.push((item, None));
            }
            Plan::Search { .. } => single.push((item, true)),
        }
    }
    if !entries.is_empty() {
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
        match shared.fhir.transaction(&bundle).await {
            Ok(reply) if (200..300).contains(&reply.status) => {
                let answer: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
                let answers = answer
                    .get("entry")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                for (n, (item, known_id)) in in_bundle.into_iter().enumerate() {
                    let resp = answers.get(n).and_then(|e| e.get("response"));
                    let status = resp
                        .and_then(|r| r.get("status"))
                        .and_then(Value::as_str)
                        .and_then(|s| s.split_whitespace().next())
                        .and_then(|s| s.parse::<u16>().ok());
                    let id = resp
                        .and_then(|r| r.get("location"))
                        .and_then(Value::as_str)
                        .and_then(|l| fhir::id_from_location(l, &item.resource.resource_type))
                        .or(known_id.clone());
                    let up = match (status, id) {
                        (Some(s @ 200..=299), Some(id)) => {
                            if known_id.is_some() {
                                Upserted::Updated {
                                    id,
                                    status: s,
                                    attempts: reply.attempts,
                                }
                            } else {
                                Upserted::Created {
                                    id,
                                    status: s,
                                    attempts: reply.attempts,
                                }
                            }
                        }
                        // The bundle went through but this entry's answer is unreadable: it
                        // may exist, so it goes the searching way.
                        _ => {
                            single.push((item, true));
                            continue;
                        }
                    };
                    ledger_after(&shared, &item.resource, &item.hash, &up);
                    out.push((item.index, outcome_of(&item.resource, &up)));
                    shared.progress.inc(1);
                }
            }
            // Refused as a whole: a transaction is all-or-nothing, so nothing was stored.
            Ok(_) => single.extend(in_bundle.into_iter().map(|(i, _)| (i, false))),
            Err(CallError::Auth(e)) => {
                shared.set_fatal(Fatal::Auth(e));
                single.extend(in_bundle.into_iter().map(|(i, _)| (i, true)));
            }
            // Lost or failed: it may have been stored; search before anything else.
            Err(_) => single.extend(in_bundle.into_iter().map(|(i, _)| (i, true))),
        }
    }
    for (item, search) in single {
        out.push(load_single(&shared, item, fresh && !search).await);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_size_is_bounded() {
        let endpoints = Endpoints::cibmtr(
            TargetKind::Custom,
            &url::Url::parse("http://127.0.0.1:9").expect("url"),
            None,
        );
        let mut c = LoaderConfig::new(endpoints, Auth::None, "12001");
        c.bundle_size = 51;
        assert!(matches!(
            Loader::new(c.clone(), None, None),
            Err(LoadError::BundleSize(51))
        ));
        c.bundle_size = 50;
        c.concurrency = 0;
        assert!(matches!(
            Loader::new(c, None, None),
            Err(LoadError::Concurrency)
        ));
    }
}
