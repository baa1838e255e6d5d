//! The state ledger: what was submitted where, for incremental, resumable, crash-safe runs.
//!
//! One SQLite file, `ledger.sqlite`, in the state directory. Per scope (target identity + CCN) and
//! record (resource type + record key) it keeps the content hash and server id of the last
//! submission the server *confirmed*, the last outcome, and whether a later request is unconfirmed
//! (`pending`: logged before sending; `unknown`: in flight when the run was interrupted). Per
//! patient it keeps the CRID and the hash of the `PUT /CRID` request that obtained it. It also keeps
//! the runs (start, end, counts, exit code, version, config hash) and the outstanding rejects.
//!
//! The protocol the loader follows with it:
//! 1. `known` says `is_unchanged(hash)`: send nothing.
//! 2. otherwise `record_pending` before the request; when the record has a confirmed server id,
//!    update it there (PUT is idempotent), otherwise search by the business identifier before any
//!    create (a create whose answer was lost, or a crash before `record_sent`, is found again);
//! 3. `record_sent` only after the server confirmed; `record_unknown` for a request cut off by an
//!    interruption; `record_reject` for a refusal.
//!
//! Durability: WAL with `synchronous=NORMAL`. A committed transaction survives the process being
//! killed (the WAL is in the OS's hands once `commit` returns); only a power loss or OS crash can
//! lose the last few commits. That is safe here because the ledger is never the only guard against
//! a duplicate: a lost `record_sent` leaves the record unconfirmed or absent, and the loader then
//! searches the server by identifier before creating. `FULL` would fsync every confirmation (one
//! per resource) for no gain in correctness.
//!
//! Must not: talk to the network, store resource bodies or demographics (hashes, keys and server
//! ids only), log record keys above DEBUG, or hold its lock across a request (each call is short).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::sink::OutcomeStatus;

pub mod hash;
pub mod lock;
pub mod report;
mod schema;
pub mod session;
mod sink;
pub mod sources;
pub mod stop;

pub use hash::{canonical_hash, content_hash, content_hash_node, demographics_hash};
pub use lock::{LockError, LockHolder, RunLock};
pub use report::RunReport;
pub use session::{Finished, RunEnd, RunSession, SessionError, SessionOptions};
pub use sources::SourceRows;
pub use stop::{RejectGuard, StopReason, StopSignal};

/// The ledger's file name inside the state directory.
pub const LEDGER_FILE: &str = "ledger.sqlite";

/// Where records live: one target (its identity, e.g. the normalised base URL, or
/// `sandbox:<store path>` for the embedded sandbox whose port changes every run) and one CCN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Scope {
    pub target: String,
    pub ccn: String,
}

impl Scope {
    pub fn new(target: impl Into<String>, ccn: impl Into<String>) -> Scope {
        Scope {
            target: target.into(),
            ccn: ccn.into(),
        }
    }
}

/// Whether the record's latest request is confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmissionStatus {
    /// The server confirmed `content_hash` at `server_id`.
    Sent,
    /// A request was about to go out when the ledger last heard of it (a crash leaves this).
    Pending,
    /// A request was in flight when the run was interrupted; its result is unknown.
    Unknown,
}

impl SubmissionStatus {
    fn as_str(self) -> &'static str {
        match self {
            SubmissionStatus::Sent => "sent",
            SubmissionStatus::Pending => "pending",
            SubmissionStatus::Unknown => "unknown",
        }
    }

    fn parse(s: &str) -> SubmissionStatus {
        match s {
            "sent" => SubmissionStatus::Sent,
            "pending" => SubmissionStatus::Pending,
            // Anything unexpected is treated as the least trusted state.
            _ => SubmissionStatus::Unknown,
        }
    }
}

/// What the ledger knows about one record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Known {
    /// The server id of the last confirmed submission.
    pub server_id: Option<String>,
    /// The content hash of the last confirmed submission.
    pub content_hash: Option<String>,
    pub status: SubmissionStatus,
    /// The last confirmed outcome (created, updated, unchanged).
    pub last_outcome: Option<OutcomeStatus>,
    pub updated_at: DateTime<Utc>,
}

impl Known {
    /// `true` when the server confirmed exactly this content and nothing was attempted since:
    /// the record costs no request at all.
    pub fn is_unchanged(&self, content_hash: &str) -> bool {
        self.status == SubmissionStatus::Sent
            && self.server_id.is_some()
            && self.content_hash.as_deref() == Some(content_hash)
    }

    /// The server id to update at (PUT), when one was confirmed.
    pub fn confirmed_server_id(&self) -> Option<&str> {
        self.server_id.as_deref()
    }
}

/// A patient's CRID as the ledger knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct KnownCrid {
    pub crid: String,
    /// [`demographics_hash`] of the `PUT /CRID` request that returned `crid`.
    pub demographics_hash: String,
    pub updated_at: DateTime<Utc>,
}

impl KnownCrid {
    /// `true` when the same request would be sent again: no new CRID request is needed.
    pub fn matches(&self, demographics_hash: &str) -> bool {
        self.demographics_hash == demographics_hash
    }
}

/// A record's address inside a scope.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RecordRef {
    pub resource_type: String,
    pub record_key: String,
}

impl RecordRef {
    /// The ledger's address of a mapped resource: its resource type and [`record_key`]. Every
    /// user of the ledger must key records this way.
    pub fn of(resource: &crate::resource::MappedResource) -> RecordRef {
        RecordRef {
            resource_type: resource.resource_type.clone(),
            record_key: record_key(&resource.identifier),
        }
    }

    pub fn new(resource_type: impl Into<String>, record_key: impl Into<String>) -> RecordRef {
        RecordRef {
            resource_type: resource_type.into(),
            record_key: record_key.into(),
        }
    }
}

/// The record key of a business identifier: its value. Stable across runs (the mapping derives it
/// from the source's keys) and unique per resource type within a run (the loader rejects a second
/// resource with the same identifier).
pub fn record_key(identifier: &crate::resource::BusinessIdentifier) -> String {
    identifier.value.clone()
}

/// How a run chose what to send.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunMode {
    /// Only what changed since the last confirmed submission (the default).
    #[default]
    Incremental,
    /// `--full`: hashes ignored, everything re-checked against the server.
    Full,
    /// `--retry-rejected`: only the records rejected before.
    RetryRejected,
    /// A dry run (files only); recorded so `status` lists it, never touches submissions.
    DryRun,
}

impl RunMode {
    fn as_str(self) -> &'static str {
        match self {
            RunMode::Incremental => "incremental",
            RunMode::Full => "full",
            RunMode::RetryRejected => "retry-rejected",
            RunMode::DryRun => "dry-run",
        }
    }

    fn parse(s: &str) -> RunMode {
        match s {
            "full" => RunMode::Full,
            "retry-rejected" => RunMode::RetryRejected,
            "dry-run" => RunMode::DryRun,
            _ => RunMode::Incremental,
        }
    }
}

/// What `begin_run` records about a run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInfo {
    pub scope: Scope,
    pub mode: RunMode,
    /// The fhirlift version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// See [`config_hash`].
    pub config_hash: String,
}

/// The counts a run ends with (also the run report's summary).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunCounts {
    /// Resources the sink received.
    pub resources: u64,
    pub created: u64,
    pub updated: u64,
    /// Skipped thanks to the ledger, or found identical on the server.
    pub unchanged: u64,
    pub rejected: u64,
    /// Interrupted with a request in flight; the next run checks them.
    pub unknown: u64,
    /// Requests retried (all causes).
    pub retried: u64,
    /// Records sent before that the source no longer has.
    pub missing: u64,
    /// Rows rejected before the sink (reading, mapping, validation).
    #[serde(default)]
    pub row_errors: u64,
    /// Written to files (dry runs).
    #[serde(default)]
    pub written: u64,
}

impl RunCounts {
    /// Created + updated: what went out and was confirmed.
    pub fn sent(&self) -> u64 {
        self.created + self.updated
    }

    /// Adds one sink outcome to the counts.
    pub fn add(&mut self, status: OutcomeStatus) {
        self.resources += 1;
        match status {
            OutcomeStatus::Created => self.created += 1,
            OutcomeStatus::Updated => self.updated += 1,
            OutcomeStatus::Unchanged => self.unchanged += 1,
            OutcomeStatus::Written => self.written += 1,
            OutcomeStatus::Rejected => self.rejected += 1,
            OutcomeStatus::Unknown => self.unknown += 1,
        }
    }
}

/// A run's row in the ledger's run table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RunRecord {
    pub id: RunId,
    /// A unique id for the run's report file name (`reports/<uuid>.json`).
    pub uuid: String,
    pub started_at: DateTime<Utc>,
    /// `None`: still running, or the process died (see `status`).
    pub ended_at: Option<DateTime<Utc>>,
    pub scope: Scope,
    pub mode: RunMode,
    pub version: String,
    pub config_hash: String,
    pub pid: u32,
    pub host: String,
    pub counts: Option<RunCounts>,
    pub exit_code: Option<i32>,
}

/// A run's number in the ledger (increasing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunId(pub i64);

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An outstanding reject: the record's last attempt was refused and nothing was confirmed since.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RejectRecord {
    pub record: RecordRef,
    pub run_id: Option<RunId>,
    /// The row location, e.g. `labs.csv:17` (locates the row, holds no value).
    pub location: String,
    /// The server's or the loader's reason.
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A record whose latest request is unconfirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnconfirmedRecord {
    pub record: RecordRef,
    pub status: SubmissionStatus,
    pub server_id: Option<String>,
    pub run_id: Option<RunId>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{}: cannot open the ledger: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{}: cannot create the state directory: {source}", .path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: the ledger has schema version {found}, newer than this fhirlift understands ({supported}); use a newer fhirlift",
        .path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{}: ledger {op}: {source}", .path.display())]
    Sqlite {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{}: the ledger is unusable after a panic in another thread", .path.display())]
    Poisoned { path: PathBuf },
}

/// The ledger. Cheap calls, safe to share between threads and tasks (`Arc<Ledger>`).
#[derive(Debug)]
pub struct Ledger {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// The run records are stamped with (set by `begin_run`).
    current_run: Mutex<Option<RunId>>,
    /// A run's in-memory copy of its scope (see [`Ledger::preload`]).
    snapshot: Mutex<Option<Snapshot>>,
    /// `--full`: lookups answer "unknown" so that everything is re-checked against the server.
    forget: std::sync::atomic::AtomicBool,
    /// `--max-rejects`: every recorded reject is counted here.
    reject_guard: Mutex<Option<std::sync::Arc<RejectGuard>>>,
}

/// What a run knows about its scope, held in memory so that deciding about an unchanged record
/// costs no query. Only valid while the run lock is held: then this process is the only writer,
/// and every write below updates the copy too.
#[derive(Debug)]
struct Snapshot {
    scope: Scope,
    /// resource type → record key → what is known.
    records: HashMap<String, HashMap<String, Known>>,
    /// patient key → CRID.
    crids: HashMap<String, KnownCrid>,
}

impl Snapshot {
    fn get(&self, resource_type: &str, record_key: &str) -> Option<&Known> {
        self.records.get(resource_type)?.get(record_key)
    }

    fn entry(&mut self, resource_type: &str, record_key: &str) -> Option<&mut Known> {
        self.records.get_mut(resource_type)?.get_mut(record_key)
    }

    fn put(&mut self, resource_type: &str, record_key: &str, known: Known) {
        self.records
            .entry(resource_type.to_string())
            .or_default()
            .insert(record_key.to_string(), known);
    }
}

fn now() -> DateTime<Utc> {
    Utc::now()
}

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn parse_ts(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

impl Ledger {
    /// Opens (creating if needed) `state_dir/ledger.sqlite` and brings its schema up to date.
    pub fn open(state_dir: &Path) -> Result<Ledger, LedgerError> {
        std::fs::create_dir_all(state_dir).map_err(|source| LedgerError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(LEDGER_FILE);
        let open_err = |source| LedgerError::Open {
            path: path.clone(),
            source,
        };
        // The ledger names records and patients' CRIDs: a new one is the owner's alone. A failure
        // here shows again, with SQLite's words, when the ledger is opened.
        let _ = crate::report::create_private_if_absent(&path);
        let mut conn = Connection::open(&path).map_err(open_err)?;
        // Another process (a `status` while a run writes) may hold the write lock briefly.
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(open_err)?;
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        match schema::migrate(&mut conn) {
            Ok(_) => {}
            Err(schema::MigrateError::Newer(found)) => {
                return Err(LedgerError::NewerSchema {
                    path,
                    found,
                    supported: schema::CURRENT_VERSION,
                });
            }
            Err(schema::MigrateError::Sqlite(source)) => {
                return Err(LedgerError::Sqlite {
                    path,
                    op: "migrate",
                    source,
                });
            }
        }
        Ok(Ledger {
            conn: Mutex::new(conn),
            path,
            current_run: Mutex::new(None),
            snapshot: Mutex::new(None),
            forget: std::sync::atomic::AtomicBool::new(false),
            reject_guard: Mutex::new(None),
        })
    }

    /// For a `--full` run: [`Ledger::known`] and [`Ledger::known_crid`] answer `None`, so the loader
    /// asks the CRID service again and searches the server for every record instead of trusting
    /// the hashes. What the run confirms is still recorded.
    pub fn set_forget_known(&self, forget: bool) {
        self.forget
            .store(forget, std::sync::atomic::Ordering::SeqCst);
    }

    fn forgetting(&self) -> bool {
        self.forget.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Counts every reject recorded from now on against `guard` (`--max-rejects`), so the run
    /// stops when a broken mapping makes the target refuse everything. `None` detaches it.
    pub fn set_reject_guard(&self, guard: Option<std::sync::Arc<RejectGuard>>) {
        if let Ok(mut g) = self.reject_guard.lock() {
            *g = guard;
        }
    }

    /// Loads everything known about `scope` into memory, so that [`Ledger::known`] and
    /// [`Ledger::known_crid`] answer without a query. For a process holding the run lock only
    /// (it must be the only writer); [`RunSession`] does it.
    pub fn preload(&self, scope: &Scope) -> Result<(), LedgerError> {
        let mut records: HashMap<String, HashMap<String, Known>> = HashMap::new();
        for (r, k) in self.query_known_all(scope)? {
            records
                .entry(r.resource_type)
                .or_default()
                .insert(r.record_key, k);
        }
        let crids = {
            let conn = self.conn()?;
            let mut st = conn
                .prepare_cached(
                    "SELECT patient_key, crid, demographics_hash, updated_at FROM crids
                     WHERE target = ?1 AND ccn = ?2",
                )
                .map_err(self.err("preload CRIDs"))?;
            let rows = st
                .query_map(params![scope.target, scope.ccn], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        KnownCrid {
                            crid: r.get(1)?,
                            demographics_hash: r.get(2)?,
                            updated_at: parse_ts(&r.get::<_, String>(3)?),
                        },
                    ))
                })
                .map_err(self.err("preload CRIDs"))?;
            rows.collect::<Result<HashMap<_, _>, _>>()
                .map_err(self.err("preload CRIDs"))?
        };
        let mut snap = self.snapshot.lock().map_err(|_| LedgerError::Poisoned {
            path: self.path.clone(),
        })?;
        *snap = Some(Snapshot {
            scope: scope.clone(),
            records,
            crids,
        });
        Ok(())
    }

    /// Runs `f` on the snapshot of `scope`, if one is loaded.
    fn with_snapshot<T>(&self, scope: &Scope, f: impl FnOnce(&mut Snapshot) -> T) -> Option<T> {
        let mut g = self.snapshot.lock().ok()?;
        match g.as_mut() {
            Some(s) if &s.scope == scope => Some(f(s)),
            _ => None,
        }
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> Result<MutexGuard<'_, Connection>, LedgerError> {
        self.conn.lock().map_err(|_| LedgerError::Poisoned {
            path: self.path.clone(),
        })
    }

    fn err(&self, op: &'static str) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
        move |source| LedgerError::Sqlite {
            path: self.path.clone(),
            op,
            source,
        }
    }

    fn run_id(&self) -> Option<i64> {
        self.current_run.lock().ok().and_then(|g| g.map(|r| r.0))
    }

    // ---- submissions -------------------------------------------------------------------------

    /// What the ledger knows about one record, if anything.
    pub fn known(
        &self,
        scope: &Scope,
        resource_type: &str,
        record_key: &str,
    ) -> Result<Option<Known>, LedgerError> {
        if self.forgetting() {
            return Ok(None);
        }
        if let Some(k) = self.with_snapshot(scope, |s| s.get(resource_type, record_key).cloned()) {
            return Ok(k);
        }
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT server_id, content_hash, status, last_outcome, updated_at FROM submissions
                 WHERE target = ?1 AND ccn = ?2 AND resource_type = ?3 AND record_key = ?4",
            )
            .map_err(self.err("known"))?;
        st.query_row(
            params![scope.target, scope.ccn, resource_type, record_key],
            known_from_row,
        )
        .optional()
        .map_err(self.err("known"))
    }

    /// Everything the ledger knows in a scope, in one query (for deciding a whole run up front).
    pub fn known_all(&self, scope: &Scope) -> Result<HashMap<RecordRef, Known>, LedgerError> {
        if self.forgetting() {
            return Ok(HashMap::new());
        }
        self.query_known_all(scope)
    }

    fn query_known_all(&self, scope: &Scope) -> Result<HashMap<RecordRef, Known>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT server_id, content_hash, status, last_outcome, updated_at,
                        resource_type, record_key
                 FROM submissions WHERE target = ?1 AND ccn = ?2",
            )
            .map_err(self.err("known_all"))?;
        let rows = st
            .query_map(params![scope.target, scope.ccn], |r| {
                Ok((
                    RecordRef::new(r.get::<_, String>(5)?, r.get::<_, String>(6)?),
                    known_from_row(r)?,
                ))
            })
            .map_err(self.err("known_all"))?;
        rows.collect::<Result<HashMap<_, _>, _>>()
            .map_err(self.err("known_all"))
    }

    /// Logs the intent to send `content_hash` for a record, before the request goes out. The
    /// confirmed hash and server id stay as they were.
    pub fn record_pending(
        &self,
        scope: &Scope,
        resource_type: &str,
        record_key: &str,
        content_hash: &str,
    ) -> Result<(), LedgerError> {
        self.mark_unconfirmed(
            scope,
            resource_type,
            record_key,
            Some(content_hash),
            SubmissionStatus::Pending,
        )
    }

    /// Marks a record whose request was in flight when the run was interrupted: the next run must
    /// check the server (search by identifier) before creating it.
    pub fn record_unknown(
        &self,
        scope: &Scope,
        resource_type: &str,
        record_key: &str,
    ) -> Result<(), LedgerError> {
        self.mark_unconfirmed(
            scope,
            resource_type,
            record_key,
            None,
            SubmissionStatus::Unknown,
        )
    }

    fn mark_unconfirmed(
        &self,
        scope: &Scope,
        resource_type: &str,
        record_key: &str,
        pending_hash: Option<&str>,
        status: SubmissionStatus,
    ) -> Result<(), LedgerError> {
        let run = self.run_id();
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "INSERT INTO submissions
                   (target, ccn, resource_type, record_key, status, pending_hash, updated_at,
                    run_id, last_seen_run)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)
                 ON CONFLICT (target, ccn, resource_type, record_key) DO UPDATE SET
                   status = excluded.status,
                   pending_hash = COALESCE(excluded.pending_hash, submissions.pending_hash),
                   updated_at = excluded.updated_at,
                   run_id = excluded.run_id,
                   last_seen_run = COALESCE(excluded.last_seen_run, submissions.last_seen_run)",
            )
            .map_err(self.err("record an unconfirmed request"))?;
        st.execute(params![
            scope.target,
            scope.ccn,
            resource_type,
            record_key,
            status.as_str(),
            pending_hash,
            ts(now()),
            run
        ])
        .map_err(self.err("record an unconfirmed request"))?;
        drop(st);
        drop(conn);
        self.with_snapshot(scope, |s| match s.entry(resource_type, record_key) {
            Some(k) => {
                k.status = status;
                k.updated_at = now();
            }
            None => s.put(
                resource_type,
                record_key,
                Known {
                    server_id: None,
                    content_hash: None,
                    status,
                    last_outcome: None,
                    updated_at: now(),
                },
            ),
        });
        Ok(())
    }

    /// Records a submission the server confirmed (`outcome`: created, updated, or unchanged when
    /// the server already held it). Clears the record's outstanding reject.
    pub fn record_sent(
        &self,
        scope: &Scope,
        resource_type: &str,
        record_key: &str,
        content_hash: &str,
        server_id: &str,
        outcome: OutcomeStatus,
    ) -> Result<(), LedgerError> {
        let run = self.run_id();
        if outcome == OutcomeStatus::Unchanged
            && self.with_snapshot(scope, |s| {
                s.get(resource_type, record_key).is_some_and(|k| {
                    k.is_unchanged(content_hash) && k.server_id.as_deref() == Some(server_id)
                })
            }) == Some(true)
        {
            return Ok(());
        }
        let mut conn = self.conn()?;
        if outcome == OutcomeStatus::Unchanged {
            // The common case of a nightly run: confirmed before, nothing changed. A read instead
            // of a write transaction per record; `mark_seen` notes the record at the end of the run.
            let mut same = conn
                .prepare_cached(
                    "SELECT 1 FROM submissions
                     WHERE target = ?1 AND ccn = ?2 AND resource_type = ?3 AND record_key = ?4
                       AND status = 'sent' AND content_hash = ?5 AND server_id = ?6",
                )
                .map_err(self.err("record a submission"))?;
            let unchanged = same
                .exists(params![
                    scope.target,
                    scope.ccn,
                    resource_type,
                    record_key,
                    content_hash,
                    server_id
                ])
                .map_err(self.err("record a submission"))?;
            if unchanged {
                return Ok(());
            }
        }
        let tx = conn
            .transaction()
            .map_err(self.err("record a submission"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO submissions
                       (target, ccn, resource_type, record_key, content_hash, server_id,
                        last_outcome, status, pending_hash, updated_at, run_id, last_seen_run)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'sent', NULL, ?8, ?9, ?9)
                     ON CONFLICT (target, ccn, resource_type, record_key) DO UPDATE SET
                       content_hash = excluded.content_hash,
                       server_id = excluded.server_id,
                       last_outcome = excluded.last_outcome,
                       status = 'sent',
                       pending_hash = NULL,
                       updated_at = excluded.updated_at,
                       run_id = excluded.run_id,
                       last_seen_run = COALESCE(excluded.last_seen_run, submissions.last_seen_run)",
                )
                .map_err(self.err("record a submission"))?;
            st.execute(params![
                scope.target,
                scope.ccn,
                resource_type,
                record_key,
                content_hash,
                server_id,
                outcome_str(outcome),
                ts(now()),
                run
            ])
            .map_err(self.err("record a submission"))?;
            let mut clear = tx
                .prepare_cached(
                    "DELETE FROM rejects
                     WHERE target = ?1 AND ccn = ?2 AND resource_type = ?3 AND record_key = ?4",
                )
                .map_err(self.err("record a submission"))?;
            clear
                .execute(params![scope.target, scope.ccn, resource_type, record_key])
                .map_err(self.err("record a submission"))?;
        }
        tx.commit().map_err(self.err("record a submission"))?;
        drop(conn);
        self.with_snapshot(scope, |s| {
            s.put(
                resource_type,
                record_key,
                Known {
                    server_id: Some(server_id.to_string()),
                    content_hash: Some(content_hash.to_string()),
                    status: SubmissionStatus::Sent,
                    last_outcome: Some(outcome),
                    updated_at: now(),
                },
            )
        });
        Ok(())
    }

    /// Records that were sent before and whose latest request is unconfirmed.
    pub fn unconfirmed(&self, scope: &Scope) -> Result<Vec<UnconfirmedRecord>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT resource_type, record_key, status, server_id, run_id, updated_at
                 FROM submissions WHERE target = ?1 AND ccn = ?2 AND status <> 'sent'
                 ORDER BY resource_type, record_key",
            )
            .map_err(self.err("list unconfirmed records"))?;
        let rows = st
            .query_map(params![scope.target, scope.ccn], |r| {
                Ok(UnconfirmedRecord {
                    record: RecordRef::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    status: SubmissionStatus::parse(&r.get::<_, String>(2)?),
                    server_id: r.get(3)?,
                    run_id: r.get::<_, Option<i64>>(4)?.map(RunId),
                    updated_at: parse_ts(&r.get::<_, String>(5)?),
                })
            })
            .map_err(self.err("list unconfirmed records"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("list unconfirmed records"))
    }

    /// Counts of records per status in a scope (for `status`).
    pub fn submission_counts(
        &self,
        scope: &Scope,
    ) -> Result<Vec<(SubmissionStatus, u64)>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT status, COUNT(*) FROM submissions WHERE target = ?1 AND ccn = ?2
                 GROUP BY status ORDER BY status",
            )
            .map_err(self.err("count submissions"))?;
        let rows = st
            .query_map(params![scope.target, scope.ccn], |r| {
                Ok((
                    SubmissionStatus::parse(&r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)?.max(0) as u64,
                ))
            })
            .map_err(self.err("count submissions"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("count submissions"))
    }

    // ---- seen / missing ----------------------------------------------------------------------

    /// Notes that the current run's source holds these records (call once per run with every
    /// record key the source produced, whether or not it is sent). One transaction.
    pub fn mark_seen<'a>(
        &self,
        scope: &Scope,
        records: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<(), LedgerError> {
        let Some(run) = self.run_id() else {
            return Ok(());
        };
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(self.err("mark seen records"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "UPDATE submissions SET last_seen_run = ?5
                     WHERE target = ?1 AND ccn = ?2 AND resource_type = ?3 AND record_key = ?4",
                )
                .map_err(self.err("mark seen records"))?;
            for (resource_type, record_key) in records {
                st.execute(params![
                    scope.target,
                    scope.ccn,
                    resource_type,
                    record_key,
                    run
                ])
                .map_err(self.err("mark seen records"))?;
            }
        }
        tx.commit().map_err(self.err("mark seen records"))
    }

    /// Records confirmed on the server that run `run`'s source no longer held (the API has no
    /// delete: they are listed in the report for a person to act on). Meaningful only for a run
    /// that called [`Ledger::mark_seen`] with its whole source.
    pub fn missing_since(&self, scope: &Scope, run: RunId) -> Result<Vec<RecordRef>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT resource_type, record_key FROM submissions
                 WHERE target = ?1 AND ccn = ?2 AND server_id IS NOT NULL
                   AND (last_seen_run IS NULL OR last_seen_run < ?3)
                 ORDER BY resource_type, record_key",
            )
            .map_err(self.err("list missing records"))?;
        let rows = st
            .query_map(params![scope.target, scope.ccn, run.0], |r| {
                Ok(RecordRef::new(
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                ))
            })
            .map_err(self.err("list missing records"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("list missing records"))
    }

    // ---- CRIDs -------------------------------------------------------------------------------

    /// The CRID obtained for a patient, with the hash of the request that obtained it.
    pub fn known_crid(
        &self,
        scope: &Scope,
        patient_key: &str,
    ) -> Result<Option<KnownCrid>, LedgerError> {
        if self.forgetting() {
            return Ok(None);
        }
        if let Some(c) = self.with_snapshot(scope, |s| s.crids.get(patient_key).cloned()) {
            return Ok(c);
        }
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT crid, demographics_hash, updated_at FROM crids
                 WHERE target = ?1 AND ccn = ?2 AND patient_key = ?3",
            )
            .map_err(self.err("look up a CRID"))?;
        st.query_row(params![scope.target, scope.ccn, patient_key], |r| {
            Ok(KnownCrid {
                crid: r.get(0)?,
                demographics_hash: r.get(1)?,
                updated_at: parse_ts(&r.get::<_, String>(2)?),
            })
        })
        .optional()
        .map_err(self.err("look up a CRID"))
    }

    /// Records the CRID the service returned for a patient (after the service answered).
    pub fn record_crid(
        &self,
        scope: &Scope,
        patient_key: &str,
        crid: &str,
        demographics_hash: &str,
    ) -> Result<(), LedgerError> {
        let run = self.run_id();
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "INSERT INTO crids (target, ccn, patient_key, crid, demographics_hash, updated_at,
                                    run_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (target, ccn, patient_key) DO UPDATE SET
                   crid = excluded.crid, demographics_hash = excluded.demographics_hash,
                   updated_at = excluded.updated_at, run_id = excluded.run_id",
            )
            .map_err(self.err("record a CRID"))?;
        st.execute(params![
            scope.target,
            scope.ccn,
            patient_key,
            crid,
            demographics_hash,
            ts(now()),
            run
        ])
        .map_err(self.err("record a CRID"))?;
        drop(st);
        drop(conn);
        self.with_snapshot(scope, |s| {
            s.crids.insert(
                patient_key.to_string(),
                KnownCrid {
                    crid: crid.to_string(),
                    demographics_hash: demographics_hash.to_string(),
                    updated_at: now(),
                },
            )
        });
        Ok(())
    }

    // ---- rejects -----------------------------------------------------------------------------

    /// Records a refusal (the server's or the loader's). Replaces the record's previous reject;
    /// a later confirmed submission clears it.
    pub fn record_reject(
        &self,
        scope: &Scope,
        resource_type: &str,
        record_key: &str,
        location: &str,
        reason: &str,
    ) -> Result<(), LedgerError> {
        let run = self.run_id();
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "INSERT INTO rejects (target, ccn, resource_type, record_key, run_id, location,
                                      reason, at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (target, ccn, resource_type, record_key) DO UPDATE SET
                   run_id = excluded.run_id, location = excluded.location,
                   reason = excluded.reason, at = excluded.at",
            )
            .map_err(self.err("record a reject"))?;
        st.execute(params![
            scope.target,
            scope.ccn,
            resource_type,
            record_key,
            run,
            location,
            reason,
            ts(now())
        ])
        .map_err(self.err("record a reject"))?;
        drop(st);
        drop(conn);
        let guard = self.reject_guard.lock().ok().and_then(|g| g.clone());
        if let Some(g) = guard {
            g.note_reject();
        }
        Ok(())
    }

    /// The records whose last attempt was refused (what `--retry-rejected` re-submits).
    pub fn rejected_keys(&self, scope: &Scope) -> Result<BTreeSet<RecordRef>, LedgerError> {
        Ok(self.rejects(scope)?.into_iter().map(|r| r.record).collect())
    }

    /// The outstanding rejects, with where and why.
    pub fn rejects(&self, scope: &Scope) -> Result<Vec<RejectRecord>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT resource_type, record_key, run_id, location, reason, at FROM rejects
                 WHERE target = ?1 AND ccn = ?2 ORDER BY run_id, location, record_key",
            )
            .map_err(self.err("list rejects"))?;
        let rows = st
            .query_map(params![scope.target, scope.ccn], |r| {
                Ok(RejectRecord {
                    record: RecordRef::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    run_id: r.get::<_, Option<i64>>(2)?.map(RunId),
                    location: r.get(3)?,
                    reason: r.get(4)?,
                    at: parse_ts(&r.get::<_, String>(5)?),
                })
            })
            .map_err(self.err("list rejects"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("list rejects"))
    }

    // ---- runs --------------------------------------------------------------------------------

    /// Records the start of a run; later records are stamped with its id.
    pub fn begin_run(&self, info: &RunInfo) -> Result<RunId, LedgerError> {
        let uuid = uuid::Uuid::new_v4().to_string();
        let id = {
            let conn = self.conn()?;
            conn.execute(
                "INSERT INTO runs (uuid, started_at, target, ccn, mode, version, config_hash,
                                   pid, host)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    uuid,
                    ts(now()),
                    info.scope.target,
                    info.scope.ccn,
                    info.mode.as_str(),
                    info.version,
                    info.config_hash,
                    std::process::id(),
                    lock::hostname()
                ],
            )
            .map_err(self.err("begin a run"))?;
            RunId(conn.last_insert_rowid())
        };
        if let Ok(mut cur) = self.current_run.lock() {
            *cur = Some(id);
        }
        Ok(id)
    }

    /// Records the end of a run with its counts and exit code.
    pub fn end_run(
        &self,
        id: RunId,
        counts: &RunCounts,
        exit_code: i32,
    ) -> Result<(), LedgerError> {
        let counts = serde_json::to_string(counts).unwrap_or_else(|_| "{}".into());
        let conn = self.conn()?;
        conn.execute(
            "UPDATE runs SET ended_at = ?2, counts = ?3, exit_code = ?4 WHERE id = ?1",
            params![id.0, ts(now()), counts, exit_code],
        )
        .map_err(self.err("end a run"))?;
        Ok(())
    }

    /// One run by id.
    pub fn run(&self, id: RunId) -> Result<Option<RunRecord>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(&format!("{RUN_SELECT} WHERE id = ?1"))
            .map_err(self.err("read a run"))?;
        st.query_row(params![id.0], run_from_row)
            .optional()
            .map_err(self.err("read a run"))
    }

    /// The last `limit` runs, newest first.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(&format!("{RUN_SELECT} ORDER BY id DESC LIMIT ?1"))
            .map_err(self.err("list runs"))?;
        let rows = st
            .query_map(params![limit as i64], run_from_row)
            .map_err(self.err("list runs"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("list runs"))
    }

    /// The last run of a scope that ended and was not a dry run.
    pub fn last_finished_run(&self, scope: &Scope) -> Result<Option<RunRecord>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(&format!(
                "{RUN_SELECT} WHERE target = ?1 AND ccn = ?2 AND ended_at IS NOT NULL
                   AND mode <> 'dry-run' ORDER BY id DESC LIMIT 1"
            ))
            .map_err(self.err("read the last run"))?;
        st.query_row(params![scope.target, scope.ccn], run_from_row)
            .optional()
            .map_err(self.err("read the last run"))
    }

    /// The scopes the ledger holds records for (for `status` when the target is not given).
    pub fn scopes(&self) -> Result<Vec<Scope>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT target, ccn FROM runs UNION SELECT target, ccn FROM submissions
                 ORDER BY 1, 2",
            )
            .map_err(self.err("list scopes"))?;
        let rows = st
            .query_map([], |r| {
                Ok(Scope::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .map_err(self.err("list scopes"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(self.err("list scopes"))
    }
}

const RUN_SELECT: &str = "SELECT id, uuid, started_at, ended_at, target, ccn, mode, version,
    config_hash, pid, host, counts, exit_code FROM runs";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRecord> {
    Ok(RunRecord {
        id: RunId(r.get(0)?),
        uuid: r.get(1)?,
        started_at: parse_ts(&r.get::<_, String>(2)?),
        ended_at: r.get::<_, Option<String>>(3)?.map(|s| parse_ts(&s)),
        scope: Scope::new(r.get::<_, String>(4)?, r.get::<_, String>(5)?),
        mode: RunMode::parse(&r.get::<_, String>(6)?),
        version: r.get(7)?,
        config_hash: r.get(8)?,
        pid: r.get::<_, i64>(9)?.clamp(0, u32::MAX as i64) as u32,
        host: r.get(10)?,
        counts: r
            .get::<_, Option<String>>(11)?
            .and_then(|s| serde_json::from_str(&s).ok()),
        exit_code: r.get(12)?,
    })
}

fn known_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Known> {
    Ok(Known {
        server_id: r.get(0)?,
        content_hash: r.get(1)?,
        status: SubmissionStatus::parse(&r.get::<_, String>(2)?),
        last_outcome: r
            .get::<_, Option<String>>(3)?
            .and_then(|s| parse_outcome(&s)),
        updated_at: parse_ts(&r.get::<_, String>(4)?),
    })
}

fn outcome_str(o: OutcomeStatus) -> &'static str {
    match o {
        OutcomeStatus::Written => "written",
        OutcomeStatus::Created => "created",
        OutcomeStatus::Updated => "updated",
        OutcomeStatus::Unchanged => "unchanged",
        OutcomeStatus::Rejected => "rejected",
        OutcomeStatus::Unknown => "unknown",
    }
}

fn parse_outcome(s: &str) -> Option<OutcomeStatus> {
    Some(match s {
        "written" => OutcomeStatus::Written,
        "created" => OutcomeStatus::Created,
        "updated" => OutcomeStatus::Updated,
        "unchanged" => OutcomeStatus::Unchanged,
        "rejected" => OutcomeStatus::Rejected,
        "unknown" => OutcomeStatus::Unknown,
        _ => return None,
    })
}

/// The hash `status` shows for a configuration: the pipeline file and its mapping files.
pub fn config_hash(config: &crate::config::PipelineConfig) -> String {
    let mut paths: Vec<&Path> = vec![config.file.as_path()];
    paths.extend(config.mappings.iter().map(PathBuf::as_path));
    hash::files_hash(&paths)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests;
