//! Sinks: where validated resources go. The dry-run sink writes files and never builds an HTTP
//! client; the loader submits to a target. The pipeline hands every sink the same stream: all
//! patients first (in source row order), then every other resource (in source row order).

use serde::Serialize;

use crate::resource::{BusinessIdentifier, MappedPatient, MappedResource};
use crate::source::RowLocation;

pub mod dry_run;
pub mod load;

/// A sink that only counts what reaches it and sends nothing: how many resources a run would
/// submit (for the production confirmation). Every resource is reported as written.
#[derive(Debug, Default)]
pub struct CountSink;

impl Sink for CountSink {
    fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError> {
        Ok(batch
            .iter()
            .map(|p| RowOutcome::written(&p.resource))
            .collect())
    }
    fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError> {
        Ok(batch.iter().map(RowOutcome::written).collect())
    }
    fn finish(self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError> {
        Ok(Vec::new())
    }
}

/// What happened to one resource in a sink.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeStatus {
    /// Written to a file (dry run).
    Written,
    Created,
    Updated,
    /// The target (or the ledger) already held exactly this resource.
    Unchanged,
    /// Refused by the target or by a sink rule; the row goes to the rejects file.
    Rejected,
    /// Sent, but whether the target stored it is unknown (interrupted); the next run checks.
    Unknown,
}

/// The per-resource line of the run report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RowOutcome {
    #[serde(serialize_with = "crate::sink::display")]
    pub location: RowLocation,
    pub resource_type: String,
    pub identifier: Option<BusinessIdentifier>,
    pub status: OutcomeStatus,
    pub server_id: Option<String>,
    pub http_status: Option<u16>,
    pub attempts: u32,
    /// Why it was rejected (the server's OperationOutcome text, or the sink's reason).
    pub message: Option<String>,
}

impl RowOutcome {
    /// A resource a sink wrote (or counted) without sending it anywhere.
    pub fn written(r: &MappedResource) -> RowOutcome {
        RowOutcome {
            location: r.location.clone(),
            resource_type: r.resource_type.clone(),
            identifier: Some(r.identifier.clone()),
            status: OutcomeStatus::Written,
            server_id: None,
            http_status: None,
            attempts: 0,
            message: None,
        }
    }
}

/// A failure that stops the whole sink (not one row): cannot write the output folder, cannot
/// authenticate, the target is unreachable after retries.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("target: {0}")]
    Target(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("interrupted")]
    Interrupted,
}

/// A destination for mapped resources.
///
/// Each call returns the outcomes of the resources it settled (usually one per resource, in the
/// order received), so that the pipeline can count and record them as it goes and nobody has to
/// hold a whole run's outcomes in memory. A sink that settles resources later (e.g. buffered
/// transaction Bundles) returns their outcomes from a later call or from `finish`.
pub trait Sink: Send {
    /// A batch of patients, in source row order. Called for every patient before any `resources`.
    fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError>;
    /// A batch of non-Patient resources, in source row order.
    fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError>;
    /// Records the source still holds and that need nothing: a nightly run found them unchanged
    /// without rendering them (see [`crate::pipeline::KnownRows`]). A sink that keeps state about
    /// records notes them here; by default the outcomes are passed back as they are.
    fn unchanged(&mut self, outcomes: Vec<RowOutcome>) -> Result<Vec<RowOutcome>, SinkError> {
        Ok(outcomes)
    }
    /// Flushes everything and returns the outcomes not returned yet.
    fn finish(self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError>;
}

pub(crate) fn display<T: std::fmt::Display, S: serde::Serializer>(
    v: &T,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}
