//! The ledger's view of a run's sink: a wrapper around the real sink (the loader) that notes every
//! record the source produced (so records that left the source can be listed), keeps the outcomes
//! for the run report, and for `--retry-rejected` passes on only the records rejected before (with
//! the patients they need).
//!
//! Must not: change a resource, decide how it is sent, or drop an outcome.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use super::{RecordRef, StopSignal};
use crate::resource::{MappedPatient, MappedResource};
use crate::sink::{RowOutcome, Sink, SinkError};

/// What the wrapper saw, shared with the run session.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    pub seen: Vec<RecordRef>,
    pub outcomes: Vec<RowOutcome>,
    /// The inner sink's `finish` returned: the whole source went through.
    pub finished: bool,
}

pub(crate) struct LedgerSink {
    inner: Box<dyn Sink>,
    /// `--retry-rejected`: the records to pass on. Everything is held until `finish`, since a
    /// patient is needed only when one of its retried resources comes later.
    retry: Option<BTreeSet<RecordRef>>,
    held_patients: Vec<MappedPatient>,
    held_resources: Vec<MappedResource>,
    capture: Arc<Mutex<Capture>>,
    /// A stop requested while the source is still being read ends the run there, before
    /// anything is sent.
    stop: StopSignal,
}

impl LedgerSink {
    pub(crate) fn new(
        inner: Box<dyn Sink>,
        retry: Option<BTreeSet<RecordRef>>,
        capture: Arc<Mutex<Capture>>,
        stop: StopSignal,
    ) -> LedgerSink {
        LedgerSink {
            inner,
            retry,
            held_patients: Vec::new(),
            held_resources: Vec::new(),
            capture,
            stop,
        }
    }

    fn check_stop(&self) -> Result<(), SinkError> {
        if self.stop.is_stopped() {
            Err(SinkError::Interrupted)
        } else {
            Ok(())
        }
    }

    fn note<'a>(&self, records: impl Iterator<Item = &'a MappedResource>) {
        if let Ok(mut c) = self.capture.lock() {
            c.seen.extend(records.map(RecordRef::of));
        }
    }

    fn keep(&self, outcomes: &[RowOutcome]) {
        if let Ok(mut c) = self.capture.lock() {
            c.outcomes.extend_from_slice(outcomes);
        }
    }
}

impl Sink for LedgerSink {
    fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError> {
        self.check_stop()?;
        self.note(batch.iter().map(|p| &p.resource));
        if self.retry.is_some() {
            self.held_patients.extend(batch);
            return Ok(Vec::new());
        }
        let out = self.inner.patients(batch)?;
        self.keep(&out);
        Ok(out)
    }

    fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError> {
        self.check_stop()?;
        self.note(batch.iter());
        if let Some(retry) = &self.retry {
            self.held_resources.extend(
                batch
                    .into_iter()
                    .filter(|r| retry.contains(&RecordRef::of(r))),
            );
            return Ok(Vec::new());
        }
        let out = self.inner.resources(batch)?;
        self.keep(&out);
        Ok(out)
    }

    fn unchanged(&mut self, outcomes: Vec<RowOutcome>) -> Result<Vec<RowOutcome>, SinkError> {
        self.check_stop()?;
        if let Ok(mut c) = self.capture.lock() {
            c.seen.extend(outcomes.iter().filter_map(|o| {
                o.identifier
                    .as_ref()
                    .map(|id| RecordRef::new(o.resource_type.as_str(), super::record_key(id)))
            }));
        }
        self.keep(&outcomes);
        Ok(outcomes)
    }

    fn finish(self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError> {
        let LedgerSink {
            mut inner,
            retry,
            held_patients,
            held_resources,
            capture,
            stop: _,
        } = *self;
        let mut out = Vec::new();
        if let Some(retry) = retry {
            let needed: HashSet<&str> = held_resources
                .iter()
                .map(|r| r.patient_key.as_str())
                .collect();
            let patients: Vec<MappedPatient> = held_patients
                .into_iter()
                .filter(|p| {
                    needed.contains(p.resource.patient_key.as_str())
                        || retry.contains(&RecordRef::of(&p.resource))
                })
                .collect();
            tracing::info!(
                patients = patients.len(),
                resources = held_resources.len(),
                "Retrying the records rejected before"
            );
            if !patients.is_empty() {
                out.extend(inner.patients(patients)?);
            }
            if !held_resources.is_empty() {
                out.extend(inner.resources(held_resources)?);
            }
        }
        out.extend(inner.finish()?);
        if let Ok(mut c) = capture.lock() {
            c.outcomes.extend_from_slice(&out);
            c.finished = true;
        }
        Ok(out)
    }
}
