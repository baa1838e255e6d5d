//! Validation: FHIR R4 structure and the CIBMTR rules, for every resource before it leaves the
//! mapping stage (and, in the sandbox, for every resource a client sends).
//!
//! Issues name the FHIR path (`Observation.valueQuantity.code`) so that a failure can be traced to
//! the template and the row that produced it.

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
