//! Validation: FHIR R4 structure and the CIBMTR rules, for every resource before it leaves the
//! mapping stage (and, in the sandbox, for every resource a client sends).
//!
//! Issues name the FHIR path (`Observation.valueQuantity.code`) so that a failure can be traced to
//! the template and the row that produced it.

mod cibmtr;
pub mod primitives;
mod r4;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

/// How bad an issue is: errors reject the resource, warnings go to the report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding about one resource.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Issue {
    pub severity: Severity,
    /// FHIR path, rooted at the resource type: `Observation.valueQuantity.code`,
    /// `Patient.identifier[0].system`, `Bundle.entry[3].resource.status`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The CIBMTR rules' parameters (see the API contract).
#[derive(Clone, Debug)]
pub struct CibmtrRules {
    /// The center number the security label must name (`rc_<ccn>`).
    pub ccn: String,
    pub security_system: String,
    pub crid_system: String,
    /// LOINC codes of the IG's priority value set; a code outside it is a warning.
    pub priority_loinc: Arc<HashSet<String>>,
}

/// Only errors, for callers that decide pass/fail.
pub fn errors(issues: &[Issue]) -> impl Iterator<Item = &Issue> {
    issues.iter().filter(|i| i.severity == Severity::Error)
}

/// The IG's priority LOINC value set (`cibmtr-priority-variables-2022`): `loinc,display` per line.
pub const PRIORITY_LOINC_CSV: &str = include_str!("cibmtr-priority-loinc.csv");

impl CibmtrRules {
    /// Rules for one center: `ccn` is the 5-digit center number the security label must carry
    /// (`rc_<ccn>`); the two systems are the configured URI family (see the API contract). The
    /// priority LOINC set is the IG's, shipped with fhirlift.
    pub fn new(ccn: &str, security_system: &str, crid_system: &str) -> Self {
        CibmtrRules {
            ccn: ccn.to_owned(),
            security_system: security_system.to_owned(),
            crid_system: crid_system.to_owned(),
            priority_loinc: Arc::clone(&cibmtr::PRIORITY_LOINC),
        }
    }
}

/// FHIR R4 structure: element names, cardinality, choice types, datatypes of nested elements,
/// primitive formats and required code bindings. Knows Patient, Observation and Bundle in full;
/// any other resource type gets the basic checks (known type name, `id`, `meta`, JSON rules).
pub fn validate_r4(resource: &serde_json::Value) -> Vec<Issue> {
    r4::validate(resource)
}

/// The CIBMTR rules (security label, CRID identifier, no personal data, LOINC, UCUM, time zones,
/// CMV reference ranges). Assumes nothing about R4 validity: run [`validate_r4`] too, or
/// [`validate`]. A transaction Bundle's entries are checked one by one.
pub fn validate_cibmtr(resource: &serde_json::Value, rules: &CibmtrRules) -> Vec<Issue> {
    cibmtr::validate(resource, rules)
}

/// Both [`validate_r4`] and [`validate_cibmtr`], R4 issues first.
pub fn validate(resource: &serde_json::Value, rules: &CibmtrRules) -> Vec<Issue> {
    let mut issues = validate_r4(resource);
    issues.extend(validate_cibmtr(resource, rules));
    issues
}

/// True for the one R4 error the CIBMTR service tolerates: a `text` without `div` (the IG's own
/// minimal Patient has `"text": {"status": "empty"}`). The sandbox accepts such a resource and
/// writes the narrative itself; fhirlift never emits one.
pub fn is_missing_narrative_div(issue: &Issue) -> bool {
    issue.severity == Severity::Error
        && issue.path.ends_with(".text.div")
        && issue.message == r4::MSG_REQUIRED
}
