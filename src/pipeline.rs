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

use crate::mapping::{Mapped, MappedRow, MappingKind, MappingSet, RowError};
use crate::report::{RejectsWriter, ReportBuilder, RunReport};
use crate::resource::{MappedPatient, MappedResource};
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
        have_patient_mapping: set
            .mappings()
            .iter()
            .any(|m| m.spec.kind == MappingKind::Patient),
        progress: progress.clone(),
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
    have_patient_mapping: bool,
    progress: indicatif::ProgressBar,
}

type Batch = Vec<SourceItem>;

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
        while !current.is_empty() {
            // Read the next batch while this one renders; results come back in row order.
            let (next, results) = pool.install(|| {
                rayon::join(
                    || read_batch(&mut stream, batch_size),
                    || {
                        current
                            .par_iter()
                            .map(|item| match item {
                                SourceItem::Row(row) => set.map_row(index, row),
                                SourceItem::Reject(r) => Err(RowError::Read {
                                    location: r.location.clone(),
                                    message: r.message.clone(),
                                }),
                            })
                            .collect::<Vec<_>>()
                    },
                )
            });
            self.progress.inc(current.len() as u64);
            self.handle(counter, spec, std::mem::take(&mut current), results)?;
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
        results: Vec<Result<MappedRow, RowError>>,
    ) -> Result<(), PipelineError> {
        let mut patients: Vec<MappedPatient> = Vec::new();
        let mut resources: Vec<MappedResource> = Vec::new();
        let key_column = spec.patient_key.join(",");
        for (item, result) in items.iter().zip(results) {
            let result = result.and_then(|mapped| self.check_patient(&key_column, item, mapped));
            match result {
                Ok(mapped) => {
                    let location = match item {
                        SourceItem::Row(r) => &r.location,
                        SourceItem::Reject(r) => &r.location,
                    };
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
        let mut outcomes = Vec::new();
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
                        first: first.clone(),
                    });
                }
                self.patients
                    .insert(mapped.patient_key.clone(), row.location.clone());
            }
            Mapped::Resources(_) => {
                if self.have_patient_mapping && !self.patients.contains_key(&mapped.patient_key) {
                    return Err(RowError::UnknownPatient {
                        location: row.location.clone(),
                        column: key_column.to_string(),
                        key: mapped.patient_key.clone(),
                    });
                }
            }
        }
        Ok(mapped)
    }
}

/// The sha256 (hex) of a config file's bytes.
pub fn config_sha256(path: &std::path::Path) -> std::io::Result<String> {
    crate::report::sha256_file(path)
}
