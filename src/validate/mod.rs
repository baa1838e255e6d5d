//! Validation: FHIR R4 structure and the CIBMTR rules, for every resource before it leaves the
//! mapping stage (and, in the sandbox, for every resource a client sends).
//!
//! Issues name the FHIR path (`Observation.valueQuantity.code`) so that a failure can be traced to
//! the template and the row that produced it. Validation never changes a resource, never does I/O
//! and never puts a checked value into a message.
//!
//! ```
//! use fhirlift::validate::{CibmtrRules, Severity, errors, validate};
//! use serde_json::json;
//!
//! let rules = CibmtrRules::new(
//!     "12001",
//!     "http://cibmtr.org/codesystem/transplant-center",
//!     "http://cibmtr.org/identifier/CRID",
//! );
//! let observation = json!({
//!     "resourceType": "Observation",
//!     "meta": {"security": [{"system": "http://cibmtr.org/codesystem/transplant-center",
//!                            "code": "rc_12001"}]},
//!     "status": "final",
//!     "category": [{"coding": [{"code": "laboratory",
//!         "system": "http://terminology.hl7.org/CodeSystem/observation-category"}]}],
//!     "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
//!     "subject": {"reference": "Patient/1"},
//!     "effectiveDateTime": "2024-03-01T08:30:00-05:00",
//!     "valueString": "13.2 g/dL"
//! });
//! let issues = validate(&observation, &rules);
//! let rejected: Vec<_> = errors(&issues).collect();
//! assert_eq!(rejected.len(), 1);
//! assert_eq!(rejected[0].path, "Observation.valueString");
//! assert_eq!(rejected[0].severity, Severity::Error);
//! ```

mod cibmtr;
pub(crate) mod crid;
pub mod primitives;
mod r4;

pub use crid::validate_crid_patient;

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use crate::resource::json::Node;

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
    r4::validate(&Node::from_value(resource))
}

/// The CIBMTR rules (security label, CRID identifier, no personal data, LOINC, UCUM, time zones,
/// CMV reference ranges). Assumes nothing about R4 validity: run [`validate_r4`] too, or
/// [`validate`]. A transaction Bundle's entries are checked one by one.
pub fn validate_cibmtr(resource: &serde_json::Value, rules: &CibmtrRules) -> Vec<Issue> {
    cibmtr::validate(&Node::from_value(resource), rules)
}

/// Both [`validate_r4`] and [`validate_cibmtr`], R4 issues first. A CIBMTR error on a path that
/// already has an R4 error is left out: one problem, one message (a dateTime without a zone is
/// reported once, as an R4 format error).
pub fn validate(resource: &serde_json::Value, rules: &CibmtrRules) -> Vec<Issue> {
    validate_node(&Node::from_value(resource), rules)
}

/// [`validate`] for a parsed tree (what the mapping stage holds).
pub fn validate_node(resource: &Node<'_>, rules: &CibmtrRules) -> Vec<Issue> {
    let mut issues = r4::validate(resource);
    let r4_len = issues.len();
    for issue in cibmtr::validate(resource, rules) {
        let duplicate = issue.severity == Severity::Error
            && issues[..r4_len]
                .iter()
                .any(|i| i.severity == Severity::Error && i.path == issue.path);
        if !duplicate {
            issues.push(issue);
        }
    }
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

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use serde_json::json;

    const SEC: &str = "http://cibmtr.org/codesystem/transplant-center";
    const CRID: &str = "http://cibmtr.org/identifier/CRID";

    fn rules() -> CibmtrRules {
        CibmtrRules::new("12001", SEC, CRID)
    }

    #[test]
    fn the_igs_minimal_patient_fails_only_on_the_tolerated_div() {
        let ig = json!({
            "resourceType": "Patient",
            "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
            "text": {"status": "empty"},
            "identifier": [{"use": "official", "system": CRID, "value": "3989144"}]
        });
        let issues = validate(&ig, &rules());
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].path, "Patient.text.div");
        assert!(is_missing_narrative_div(&issues[0]));
        // A malformed div is not tolerated.
        let mut bad = ig;
        bad["text"]["div"] = json!("<div>x</div>");
        let issues = validate(&bad, &rules());
        assert_eq!(issues.len(), 1);
        assert!(!is_missing_narrative_div(&issues[0]));
    }

    #[test]
    fn one_message_per_problem() {
        let obs = json!({
            "resourceType": "Observation",
            "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
            "status": "final",
            "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
            "subject": {"reference": "Patient/1"},
            "effectiveDateTime": "2024-03-01T08:30:00",
            "valueQuantity": {"value": 13.2, "system": "http://unitsofmeasure.org", "code": "g/dL"}
        });
        let issues = validate(&obs, &rules());
        assert_eq!(issues.len(), 1, "{issues:#?}");
        assert_eq!(issues[0].path, "Observation.effectiveDateTime");
        assert_eq!(validate_cibmtr(&obs, &rules()).len(), 1);
        assert_eq!(validate_r4(&obs).len(), 1);
    }

    /// The wording of every kind of issue, reviewed as a snapshot.
    #[test]
    fn issue_messages() {
        let obs = json!({
            "resourceType": "Observation",
            "id": "lab 1",
            "meta": {"security": [{"system": SEC, "code": "rc_1200"}]},
            "status": "done",
            "code": {"coding": [{"system": "http://loinc.org", "code": "718-8", "cod": "x"}]},
            "subject": {"reference": "Group/1"},
            "effectiveDateTime": "2024-03-01",
            "valueString": "13.2",
            "valueBoolean": true,
            "issued": null,
            "note": [],
            "referenceRange": [{"low": {"value": 5, "comparator": "<"}, "high": {"value": 1}}]
        });
        insta::assert_json_snapshot!("observation_issues", validate(&obs, &rules()));
        let patient = json!({
            "resourceType": "Patient",
            "meta": {"security": [{"system": SEC, "code": "rc_12002"}]},
            "text": {"status": "none", "div": "<div>x</div>"},
            "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "x"}],
            "name": [{"family": "x"}],
            "gender": "M",
            "birthDate": "1970-02-30",
            "extension": [{"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"}]
        });
        insta::assert_json_snapshot!("patient_issues", validate(&patient, &rules()));
        let bundle = json!({
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"fullUrl": "urn:uuid:X", "request": {"method": "POST"}},
                {"resource": {"resourceType": "Medication"}, "request": {"method": "DELETE", "url": "Medication/1"}}
            ]
        });
        insta::assert_json_snapshot!("bundle_issues", validate(&bundle, &rules()));
    }
}
