//! The pipeline: read → map in parallel → validate → sink, with rejects and a run report.
//!
//! One call to [`run`] processes every mapping of a [`MappingSet`]: patient mappings first (so that
//! every Patient reaches the sink before any resource that refers to it), then the others, each in
//! config order. Rows are read in batches; a batch is rendered with rayon on a thread pool owned by
//! this run (no global pool, no statics) while the next batch is read, and results are handled in
//! source row order, so the output does not depend on the number of threads. Only the patient keys
//! and counters grow with the input.
//!
//! This module chooses nothing about where resources go: the caller passes the [`Sink`] (dry-run
//! files or the loader). It never talks to the network itself.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use rayon::prelude::*;

use crate::ledger::RecordRef;
use crate::mapping::{Mapped, MappedRow, MappingKind, MappingSet, RowError};
use crate::report::{RejectsWriter, ReportBuilder, RunReport};
use crate::resource::{BusinessIdentifier, MappedPatient, MappedResource};
use crate::sink::{OutcomeStatus, RowOutcome, Sink, SinkError};
use crate::source::{Header, Row, RowLocation};

/// Rows per batch by default: large enough to keep two cores busy, small enough that memory
/// stays flat.
pub const DEFAULT_BATCH: usize = 2048;

/// A row a reader could not turn into cells (a ragged CSV record, an unreadable sheet row). It
/// goes to the rejects file with whatever raw cells were recovered.
#[derive(Clone, Debug)]
pub struct RowReject {
    pub location: RowLocation,
    pub header: Option<Arc<Header>>,
    pub raw: Vec<String>,
    pub message: String,
}

/// What a source yields: a row, a rejected row, or a failure that stops the source.
pub enum SourceItem {
    Row(Row),
    Reject(RowReject),
}

/// A stream of rows from one source.
pub type RowStream =
    Box<dyn Iterator<Item = Result<SourceItem, Box<dyn std::error::Error + Send + Sync>>> + Send>;

/// Opens sources by name. [`ConfigSources`] opens the files of a pipeline config; tests and
/// benchmarks may generate rows instead.
pub trait Sources {
    fn open(&mut self, source: &str)
    -> Result<RowStream, Box<dyn std::error::Error + Send + Sync>>;
}

/// A record a freshly rendered row produced, as [`KnownRows`] keeps it: the row's
/// [`source hash`](MappingSet::source_hash) and the content hash of what it rendered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedRecord {
    pub record: RecordRef,
    pub source_hash: String,
    pub content_hash: String,
}

/// What earlier runs delivered, row by row: in a nightly run, the ledger. A row of a resource
/// mapping whose every record was confirmed by the server with the content that an identical row
/// rendered is neither rendered nor sent; its records count as unchanged. Patient rows always
/// take the full path (the loader needs each patient).
pub trait KnownRows: Send + Sync + std::fmt::Debug {
    /// The server ids of `records`, in order, when every one of them is settled for a row with
    /// this `source_hash`; `None` when the row must be rendered.
    fn unchanged(&self, records: &[RecordRef], source_hash: &str) -> Option<Vec<String>>;
    /// Notes what freshly rendered rows produced. A failure only means those rows are rendered
    /// again next time.
    fn rendered(&self, rows: &[RenderedRecord]) -> Result<(), String>;
}

/// A run's knobs (the command line's flags).
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Worker threads for rendering; 0 means one per core.
    pub jobs: usize,
    pub batch_size: usize,
    /// Where `rejects.csv` and `report.json` go.
    pub report_dir: PathBuf,
    /// The config file's sha256 (hex), for the report and the manifest.
    pub config_sha256: String,
    pub dry_run: bool,
    /// Show a progress bar on stderr (it is hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Rows settled by earlier runs (a nightly run's ledger); `None` renders every row.
    pub known_rows: Option<Arc<dyn KnownRows>>,
}

/// A failure that stops the run.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("source {source_name}: {error}")]
    Source {
        source_name: String,
        #[source]
        error: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("{}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start worker threads: {0}")]
    Pool(#[from] rayon::ThreadPoolBuildError),
}

/// Runs the whole pipeline into `sink` and returns the report (also written to
/// `report_dir/report.json`, with `report_dir/rejects.csv`).
pub fn run(
    set: &MappingSet,
    sources: &mut dyn Sources,
    sink: Box<dyn Sink>,
    opts: &RunOptions,
) -> Result<RunReport, PipelineError> {
    let io = |path: PathBuf| move |source| PipelineError::Io { path, source };
    std::fs::create_dir_all(&opts.report_dir).map_err(io(opts.report_dir.clone()))?;
    let rejects_path = opts.report_dir.join("rejects.csv");
    let rejects = RejectsWriter::create(&rejects_path).map_err(io(rejects_path.clone()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs)
        .thread_name(|i| format!("fhirlift-map-{i}"))
        .build()?;
    let progress = progress_bar(opts.progress);
    let mut state = RunState {
        set,
        sink,
        report: ReportBuilder::new(&opts.config_sha256, opts.dry_run),
        rejects,
        patients: HashMap::new(),
        rejected_patients: HashMap::new(),
        loose_patients: Default::default(),
        have_patient_mapping: set
            .mappings()
            .iter()
            .any(|m| m.spec.kind == MappingKind::Patient),
        progress: progress.clone(),
        known_rows: opts.known_rows.clone(),
    };
    tracing::info!(
        mappings = set.mappings().len(),
        jobs = pool.current_num_threads(),
        "Run started"
    );

    let order: Vec<usize> = (0..set.mappings().len())
        .filter(|&i| set.mappings()[i].spec.kind == MappingKind::Patient)
        .chain(
            (0..set.mappings().len())
                .filter(|&i| set.mappings()[i].spec.kind != MappingKind::Patient),
        )
        .collect();
    for index in order {
        state.run_mapping(index, sources, &pool, opts.batch_size.max(1))?;
    }

    let RunState {
        sink,
        mut report,
        mut rejects,
        ..
    } = state;
    let last = sink.finish()?;
    for o in &last {
        record_outcome(&mut report, &mut rejects, o)?;
    }
    rejects.finish().map_err(io(rejects_path))?;
    progress.finish_and_clear();
    let report = report.finish();
    let report_path = opts.report_dir.join("report.json");
    report.write(&report_path).map_err(io(report_path))?;
    tracing::info!(
        rows = report.rows_read,
        rejected = report.rows_rejected,
        "Run finished"
    );
    Ok(report)
}

fn record_outcome(
    report: &mut ReportBuilder,
    rejects: &mut RejectsWriter,
    o: &RowOutcome,
) -> Result<(), PipelineError> {
    report.outcome(o);
    if o.status == OutcomeStatus::Rejected {
        let e = RowError::Sink {
            location: o.location.clone(),
            resource_type: o.resource_type.clone(),
            message: o.message.clone().unwrap_or_default(),
        };
        rejects
            .write("", &e, None, &[])
            .map_err(|source| PipelineError::Io {
                path: rejects.path().to_path_buf(),
                source,
            })?;
    }
    Ok(())
}

fn progress_bar(wanted: bool) -> indicatif::ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {msg}: {pos} rows ({per_sec})")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

struct RunState<'a> {
    set: &'a MappingSet,
    sink: Box<dyn Sink>,
    report: ReportBuilder,
    rejects: RejectsWriter,
    /// Patient key → the row it was first mapped from.
    patients: HashMap<String, RowLocation>,
    /// Patient key → the row where that patient was rejected (for a precise reason on its
    /// resources).
    rejected_patients: HashMap<String, RowLocation>,
    /// Mapped patient keys by their [`loose_key`], built when a key is first not found (and
    /// rebuilt if patients were added since): how many patients it covers, and the index.
    loose_patients: std::cell::RefCell<(usize, HashMap<String, String>)>,
    have_patient_mapping: bool,
    progress: indicatif::ProgressBar,
    known_rows: Option<Arc<dyn KnownRows>>,
}

type Batch = Vec<SourceItem>;

/// One row after the parallel stage.
enum RowResult {
    /// Rendered and validated; with the row's source hash and each resource's content hash when
    /// the run keeps [`KnownRows`].
    Fresh(MappedRow, Option<(String, Vec<String>)>),
    /// Settled by an earlier run and left alone: its records with their server ids.
    Known {
        patient_key: String,
        records: Vec<(RecordRef, String)>,
    },
}

/// The parallel part of one row: skipped when earlier runs settled it, else mapped.
fn map_item(
    set: &MappingSet,
    index: usize,
    item: &SourceItem,
    known: Option<&dyn KnownRows>,
) -> Result<RowResult, RowError> {
    let row = match item {
        SourceItem::Row(row) => row,
        SourceItem::Reject(r) => {
            return Err(RowError::Read {
                location: r.location.clone(),
                message: r.message.clone(),
            });
        }
    };
    let Some(known) = known else {
        return set.map_row(index, row).map(|m| RowResult::Fresh(m, None));
    };
    let source_hash = set.source_hash(index, row);
    if let Some((patient_key, refs)) = set.record_refs(index, row)
        && let Some(ids) = known.unchanged(&refs, &source_hash)
    {
        return Ok(RowResult::Known {
            patient_key,
            records: refs.into_iter().zip(ids).collect(),
        });
    }
    let mapped = set.map_row(index, row)?;
    let hashes = match &mapped.mapped {
        Mapped::Resources(rs) => rs
            .iter()
            .map(|r| crate::ledger::content_hash_node(&r.body.node()))
            .collect(),
        Mapped::Patient(_) => Vec::new(),
    };
    Ok(RowResult::Fresh(mapped, Some((source_hash, hashes))))
}

fn read_batch(
    stream: &mut RowStream,
    size: usize,
) -> Result<Batch, Box<dyn std::error::Error + Send + Sync>> {
    let mut batch = Vec::with_capacity(size);
    for item in stream.by_ref() {
        batch.push(item?);
        if batch.len() == size {
            break;
        }
    }
    Ok(batch)
}

impl RunState<'_> {
    fn run_mapping(
        &mut self,
        index: usize,
        sources: &mut dyn Sources,
        pool: &rayon::ThreadPool,
        batch_size: usize,
    ) -> Result<(), PipelineError> {
        let set = self.set;
        let mapping = &set.mappings()[index];
        let spec = &mapping.spec;
        let source_err = |error| PipelineError::Source {
            source_name: spec.source.clone(),
            error,
        };
        let counter = self
            .report
            .add_mapping(&spec.name, &spec.source, &spec.resource_type);
        self.progress.set_message(spec.name.clone());
        tracing::info!(mapping = %spec.name, source = %spec.source, "Mapping started");
        let mut stream = sources.open(&spec.source).map_err(source_err)?;
        let mut current = read_batch(&mut stream, batch_size).map_err(source_err)?;
        // Three things overlap: the previous batch goes to the sink (in order, on one thread),
        // this batch renders on the pool, and the next batch is read.
        let known = self.known_rows.clone();
        let mut rendered: Option<(Batch, Vec<Result<RowResult, RowError>>)> = None;
        while !current.is_empty() || rendered.is_some() {
            let ((handled, next), results) = pool.install(|| {
                rayon::join(
                    || {
                        rayon::join(
                            || match rendered.take() {
                                Some((items, results)) => {
                                    self.handle(counter, spec, items, results)
                                }
                                None => Ok(()),
                            },
                            || {
                                if current.is_empty() {
                                    Ok(Vec::new())
                                } else {
                                    read_batch(&mut stream, batch_size)
                                }
                            },
                        )
                    },
                    || {
                        current
                            .par_iter()
                            .map(|item| map_item(set, index, item, known.as_deref()))
                            .collect::<Vec<_>>()
                    },
                )
            });
            handled?;
            self.progress.inc(current.len() as u64);
            if !current.is_empty() {
                rendered = Some((std::mem::take(&mut current), results));
            }
            current = next.map_err(source_err)?;
        }
        Ok(())
    }

    /// Sequential part of a batch: keys, rejects, counts, and the hand-over to the sink.
    fn handle(
        &mut self,
        counter: usize,
        spec: &crate::mapping::MappingSpec,
        items: Batch,
        results: Vec<Result<RowResult, RowError>>,
    ) -> Result<(), PipelineError> {
        let mut patients: Vec<MappedPatient> = Vec::new();
        let mut resources: Vec<MappedResource> = Vec::new();
        let mut settled: Vec<RowOutcome> = Vec::new();
        let mut rendered: Vec<RenderedRecord> = Vec::new();
        let key_column = spec.patient_key.join(",");
        for (item, result) in items.iter().zip(results) {
            let location = match item {
                SourceItem::Row(r) => &r.location,
                SourceItem::Reject(r) => &r.location,
            };
            let result = match result {
                Ok(RowResult::Known {
                    patient_key,
                    records,
                }) => match self.check_patient_key(&key_column, location, &patient_key) {
                    Ok(()) => {
                        let types: Vec<&str> = records
                            .iter()
                            .map(|(r, _)| r.resource_type.as_str())
                            .collect();
                        self.report.settled(counter, location, &types);
                        settled.extend(records.into_iter().map(|(r, server_id)| RowOutcome {
                            location: location.clone(),
                            identifier: Some(BusinessIdentifier {
                                system: spec.identifier_system.clone(),
                                value: r.record_key,
                            }),
                            resource_type: r.resource_type,
                            status: OutcomeStatus::Unchanged,
                            server_id: Some(server_id),
                            http_status: None,
                            attempts: 0,
                            message: None,
                        }));
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Ok(RowResult::Fresh(mapped, hashes)) => {
                    if let (Some((source_hash, content)), Mapped::Resources(rs)) =
                        (hashes, &mapped.mapped)
                    {
                        rendered.extend(rs.iter().zip(content).map(|(r, content_hash)| {
                            RenderedRecord {
                                record: RecordRef::of(r),
                                source_hash: source_hash.clone(),
                                content_hash,
                            }
                        }));
                    }
                    Ok(mapped)
                }
                Err(e) => Err(e),
            };
            let result = result.and_then(|mapped| self.check_patient(&key_column, item, mapped));
            match result {
                Ok(mapped) => {
                    let types: Vec<&str> = match &mapped.mapped {
                        Mapped::Patient(_) => vec!["Patient"],
                        Mapped::Resources(rs) => {
                            rs.iter().map(|r| r.resource_type.as_str()).collect()
                        }
                    };
                    self.report
                        .mapped(counter, location, &types, &mapped.warnings);
                    match mapped.mapped {
                        Mapped::Patient(p) => patients.push(*p),
                        Mapped::Resources(mut rs) => resources.append(&mut rs),
                    }
                }
                Err(e) => {
                    self.report.rejected(counter, &e);
                    if spec.kind == MappingKind::Patient {
                        self.remember_rejected_patient(spec, item);
                    }
                    let (header, raw) = match item {
                        SourceItem::Row(r) => (Some(&*r.header), r.raw.as_slice()),
                        SourceItem::Reject(r) => (r.header.as_deref(), r.raw.as_slice()),
                    };
                    tracing::debug!(location = %e.location(), kind = e.kind(), "Row rejected");
                    self.rejects
                        .write(&spec.name, &e, header, raw)
                        .map_err(|source| PipelineError::Io {
                            path: self.rejects.path().to_path_buf(),
                            source,
                        })?;
                }
            }
        }
        if let Some(known) = &self.known_rows
            && let Err(e) = known.rendered(&rendered)
        {
            tracing::warn!(error = %e, "Could not note the rendered rows; they are rendered again next run");
        }
        let mut outcomes = Vec::new();
        if !settled.is_empty() {
            outcomes.extend(self.sink.unchanged(settled)?);
        }
        if !patients.is_empty() {
            outcomes.extend(self.sink.patients(patients)?);
        }
        if !resources.is_empty() {
            outcomes.extend(self.sink.resources(resources)?);
        }
        for o in &outcomes {
            record_outcome(&mut self.report, &mut self.rejects, o)?;
        }
        Ok(())
    }

    fn remember_rejected_patient(&mut self, spec: &crate::mapping::MappingSpec, item: &SourceItem) {
        let SourceItem::Row(row) = item else {
            return;
        };
        let parts: Option<Vec<String>> = spec
            .patient_key
            .iter()
            .map(|c| {
                row.get(c)
                    .filter(|v| !v.is_null())
                    .map(|v| v.to_string().trim().to_string())
                    .filter(|s| !s.is_empty())
            })
            .collect();
        if let Some(parts) = parts {
            self.rejected_patients
                .entry(parts.join(crate::mapping::KEY_SEPARATOR))
                .or_insert_with(|| row.location.clone());
        }
    }

    /// Patients must be unique; other resources must belong to a patient mapped in this run
    /// (when the run maps patients at all).
    fn check_patient(
        &mut self,
        key_column: &str,
        item: &SourceItem,
        mapped: MappedRow,
    ) -> Result<MappedRow, RowError> {
        let SourceItem::Row(row) = item else {
            return Ok(mapped);
        };
        match &mapped.mapped {
            Mapped::Patient(_) => {
                if let Some(first) = self.patients.get(&mapped.patient_key) {
                    return Err(RowError::DuplicatePatient {
                        location: row.location.clone(),
                        column: key_column.to_string(),
                        key: mapped.patient_key.clone(),
                        first: Box::new(first.clone()),
                    });
                }
                self.patients
                    .insert(mapped.patient_key.clone(), row.location.clone());
            }
            Mapped::Resources(_) => {
                self.check_patient_key(key_column, &row.location, &mapped.patient_key)?
            }
        }
        Ok(mapped)
    }

    /// A resource's patient must have been mapped in this run (when the run maps patients).
    fn check_patient_key(
        &self,
        key_column: &str,
        location: &RowLocation,
        patient_key: &str,
    ) -> Result<(), RowError> {
        if self.have_patient_mapping && !self.patients.contains_key(patient_key) {
            return Err(RowError::UnknownPatient {
                location: location.clone(),
                column: key_column.to_string(),
                key: patient_key.to_string(),
                similar: self.similar_patient(patient_key),
                rejected_at: self
                    .rejected_patients
                    .get(patient_key)
                    .map(|l| Box::new(l.clone())),
            });
        }
        Ok(())
    }
}

impl RunState<'_> {
    /// A mapped patient whose key differs from `key` only in leading zeros, case or spaces.
    fn similar_patient(&self, key: &str) -> Option<String> {
        let mut loose = self.loose_patients.borrow_mut();
        if loose.0 != self.patients.len() {
            let index = self
                .patients
                .keys()
                .map(|k| (loose_key(k), k.clone()))
                .collect();
            *loose = (self.patients.len(), index);
        }
        loose.1.get(&loose_key(key)).cloned()
    }
}

/// A patient key without leading zeros, surrounding spaces or case, part by part: what a key
/// typed as a number in one file and as text in another still share.
fn loose_key(key: &str) -> String {
    key.split(crate::mapping::KEY_SEPARATOR)
        .map(|part| {
            let part = part.trim();
            let digits = part.trim_start_matches('0');
            if digits.is_empty() && !part.is_empty() {
                "0".to_string()
            } else {
                digits.to_lowercase()
            }
        })
        .collect::<Vec<_>>()
        .join(crate::mapping::KEY_SEPARATOR)
}

/// The sha256 (hex) of a config file's bytes.
pub fn config_sha256(path: &std::path::Path) -> std::io::Result<String> {
    crate::report::sha256_file(path)
}

/// The sources of a pipeline config, opened with the readers ([`crate::source::open`]).
pub struct ConfigSources<'a> {
    pub config: &'a crate::config::PipelineConfig,
}

impl Sources for ConfigSources<'_> {
    fn open(
        &mut self,
        source: &str,
    ) -> Result<RowStream, Box<dyn std::error::Error + Send + Sync>> {
        let cfg = self
            .config
            .sources
            .get(source)
            .ok_or_else(|| format!("no source {source:?} in the config"))?;
        let reader = crate::source::open(source, cfg, &self.config.defaults)?;
        let header = reader.header().clone();
        Ok(Box::new(reader.map(move |item| match item {
            Ok(row) => Ok(SourceItem::Row(row)),
            Err(crate::source::ReadError::Row(e)) => Ok(SourceItem::Reject(RowReject {
                message: e.kind.to_string(),
                location: e.location,
                header: Some(header.clone()),
                raw: e.raw,
            })),
            Err(crate::source::ReadError::Fatal(e)) => Err(Box::new(e) as Box<_>),
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::Value;

    /// Rows held in memory, by source name.
    struct Memory(HashMap<String, Vec<Row>>);

    impl Sources for Memory {
        fn open(
            &mut self,
            source: &str,
        ) -> Result<RowStream, Box<dyn std::error::Error + Send + Sync>> {
            let rows = self.0.get(source).cloned().ok_or("no such source")?;
            Ok(Box::new(rows.into_iter().map(|r| Ok(SourceItem::Row(r)))))
        }
    }

    /// Records the order in which resources arrive.
    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<Vec<String>>>);

    impl Sink for Recorder {
        fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError> {
            let mut log = self.0.lock().map_err(|_| SinkError::Interrupted)?;
            log.extend(
                batch
                    .iter()
                    .map(|p| format!("Patient {}", p.resource.patient_key)),
            );
            Ok(Vec::new())
        }
        fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError> {
            let mut log = self.0.lock().map_err(|_| SinkError::Interrupted)?;
            log.extend(
                batch
                    .iter()
                    .map(|r| format!("{} {}", r.resource_type, r.identifier.value)),
            );
            // The sink refuses one resource: it must reach the report and the rejects file.
            Ok(batch
                .iter()
                .filter(|r| r.identifier.value == "L7")
                .map(|r| RowOutcome {
                    location: r.location.clone(),
                    resource_type: r.resource_type.clone(),
                    identifier: Some(r.identifier.clone()),
                    status: OutcomeStatus::Rejected,
                    server_id: None,
                    http_status: Some(422),
                    attempts: 1,
                    message: Some("refused by the target".into()),
                })
                .collect())
        }
        fn finish(self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError> {
            Ok(Vec::new())
        }
    }

    fn rows(file: &str, header: &[&str], data: Vec<Vec<Value>>) -> Vec<Row> {
        let header = Arc::new(Header::new(header.iter().copied()));
        data.into_iter()
            .enumerate()
            .map(|(i, values)| Row {
                location: RowLocation {
                    file: file.into(),
                    sheet: None,
                    row: i as u64 + 2,
                },
                header: header.clone(),
                raw: values.iter().map(|v| v.to_string()).collect(),
                values,
                errors: Vec::new(),
            })
            .collect()
    }

    fn setup(dir: &std::path::Path) -> (crate::config::PipelineConfig, Memory) {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        // Labs listed first on purpose: patients must still reach the sink first.
        let text = format!(
            "mappings = [{:?}, {:?}]\n[center]\nccn = \"12001\"\n[sources.labs]\npath = \"l.csv\"\n[sources.patients]\npath = \"p.csv\"\n",
            repo.join("mappings/cibmtr-lab.toml").display().to_string(),
            repo.join("mappings/cibmtr-patient.toml")
                .display()
                .to_string(),
        );
        let path = dir.join("p.toml");
        std::fs::write(&path, text).expect("config");
        let config = crate::config::PipelineConfig::load(&path).expect("config loads");
        let t = |s: &str| Value::Text(s.to_string());
        let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 2).expect("date");
        let patients = rows(
            "p.csv",
            &[
                "mrn",
                "first_name",
                "last_name",
                "birth_date",
                "sex",
                "race",
                "ethnicity",
                "ssn",
            ],
            (0..5)
                .map(|i| {
                    vec![
                        t(&format!("P{i}")),
                        t("A"),
                        t("B"),
                        Value::Date(date),
                        t("F"),
                        t("W"),
                        t("N"),
                        Value::Null,
                    ]
                })
                .collect(),
        );
        let at = date.and_hms_opt(8, 0, 0).expect("time");
        let labs = rows(
            "l.csv",
            &[
                "lab_id",
                "mrn",
                "test_code",
                "value",
                "unit",
                "collected_at",
                "ref_low",
                "ref_high",
                "comparator",
            ],
            (0..40)
                .map(|i| {
                    vec![
                        t(&format!("L{i}")),
                        t(&format!("P{}", i % 6)),
                        t("HGB"),
                        Value::Integer(12),
                        t("g/dL"),
                        Value::DateTime(at),
                        Value::Null,
                        Value::Null,
                        Value::Null,
                    ]
                })
                .collect(),
        );
        let sources = Memory(HashMap::from([
            ("patients".to_string(), patients),
            ("labs".to_string(), labs),
        ]));
        (config, sources)
    }

    fn run_with(jobs: usize, batch: usize) -> (Vec<String>, RunReport, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, mut sources) = setup(dir.path());
        let set = MappingSet::load(&config).expect("mappings load");
        let recorder = Recorder::default();
        let opts = RunOptions {
            jobs,
            batch_size: batch,
            report_dir: dir.path().join("out"),
            config_sha256: "x".into(),
            dry_run: true,
            progress: false,
            known_rows: None,
        };
        let report = run(&set, &mut sources, Box::new(recorder.clone()), &opts).expect("run");
        let rejects = std::fs::read_to_string(dir.path().join("out/rejects.csv")).expect("rejects");
        let log = recorder.0.lock().map(|l| l.clone()).unwrap_or_default();
        (log, report, rejects)
    }

    #[test]
    fn a_source_hash_changes_with_the_row_and_with_the_mappings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (config, sources) = setup(dir.path());
        let set = MappingSet::load(&config).expect("mappings load");
        let labs = set.index_of("labs").expect("labs mapping");
        let patients = set.index_of("patients").expect("patients mapping");
        let rows = &sources.0["labs"];
        let h = |set: &MappingSet, row: &Row| set.source_hash(labs, row);
        assert_eq!(h(&set, &rows[0]), h(&set, &rows[0].clone()));
        assert_ne!(h(&set, &rows[0]), h(&set, &rows[1]));
        let mut edited = rows[0].clone();
        edited.values[3] = Value::Integer(13);
        assert_ne!(h(&set, &rows[0]), h(&set, &edited));
        // Text "12" and the number 12 are different cells.
        let mut as_text = rows[0].clone();
        as_text.values[3] = Value::Text("12".into());
        assert_ne!(h(&set, &rows[0]), h(&set, &as_text));
        // Another center renders other resources from the same row.
        let other = dir.path().join("other.toml");
        let text = std::fs::read_to_string(&config.file)
            .expect("config")
            .replace("12001", "12002");
        std::fs::write(&other, text).expect("write");
        let config2 = crate::config::PipelineConfig::load(&other).expect("config loads");
        let set2 = MappingSet::load(&config2).expect("mappings load");
        assert_ne!(h(&set, &rows[0]), h(&set2, &rows[0]));

        let (patient_key, refs) = set.record_refs(labs, &rows[0]).expect("a lab row");
        assert_eq!(patient_key, "P0");
        assert_eq!(refs, [RecordRef::new("Observation", "L0")]);
        let p = &sources.0["patients"][0];
        assert!(
            set.record_refs(patients, p).is_none(),
            "patients are never settled"
        );
    }

    #[test]
    fn patients_come_first_and_order_does_not_depend_on_threads_or_batches() {
        let (log, report, rejects) = run_with(1, 7);
        assert_eq!(
            log[..5],
            [
                "Patient P0",
                "Patient P1",
                "Patient P2",
                "Patient P3",
                "Patient P4"
            ]
        );
        assert_eq!(log[5], "Observation L0");
        // Labs of P5 (every sixth) name no patient.
        assert_eq!(report.rows_rejected, 6);
        assert_eq!(report.rejects_by_kind["unknown_patient"], 6);
        assert_eq!(log.len(), 5 + 34);
        assert_eq!(report.sink_rejected, 1);
        assert!(
            rejects.contains("l.csv:9,,,Observation refused: refused by the target"),
            "{rejects}"
        );
        for (jobs, batch) in [(2, 7), (4, 7), (2, 1), (4, 2048)] {
            let (other, r, rej) = run_with(jobs, batch);
            assert_eq!(other, log, "jobs {jobs} batch {batch}");
            assert_eq!(r.rows_rejected, report.rows_rejected);
            if batch == 7 {
                assert_eq!(rej, rejects, "jobs {jobs}");
            } else {
                // A sink's refusals are recorded after the mapping rejects of their batch, so
                // only the batch size moves them.
                let sorted = |s: &str| {
                    let mut l: Vec<String> = s.lines().map(str::to_string).collect();
                    l.sort();
                    l
                };
                assert_eq!(sorted(&rej), sorted(&rejects), "batch {batch}");
            }
        }
    }
}
