//! The CRID step: one CIBMTR Research ID per patient, behind the [`CridAssigner`] interface so that
//! the newer `$crid-assignment` operation can replace `PUT /CRID` without touching the loader.
//!
//! Implementations: [`CridService`] (`PUT {base}/CRID`), [`ColumnCrid`] (a CRID the source
//! already carries) and [`NoCrid`] (generic FHIR servers). An ambiguous answer is never resolved
//! by guessing: the patient is rejected with the reason. Demographics are personal data and never
//! appear in logs or messages.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use reqwest::Method;
use serde_json::{Map, Value, json};
use url::Url;

use super::http::{Call, CallError, Transport};
use super::token::AuthError;
use crate::resource::MappedPatient;

/// A CRID. The service sends a JSON number that may exceed 2^53 (kept exactly as digits); the
/// Patient identifier carries it as a string.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Crid(String);

impl Crid {
    /// Accepts a non-empty string of ASCII digits.
    pub fn parse(text: &str) -> Option<Crid> {
        let t = text.trim();
        (!t.is_empty() && t.len() <= 32 && t.bytes().all(|b| b.is_ascii_digit()))
            .then(|| Crid(t.to_string()))
    }

    /// From a JSON number or digit string.
    pub fn from_json(v: &Value) -> Option<Crid> {
        match v {
            Value::Number(n) => Crid::parse(&n.to_string()),
            Value::String(s) => Crid::parse(s),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// As a number, when it fits.
    pub fn as_u64(&self) -> Option<u64> {
        self.0.parse().ok()
    }
}

impl fmt::Display for Crid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the CRID step decided for one patient.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CridOutcome {
    Assigned {
        crid: Crid,
        attempts: u32,
        /// The service made this CRID for this very request (a top-level `crid` on the first
        /// attempt): no Patient can carry it yet, so the Patient search may be skipped.
        new: bool,
    },
    /// This target uses no CRID.
    NotUsed,
    /// The patient (and every resource of it) is rejected.
    Rejected {
        reason: String,
        http_status: Option<u16>,
        attempts: u32,
    },
}

/// A failure that stops the run (not just one patient).
#[derive(Debug, thiserror::Error)]
pub enum CridError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("CRID service {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: CallError,
    },
}

/// The future a [`CridAssigner`] returns.
pub type CridFuture<'a> = Pin<Box<dyn Future<Output = Result<CridOutcome, CridError>> + Send + 'a>>;

/// Obtains a patient's CRID.
pub trait CridAssigner: Send + Sync {
    fn assign<'a>(&'a self, patient: &'a MappedPatient) -> CridFuture<'a>;
}

/// `PUT {base}/CRID` with the mapped demographics.
pub struct CridService {
    pub transport: Arc<Transport>,
    pub url: Url,
    pub ccn: String,
}

impl CridAssigner for CridService {
    fn assign<'a>(&'a self, patient: &'a MappedPatient) -> CridFuture<'a> {
        Box::pin(async move {
            let Some(demographics) = &patient.crid_demographics else {
                return Ok(CridOutcome::Rejected {
                    reason: "the mapping produced no CRID demographics for this patient".into(),
                    http_status: None,
                    attempts: 0,
                });
            };
            let body = request_body(&self.ccn, demographics);
            let call = Call {
                method: Method::PUT,
                url: self.url.clone(),
                body: Some(serde_json::to_vec(&body).unwrap_or_default()),
                content_type: "application/json",
                // The service is idempotent by design: the same demographics return the same CRID.
                repeatable: true,
            };
            let reply = match self.transport.send(&call).await {
                Ok(r) => r,
                Err(CallError::Auth(e)) => return Err(e.into()),
                Err(source @ CallError::GaveUp { status: None, .. }) => {
                    return Err(CridError::Unreachable {
                        url: self.url.to_string(),
                        source,
                    });
                }
                Err(e) => {
                    let http_status = match &e {
                        CallError::GaveUp { status, .. } => *status,
                        _ => None,
                    };
                    return Ok(CridOutcome::Rejected {
                        reason: format!("CRID service: {e}"),
                        http_status,
                        attempts: e.attempts(),
                    });
                }
            };
            if reply.status == 403 {
                return Err(AuthError::Forbidden {
                    detail: Some(format!(
                        "the token is not entitled to center {} at the CRID service",
                        self.ccn
                    )),
                }
                .into());
            }
            if !(200..300).contains(&reply.status) {
                return Ok(CridOutcome::Rejected {
                    reason: format!(
                        "CRID service refused the patient: {}",
                        error_message(&reply.body)
                    ),
                    http_status: Some(reply.status),
                    attempts: reply.attempts,
                });
            }
            Ok(match interpret_answer(&reply.body) {
                Ok((crid, new)) => CridOutcome::Assigned {
                    new: reply.attempts <= 1 && new,
                    crid,
                    attempts: reply.attempts,
                },
                Err(reason) => CridOutcome::Rejected {
                    reason,
                    http_status: Some(reply.status),
                    attempts: reply.attempts,
                },
            })
        })
    }
}

/// The request body: `ccn` plus the demographics with null and empty values left out.
pub fn request_body(ccn: &str, demographics: &Map<String, Value>) -> Value {
    let patient: Map<String, Value> = demographics
        .iter()
        .filter(|(_, v)| match v {
            Value::Null => false,
            Value::String(s) => !s.is_empty(),
            Value::Array(a) => !a.is_empty(),
            _ => true,
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    json!({ "ccn": ccn, "patient": patient })
}

/// Reads the CRID from a 2xx answer: exactly one perfect match, or a new top-level `crid`.
/// Anything else is ambiguous and returned as the reason.
pub fn interpret(body: &[u8]) -> Result<Crid, String> {
    interpret_answer(body).map(|(crid, _)| crid)
}

/// [`interpret`], and whether the answer is the new-patient form (a top-level `crid` and no
/// perfect match) rather than a match with a patient the service knew.
pub fn interpret_answer(body: &[u8]) -> Result<(Crid, bool), String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|_| "CRID service answered with something that is not JSON".to_string())?;
    let perfect: Vec<&Value> = v
        .get("perfectMatch")
        .and_then(Value::as_array)
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    let top = v.get("crid").filter(|c| !c.is_null());
    let count = |k: &str| v.get(k).and_then(Value::as_array).map_or(0, Vec::len);
    match (perfect.as_slice(), top) {
        ([one], None) => one
            .get("crid")
            .and_then(Crid::from_json)
            .map(|c| (c, false))
            .ok_or_else(|| "CRID service: the perfect match carries no CRID".to_string()),
        ([one], Some(t)) => {
            let a = one.get("crid").and_then(Crid::from_json);
            let b = Crid::from_json(t);
            match (a, b) {
                (Some(a), Some(b)) if a == b => Ok((a, false)),
                _ => Err("ambiguous CRID: a perfect match and a different new CRID; resolve it with CIBMTR".into()),
            }
        }
        ([], Some(t)) => Crid::from_json(t)
            .map(|c| (c, true))
            .ok_or_else(|| "CRID service: the new CRID is not a number".to_string()),
        ([], None) => Err(format!(
            "ambiguous CRID: no perfect match and no new CRID ({} fuzzy, {} hidden matches); resolve it with CIBMTR",
            count("fuzzyMatch"),
            count("hiddenMatch")
        )),
        (many, _) => Err(format!(
            "ambiguous CRID: {} perfect matches; resolve it with CIBMTR",
            many.len()
        )),
    }
}

/// The `errorMessage` of an error answer, shortened; or a generic text.
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v.get("errorMessage")
                .or_else(|| v.get("message"))
                .and_then(Value::as_str)
                .map(|s| s.chars().take(300).collect())
        })
        .unwrap_or_else(|| "no error message".into())
}

/// A CRID the source carries (`known_crid`), for centers that already have one per patient.
pub struct ColumnCrid;

impl CridAssigner for ColumnCrid {
    fn assign<'a>(&'a self, patient: &'a MappedPatient) -> CridFuture<'a> {
        Box::pin(async move {
            Ok(match patient.known_crid.as_deref().map(Crid::parse) {
                Some(Some(crid)) => CridOutcome::Assigned {
                    crid,
                    attempts: 0,
                    new: false,
                },
                Some(None) => CridOutcome::Rejected {
                    reason: "the CRID column does not hold a number".into(),
                    http_status: None,
                    attempts: 0,
                },
                None => CridOutcome::Rejected {
                    reason: "the CRID column is empty".into(),
                    http_status: None,
                    attempts: 0,
                },
            })
        })
    }
}

/// No CRID at all (generic FHIR servers).
pub struct NoCrid;

impl CridAssigner for NoCrid {
    fn assign<'a>(&'a self, _patient: &'a MappedPatient) -> CridFuture<'a> {
        Box::pin(async { Ok(CridOutcome::NotUsed) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_perfect_match_or_one_new_crid() {
        let ok = interpret(
            br#"{"perfectMatch":[{"matchedCriteria":["SSN","Gender","DateOfBirth"],"matchType":"Perfect1","crid":4598886}]}"#,
        );
        assert_eq!(ok.map(|c| c.to_string()), Ok("4598886".into()));
        let is_new = |body: &[u8]| interpret_answer(body).is_ok_and(|(_, new)| new);
        assert!(is_new(br#"{"crid":1982897480019337}"#));
        assert!(!is_new(
            br#"{"perfectMatch":[{"matchType":"Perfect1","crid":4598886}]}"#
        ));
        assert!(!is_new(br#"{"perfectMatch":[{"crid":77}],"crid":77}"#));
        let big = interpret(br#"{"crid":1982897480019337}"#).expect("new crid");
        assert_eq!(big.as_u64(), Some(1_982_897_480_019_337));
        assert_eq!(
            interpret(br#"{"perfectMatch":[],"crid":"77"}"#).map(|c| c.to_string()),
            Ok("77".into())
        );
    }

    #[test]
    fn several_or_none_is_ambiguous() {
        let two = interpret(br#"{"perfectMatch":[{"crid":1},{"crid":2}]}"#).expect_err("two");
        assert!(two.contains("2 perfect matches"), "{two}");
        let none = interpret(br#"{"fuzzyMatch":[{"crid":1}],"hiddenMatch":[]}"#).expect_err("none");
        assert!(none.contains("1 fuzzy"), "{none}");
        assert!(interpret(br#"{"perfectMatch":[{"crid":1}],"crid":2}"#).is_err());
        assert!(interpret(br#"{"crid":"12a"}"#).is_err());
        assert!(interpret(b"oops").is_err());
    }

    #[test]
    fn absent_fields_are_left_out() {
        let mut d = Map::new();
        d.insert("firstName".into(), json!("Ann"));
        d.insert("ssn".into(), Value::Null);
        d.insert("race".into(), json!([]));
        d.insert("nmdpRid".into(), json!(12));
        d.insert("ebmtId".into(), json!(""));
        let body = request_body("12001", &d);
        assert_eq!(
            body,
            json!({"ccn": "12001", "patient": {"firstName": "Ann", "nmdpRid": 12}})
        );
    }
}
