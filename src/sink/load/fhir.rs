//! The FHIR side of submission: searches, creates, updates and transaction Bundles against the
//! FHIR base, with the rule that makes repeats harmless — before any create whose earlier attempt
//! may have been stored, search by identifier; update what exists, create only what does not.
//!
//! It decides nothing about patients versus observations (that is the loader's ordering) and
//! never logs resource content.

use std::sync::Arc;

use reqwest::Method;
use serde_json::{Value, json};
use url::Url;

use super::http::{Call, CallError, FHIR_JSON, Reply, Transport};
use super::target::join;
use super::token::AuthError;
use crate::resource::BusinessIdentifier;

/// A search: resource type plus parameters (values are URL-encoded when sent; `|` becomes `%7C`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub resource_type: String,
    pub params: Vec<(String, String)>,
}

impl Query {
    /// `{type}?identifier=<system>|<value>`.
    pub fn by_identifier(resource_type: &str, id: &BusinessIdentifier) -> Query {
        Query {
            resource_type: resource_type.to_string(),
            params: vec![("identifier".into(), format!("{}|{}", id.system, id.value))],
        }
    }

    /// `Patient?_security=<system>|<code>&identifier=<crid system>|<crid>`.
    pub fn patient_by_crid(security: (&str, &str), crid_system: &str, crid: &str) -> Query {
        Query {
            resource_type: "Patient".into(),
            params: vec![
                ("_security".into(), format!("{}|{}", security.0, security.1)),
                ("identifier".into(), format!("{crid_system}|{crid}")),
            ],
        }
    }
}

/// What to do with the one resource a search finds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMatch {
    /// Use it as it is (the contract's rule for Patients: the server rewrites them — names
    /// removed, its own labels and narrative — so a comparison would never match).
    Reuse,
    /// Update it when its content differs from ours.
    UpdateIfChanged,
}

/// How one resource ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Upserted {
    Created {
        id: String,
        status: u16,
        attempts: u32,
    },
    Updated {
        id: String,
        status: u16,
        attempts: u32,
    },
    Unchanged {
        id: String,
        attempts: u32,
    },
    Rejected {
        status: Option<u16>,
        message: String,
        attempts: u32,
    },
    /// Sent, but the server's answer never came and searching could not settle it.
    Unknown {
        message: String,
        attempts: u32,
    },
}

impl Upserted {
    pub fn server_id(&self) -> Option<&str> {
        match self {
            Upserted::Created { id, .. }
            | Upserted::Updated { id, .. }
            | Upserted::Unchanged { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// A failure that must stop the run.
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("target unreachable: {0}")]
    Unreachable(CallError),
}

/// The result of one step inside an upsert.
enum Step<T> {
    Done(T),
    Fail(Upserted),
}

/// FHIR operations over a [`Transport`].
pub struct FhirClient {
    pub transport: Arc<Transport>,
    pub base: Url,
    /// Page size asked for in searches.
    pub page_size: u32,
}

impl FhirClient {
    pub fn new(transport: Arc<Transport>, base: Url) -> FhirClient {
        FhirClient {
            transport,
            base,
            page_size: 100,
        }
    }

    fn url(&self, segments: &[&str]) -> Url {
        join(&self.base, segments)
    }

    /// Every resource matching `query`, following `next` links on the same host.
    pub async fn search(&self, query: &Query) -> Result<(Vec<Value>, u32), SearchFailure> {
        let mut url = self.url(&[&query.resource_type]);
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in &query.params {
                q.append_pair(k, v);
            }
            q.append_pair("_count", &self.page_size.to_string());
        }
        let mut found = Vec::new();
        let mut attempts = 0;
        for _page in 0..1000 {
            let reply = self.transport.send(&Call::get(url.clone())).await?;
            attempts += reply.attempts;
            if reply.status != 200 {
                return Err(SearchFailure::Refused {
                    status: reply.status,
                    message: outcome_text(&reply.body),
                    attempts,
                });
            }
            let bundle: Value =
                serde_json::from_slice(&reply.body).map_err(|_| SearchFailure::Refused {
                    status: reply.status,
                    message: "the search answer is not JSON".into(),
                    attempts,
                })?;
            for e in bundle
                .get("entry")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let Some(r) = e.get("resource") else { continue };
                // Searches may include other types (`_include`, OperationOutcome): keep the asked one.
                if r.get("resourceType").and_then(Value::as_str) == Some(&query.resource_type) {
                    found.push(r.clone());
                }
            }
            match next_link(&bundle).and_then(|n| self.base.join(&n).ok()) {
                Some(next) if next.origin() == self.base.origin() => url = next,
                _ => break,
            }
        }
        Ok((found, attempts))
    }

    /// Searches, then updates the one match, creates when none, and rejects when several. When a
    /// create's answer is lost, searches again before anything else (never a blind repeat).
    /// `search_first = false` skips the first search when nothing can exist yet (a resource of a
    /// patient created in this run).
    pub async fn upsert(
        &self,
        query: &Query,
        body: &Value,
        search_first: bool,
        on_match: OnMatch,
    ) -> Result<Upserted, FatalError> {
        let policy = self.transport.retry_policy().clone();
        let mut attempts = 0u32;
        let mut search = search_first;
        let mut lost = 0u32;
        loop {
            if search {
                let hits = match self.search(query).await {
                    Ok((hits, a)) => {
                        attempts += a;
                        hits
                    }
                    Err(e) => return e.into_upserted(attempts, lost > 0),
                };
                match hits.as_slice() {
                    [] => {}
                    [one] => {
                        let Some(id) = one.get("id").and_then(Value::as_str) else {
                            return Ok(Upserted::Rejected {
                                status: None,
                                message: "the server's match has no id".into(),
                                attempts,
                            });
                        };
                        if lost > 0 {
                            // Our own earlier create, whose answer was lost.
                            return Ok(Upserted::Created {
                                id: id.to_string(),
                                status: 201,
                                attempts,
                            });
                        }
                        if on_match == OnMatch::Reuse || same_content(body, one) {
                            return Ok(Upserted::Unchanged {
                                id: id.to_string(),
                                attempts,
                            });
                        }
                        return self.update(&query.resource_type, id, body, attempts).await;
                    }
                    many => {
                        let ids: Vec<&str> = many
                            .iter()
                            .filter_map(|r| r.get("id").and_then(Value::as_str))
                            .take(5)
                            .collect();
                        return Ok(Upserted::Rejected {
                            status: None,
                            message: format!(
                                "duplicate on the server: {} {} resources match ({}); resolve by hand",
                                many.len(),
                                query.resource_type,
                                ids.join(", ")
                            ),
                            attempts,
                        });
                    }
                }
            }
            match self.create(&query.resource_type, body).await {
                Ok((reply, id)) => {
                    attempts += reply.attempts;
                    return Ok(match id {
                        Step::Done(id) => Upserted::Created {
                            id,
                            status: reply.status,
                            attempts,
                        },
                        Step::Fail(Upserted::Rejected {
                            status, message, ..
                        }) => Upserted::Rejected {
                            status,
                            message,
                            attempts,
                        },
                        Step::Fail(other) => other,
                    });
                }
                Err(CallError::Auth(e)) => return Err(e.into()),
                Err(CallError::AnswerLost {
                    attempts: a,
                    detail,
                }) => {
                    attempts += a;
                    lost += 1;
                    if !policy.may_retry(lost) {
                        return Ok(Upserted::Unknown {
                            message: format!("create answer lost {lost} times: {detail}"),
                            attempts,
                        });
                    }
                    tokio::time::sleep(policy.delay(lost, None)).await;
                    search = true;
                }
                Err(e @ CallError::GaveUp { .. }) => {
                    attempts += e.attempts();
                    return gave_up(e, attempts, lost > 0);
                }
            }
        }
    }

    /// POST; on 200/201 the new id from `Location` (or the body).
    async fn create(
        &self,
        resource_type: &str,
        body: &Value,
    ) -> Result<(Reply, Step<String>), CallError> {
        let call = Call {
            method: Method::POST,
            url: self.url(&[resource_type]),
            body: Some(serde_json::to_vec(body).unwrap_or_default()),
            content_type: FHIR_JSON,
            repeatable: false,
        };
        let reply = self.transport.send(&call).await?;
        let step = if matches!(reply.status, 200 | 201) {
            match reply
                .location
                .as_deref()
                .and_then(|l| id_from_location(l, resource_type))
                .or_else(|| id_from_body(&reply.body))
            {
                Some(id) => Step::Done(id),
                None => Step::Fail(Upserted::Unknown {
                    message: "created, but the answer names no id (no Location, no body id)".into(),
                    attempts: reply.attempts,
                }),
            }
        } else {
            Step::Fail(refused(&reply))
        };
        Ok((reply, step))
    }

    /// PUT `{type}/{id}` with `id` set in the body.
    pub async fn update(
        &self,
        resource_type: &str,
        id: &str,
        body: &Value,
        attempts_before: u32,
    ) -> Result<Upserted, FatalError> {
        let mut body = body.clone();
        if let Some(o) = body.as_object_mut() {
            o.insert("id".into(), Value::String(id.to_string()));
        }
        let call = Call {
            method: Method::PUT,
            url: self.url(&[resource_type, id]),
            body: Some(serde_json::to_vec(&body).unwrap_or_default()),
            content_type: FHIR_JSON,
            repeatable: true,
        };
        match self.transport.send(&call).await {
            Ok(reply) => {
                let attempts = attempts_before + reply.attempts;
                Ok(if matches!(reply.status, 200 | 201) {
                    Upserted::Updated {
                        id: id.to_string(),
                        status: reply.status,
                        attempts,
                    }
                } else {
                    match refused(&reply) {
                        Upserted::Rejected {
                            status, message, ..
                        } => Upserted::Rejected {
                            status,
                            message,
                            attempts,
                        },
                        other => other,
                    }
                })
            }
            Err(CallError::Auth(e)) => Err(e.into()),
            Err(e) => gave_up(e, attempts_before, false),
        }
    }

    /// POSTs a transaction Bundle to the FHIR base. The answer is returned uninterpreted.
    pub async fn transaction(&self, bundle: &Value) -> Result<Reply, CallError> {
        let call = Call {
            method: Method::POST,
            url: self.url(&[]),
            body: Some(serde_json::to_vec(bundle).unwrap_or_default()),
            content_type: FHIR_JSON,
            repeatable: false,
        };
        self.transport.send(&call).await
    }

    /// `GET {fhir base}/metadata`.
    pub async fn capabilities(&self) -> Result<Reply, CallError> {
        self.transport
            .send(&Call::get(self.url(&["metadata"])))
            .await
    }
}

/// A search that did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum SearchFailure {
    #[error("search refused (HTTP {status}): {message}")]
    Refused {
        status: u16,
        message: String,
        attempts: u32,
    },
    #[error(transparent)]
    Call(#[from] CallError),
}

impl SearchFailure {
    fn into_upserted(self, attempts: u32, sent: bool) -> Result<Upserted, FatalError> {
        match self {
            SearchFailure::Refused {
                status,
                message,
                attempts: a,
            } => Ok(if sent {
                Upserted::Unknown {
                    message: format!(
                        "search after a lost answer refused (HTTP {status}): {message}"
                    ),
                    attempts: attempts + a,
                }
            } else {
                Upserted::Rejected {
                    status: Some(status),
                    message: format!("search refused: {message}"),
                    attempts: attempts + a,
                }
            }),
            SearchFailure::Call(CallError::Auth(e)) => Err(e.into()),
            SearchFailure::Call(e) => {
                let a = e.attempts();
                gave_up(e, attempts + a, sent)
            }
        }
    }
}

/// Retries ran out: connection failures stop the run (the target is down); a status that kept
/// failing ends this row.
fn gave_up(e: CallError, attempts: u32, sent: bool) -> Result<Upserted, FatalError> {
    match e {
        CallError::GaveUp { status: None, .. } => Err(FatalError::Unreachable(e)),
        CallError::GaveUp { status, detail, .. } if !sent => Ok(Upserted::Rejected {
            status,
            message: format!("gave up after {attempts} attempts: {detail}"),
            attempts,
        }),
        other => Ok(Upserted::Unknown {
            message: other.to_string(),
            attempts,
        }),
    }
}

fn refused(reply: &Reply) -> Upserted {
    Upserted::Rejected {
        status: Some(reply.status),
        message: outcome_text(&reply.body),
        attempts: reply.attempts,
    }
}

/// The text of an OperationOutcome (`severity code: diagnostics` per issue), or a short generic
/// message for any other body.
pub fn outcome_text(body: &[u8]) -> String {
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return "the server gave no OperationOutcome".into();
    };
    let issues: Vec<String> = v
        .get("issue")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|i| {
            let s = |k: &str| i.get(k).and_then(Value::as_str).unwrap_or("");
            let text = i
                .get("diagnostics")
                .and_then(Value::as_str)
                .or_else(|| i.pointer("/details/text").and_then(Value::as_str))
                .unwrap_or("");
            let loc = i
                .get("expression")
                .or_else(|| i.get("location"))
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .filter(|l| !l.is_empty())
                .map(|l| format!(" [{l}]"))
                .unwrap_or_default();
            format!("{} {}: {text}{loc}", s("severity"), s("code"))
        })
        .collect();
    if issues.is_empty() {
        return v
            .get("errorMessage")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| "the server gave no OperationOutcome".into());
    }
    let mut text = issues.join("; ");
    if text.len() > 2000 {
        let cut = (0..=2000)
            .rev()
            .find(|i| text.is_char_boundary(*i))
            .unwrap_or(0);
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// The id in a `Location` such as `https://host/r4/Patient/123/_history/1` or `Patient/123`.
pub fn id_from_location(location: &str, resource_type: &str) -> Option<String> {
    let path = location.split(['?', '#']).next()?;
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let at = parts.iter().rposition(|p| *p == resource_type)?;
    let id = parts.get(at + 1)?;
    is_fhir_id(id).then(|| id.to_string())
}

fn id_from_body(body: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let id = v.get("id")?.as_str()?;
    is_fhir_id(id).then(|| id.to_string())
}

/// FHIR `id`: 1–64 of `[A-Za-z0-9\-\.]`.
pub fn is_fhir_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn next_link(bundle: &Value) -> Option<String> {
    bundle
        .get("link")?
        .as_array()?
        .iter()
        .find(|l| l.get("relation").and_then(Value::as_str) == Some("next"))?
        .get("url")?
        .as_str()
        .map(str::to_string)
}

/// Whether the server's copy holds what we would send: compared without the fields a server owns
/// (`id`, `meta.versionId`, `meta.lastUpdated`, `meta.source`) and without the narrative, which
/// servers may rewrite.
pub fn same_content(ours: &Value, theirs: &Value) -> bool {
    normalize(ours) == normalize(theirs)
}

fn normalize(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("text");
        let empty_meta = match o.get_mut("meta").and_then(Value::as_object_mut) {
            Some(meta) => {
                meta.remove("versionId");
                meta.remove("lastUpdated");
                meta.remove("source");
                meta.is_empty()
            }
            None => false,
        };
        if empty_meta {
            o.remove("meta");
        }
    }
    v
}

/// Replaces every string equal to `from` by `to` (the patient placeholder by `Patient/<id>`).
pub fn replace_reference(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::String(s) if s == from => *s = to.to_string(),
        Value::Array(a) => a.iter_mut().for_each(|x| replace_reference(x, from, to)),
        Value::Object(o) => o.values_mut().for_each(|x| replace_reference(x, from, to)),
        _ => {}
    }
}

/// Sets a Patient's identifier of `system` to `value`, adding an official one when absent.
pub fn set_identifier(patient: &mut Value, system: &str, value: &str) {
    let Some(o) = patient.as_object_mut() else {
        return;
    };
    let ids = o
        .entry("identifier")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !ids.is_array() {
        *ids = Value::Array(Vec::new());
    }
    let Some(list) = ids.as_array_mut() else {
        return;
    };
    let mut found = false;
    for id in list.iter_mut() {
        if id.get("system").and_then(Value::as_str) == Some(system)
            && let Some(io) = id.as_object_mut()
        {
            io.insert("value".into(), Value::String(value.to_string()));
            found = true;
        }
    }
    if !found {
        list.push(json!({"use": "official", "system": system, "value": value}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_from_locations() {
        let t = "Patient";
        assert_eq!(
            id_from_location("https://h/v1/r4/Patient/123/_history/1", t).as_deref(),
            Some("123")
        );
        assert_eq!(
            id_from_location("Patient/abc-9", t).as_deref(),
            Some("abc-9")
        );
        assert_eq!(
            id_from_location("http://h/r4/Patient/77?x=1", t).as_deref(),
            Some("77")
        );
        assert_eq!(id_from_location("http://h/r4/Observation/1", t), None);
        assert_eq!(id_from_location("http://h/r4/Patient/", t), None);
        assert_eq!(id_from_location("http://h/r4/Patient/a b", t), None);
    }

    #[test]
    fn content_comparison_ignores_server_fields() {
        let ours = json!({"resourceType": "Observation", "status": "final", "valueQuantity": {"value": 1.50}});
        let theirs = json!({"resourceType": "Observation", "id": "9", "meta": {"versionId": "2", "lastUpdated": "x"},
            "text": {"status": "generated", "div": "<div/>"}, "status": "final", "valueQuantity": {"value": 1.50}});
        assert!(same_content(&ours, &theirs));
        let changed = json!({"resourceType": "Observation", "status": "amended", "valueQuantity": {"value": 1.50}});
        assert!(!same_content(&changed, &theirs));
    }

    #[test]
    fn placeholders_and_crid_identifiers() {
        let mut obs = json!({"subject": {"reference": "urn:uuid:1"}, "note": [{"text": "urn:uuid:1 stays? no"}]});
        replace_reference(&mut obs, "urn:uuid:1", "Patient/5");
        assert_eq!(obs["subject"]["reference"], "Patient/5");
        assert_eq!(obs["note"][0]["text"], "urn:uuid:1 stays? no");

        let mut p = json!({"identifier": [{"use": "official", "system": "S", "value": "pending"}]});
        set_identifier(&mut p, "S", "42");
        assert_eq!(p["identifier"][0]["value"], "42");
        let mut q = json!({"resourceType": "Patient"});
        set_identifier(&mut q, "S", "42");
        assert_eq!(
            q["identifier"][0],
            json!({"use": "official", "system": "S", "value": "42"})
        );
    }

    #[test]
    fn operation_outcome_text() {
        let body = br#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"invalid","diagnostics":"effectiveDateTime needs a zone","expression":["Observation.effectiveDateTime"]}]}"#;
        assert_eq!(
            outcome_text(body),
            "error invalid: effectiveDateTime needs a zone [Observation.effectiveDateTime]"
        );
        assert_eq!(
            outcome_text(b"<html>"),
            "the server gave no OperationOutcome"
        );
    }
}
