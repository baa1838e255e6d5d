//! The run summary of a load: counts by outcome, requests, retries and request latency.
//!
//! Computed from the row outcomes and the transport's counters; it holds no row data.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use crate::sink::{OutcomeStatus, RowOutcome};

/// What a load did, in numbers.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoadSummary {
    /// The target, as the user named it (`sandbox`, `production`, a URL).
    pub target: String,
    pub resources: u64,
    /// Resources a write (create or update) was sent for and confirmed.
    pub sent: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub rejected: u64,
    /// Sent, but the outcome could not be confirmed (the next run checks).
    pub unknown: u64,
    /// Never sent: the run stopped first (the next run sends them).
    pub not_sent: u64,
    /// HTTP requests made, token requests excluded.
    pub requests: u64,
    /// Requests that were repeats of an earlier attempt.
    pub retried: u64,
    pub token_requests: u32,
    #[serde(serialize_with = "ms3")]
    pub latency: Option<[Duration; 3]>,
    #[serde(serialize_with = "secs")]
    pub elapsed: Duration,
}

impl LoadSummary {
    /// Counts the outcomes; the caller fills in the transport figures.
    pub fn from_outcomes(target: &str, outcomes: &[RowOutcome]) -> LoadSummary {
        let mut s = LoadSummary {
            target: target.to_string(),
            resources: outcomes.len() as u64,
            ..LoadSummary::default()
        };
        for o in outcomes {
            match o.status {
                OutcomeStatus::Created => s.created += 1,
                OutcomeStatus::Updated => s.updated += 1,
                OutcomeStatus::Unchanged => s.unchanged += 1,
                OutcomeStatus::Rejected => s.rejected += 1,
                // No attempt at all: the run stopped before this record's turn.
                OutcomeStatus::Unknown if o.attempts == 0 && o.server_id.is_none() => {
                    s.not_sent += 1
                }
                OutcomeStatus::Unknown => s.unknown += 1,
                OutcomeStatus::Written => {}
            }
        }
        s.sent = s.created + s.updated;
        s
    }

    /// Resources per second over the whole load.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.resources as f64 / secs
        } else {
            0.0
        }
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Loaded into {}: {} resources in {:.1} s — {} created, {} updated, {} unchanged, {} rejected{}{}",
            self.target,
            self.resources,
            self.elapsed.as_secs_f64(),
            self.created,
            self.updated,
            self.unchanged,
            self.rejected,
            if self.unknown > 0 {
                format!(", {} unconfirmed", self.unknown)
            } else {
                String::new()
            },
            if self.not_sent > 0 {
                format!(", {} not sent (the run stopped first)", self.not_sent)
            } else {
                String::new()
            }
        )?;
        write!(
            f,
            "Requests: {} ({} retried, {} token)",
            self.requests, self.retried, self.token_requests
        )?;
        if let Some([p50, p95, p99]) = self.latency {
            write!(
                f,
                "; latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms",
                p50.as_secs_f64() * 1e3,
                p95.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3
            )?;
        }
        Ok(())
    }
}

fn ms3<S: serde::Serializer>(v: &Option<[Duration; 3]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(d) => s.collect_seq(d.iter().map(|d| d.as_secs_f64() * 1e3)),
        None => s.serialize_none(),
    }
}

fn secs<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(v.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RowLocation;

    fn outcome(status: OutcomeStatus, attempts: u32, server_id: Option<&str>) -> RowOutcome {
        RowOutcome {
            location: RowLocation {
                file: "labs.csv".into(),
                sheet: None,
                row: 2,
            },
            resource_type: "Observation".into(),
            identifier: None,
            status,
            server_id: server_id.map(str::to_string),
            http_status: None,
            attempts,
            message: None,
        }
    }

    #[test]
    fn records_never_sent_are_told_apart_from_unconfirmed_ones() {
        let outcomes = [
            outcome(OutcomeStatus::Created, 1, Some("7")),
            // A create whose answer was lost: sent, unconfirmed.
            outcome(OutcomeStatus::Unknown, 3, None),
            // The run stopped before these were tried.
            outcome(OutcomeStatus::Unknown, 0, None),
            outcome(OutcomeStatus::Unknown, 0, None),
        ];
        let s = LoadSummary::from_outcomes("sandbox", &outcomes);
        assert_eq!((s.created, s.unknown, s.not_sent), (1, 1, 2));
        let text = s.to_string();
        assert!(
            text.contains("1 unconfirmed, 2 not sent (the run stopped first)"),
            "{text}"
        );
    }
}
