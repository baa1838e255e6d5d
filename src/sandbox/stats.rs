//! Request counters for `GET /_sandbox/stats`: requests per interaction and status, injected
//! faults, resources per type and CRIDs assigned. Tests and the loader's end-to-end checks count
//! on these keys, so they are part of the documented interface.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// A snapshot of the counters.
///
/// - `requests`: interaction → status → count. Interactions: `token`, `crid`, `metadata`,
///   `transaction`, `create:<Type>`, `update:<Type>`, `read:<Type>`, `search:<Type>`,
///   `unsupported`. Status is the HTTP code sent (`"201"`), or `"dropped"` for a connection closed
///   before processing. A lost answer counts under the status the server produced.
/// - `faults`: `latency`, `error`, `throttle`, `drop`, `lost_answer` → count.
/// - `resources`: type → stored resources; `crids_assigned`: CRIDs in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub requests: BTreeMap<String, BTreeMap<String, u64>>,
    pub faults: BTreeMap<String, u64>,
    pub resources: BTreeMap<String, u64>,
    pub crids_assigned: u64,
}

impl Stats {
    /// Requests of `interaction` answered with `status` (`"201"`, `"dropped"`).
    pub fn requests(&self, interaction: &str, status: &str) -> u64 {
        self.requests
            .get(interaction)
            .and_then(|m| m.get(status))
            .copied()
            .unwrap_or(0)
    }

    /// All requests of `interaction`, whatever the status.
    pub fn requests_total(&self, interaction: &str) -> u64 {
        self.requests
            .get(interaction)
            .map(|m| m.values().sum())
            .unwrap_or(0)
    }

    /// Stored resources of `rtype`.
    pub fn resources(&self, rtype: &str) -> u64 {
        self.resources.get(rtype).copied().unwrap_or(0)
    }

    /// Injected faults of `kind`.
    pub fn faults(&self, kind: &str) -> u64 {
        self.faults.get(kind).copied().unwrap_or(0)
    }
}

type ByStatus = BTreeMap<String, BTreeMap<String, u64>>;

/// The live counters.
#[derive(Default)]
pub struct Counters {
    inner: Mutex<(ByStatus, BTreeMap<String, u64>)>,
}

impl Counters {
    pub fn request(&self, interaction: &str, status: &str) {
        if let Ok(mut g) = self.inner.lock() {
            *g.0.entry(interaction.to_string())
                .or_default()
                .entry(status.to_string())
                .or_default() += 1;
        }
    }

    pub fn fault(&self, kind: &'static str) {
        if let Ok(mut g) = self.inner.lock() {
            *g.1.entry(kind.to_string()).or_default() += 1;
        }
    }

    pub fn snapshot(&self) -> (ByStatus, BTreeMap<String, u64>) {
        match self.inner.lock() {
            Ok(g) => (g.0.clone(), g.1.clone()),
            Err(_) => Default::default(),
        }
    }
}
