//! The FHIR R4 interactions of the sandbox: create, update, read, search, transaction and the
//! CapabilityStatement, over the [`Store`]. Pure request → response logic: no HTTP, no faults.
//!
//! Every resource must carry a center security label the caller's token is entitled to. Patients
//! are redacted on store (names and SSNs removed, a `REDACTED` label added) and get a narrative
//! written by the server, as the real service does. Errors are OperationOutcomes whose issue
//! expressions name the FHIR path; they never echo resource values.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use super::store::{Condition, Index, RefEntry, Store, StoreError, TokenEntry, TokenMatch, lock};
use super::{CENTER_SYSTEM, CENTER_SYSTEM_TERMINOLOGY, CRID_SYSTEM, CRID_SYSTEM_TERMINOLOGY};
use crate::validate::{Issue, Severity};

/// The SSN identifier system removed from Patients on store.
const SSN_SYSTEM: &str = "http://hl7.org/fhir/sid/us-ssn";
/// The label the server adds to Patients it redacted.
const REDACTED_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// A resource type the sandbox stores, and what can be searched on it.
pub struct TypeDef {
    pub name: &'static str,
    pub search: &'static [&'static str],
    /// Whether `subject` (a Patient reference) is indexed and checked.
    pub subject: bool,
    /// Whether `code.coding` is indexed.
    pub code: bool,
}

pub const TYPES: &[TypeDef] = &[
    TypeDef {
        name: "Patient",
        search: &["identifier", "_security"],
        subject: false,
        code: false,
    },
    TypeDef {
        name: "Observation",
        search: &[
            "identifier",
            "subject",
            "patient",
            "patient.identifier",
            "code",
            "_security",
        ],
        subject: true,
        code: true,
    },
    TypeDef {
        name: "Medication",
        search: &["identifier", "code", "_security"],
        subject: false,
        code: true,
    },
    TypeDef {
        name: "MedicationRequest",
        search: &[
            "identifier",
            "subject",
            "patient",
            "patient.identifier",
            "_security",
        ],
        subject: true,
        code: false,
    },
    TypeDef {
        name: "MedicationAdministration",
        search: &[
            "identifier",
            "subject",
            "patient",
            "patient.identifier",
            "_security",
        ],
        subject: true,
        code: false,
    },
];

pub fn type_def(name: &str) -> Option<&'static TypeDef> {
    TYPES.iter().find(|t| t.name == name)
}

/// One OperationOutcome issue.
#[derive(Debug, Clone)]
pub struct OoIssue {
    pub code: &'static str,
    pub diagnostics: String,
    pub expression: Option<String>,
}

/// A failed interaction: the HTTP status and the OperationOutcome issues.
#[derive(Debug)]
pub struct FhirError {
    pub status: u16,
    pub issues: Vec<OoIssue>,
}

impl FhirError {
    pub fn new(status: u16, code: &'static str, diagnostics: impl Into<String>) -> FhirError {
        FhirError {
            status,
            issues: vec![OoIssue {
                code,
                diagnostics: diagnostics.into(),
                expression: None,
            }],
        }
    }

    pub fn at(
        status: u16,
        code: &'static str,
        diagnostics: impl Into<String>,
        path: String,
    ) -> FhirError {
        FhirError {
            status,
            issues: vec![OoIssue {
                code,
                diagnostics: diagnostics.into(),
                expression: Some(path),
            }],
        }
    }

    pub fn outcome(&self) -> Value {
        operation_outcome(&self.issues)
    }
}

impl From<StoreError> for FhirError {
    fn from(e: StoreError) -> FhirError {
        tracing::error!(error = %crate::cli::error_chain(&e), "Sandbox store failed");
        FhirError::new(500, "exception", "the sandbox store failed")
    }
}

pub fn operation_outcome(issues: &[OoIssue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut o = Map::new();
            o.insert("severity".into(), json!("error"));
            o.insert("code".into(), json!(i.code));
            o.insert("diagnostics".into(), json!(i.diagnostics));
            if let Some(e) = &i.expression {
                o.insert("expression".into(), json!([e]));
            }
            Value::Object(o)
        })
        .collect();
    json!({"resourceType": "OperationOutcome", "issue": issues})
}

/// A successful interaction.
#[derive(Debug)]
pub struct FhirOk {
    pub status: u16,
    /// Absolute `Location` (creates and updates).
    pub location: Option<String>,
    pub version: Option<i64>,
    /// The body, already serialized.
    pub body: String,
}

/// Who is calling and where the server lives.
pub struct Ctx<'a> {
    /// `http://ADDR`
    pub base: &'a str,
    /// Centers the token is entitled to.
    pub ccns: &'a [String],
    /// `meta.lastUpdated` for everything written by this request.
    pub now: String,
    pub default_page_size: usize,
    pub max_page_size: usize,
    pub max_bundle_entries: usize,
}

/// Where an issue points: the resource itself, or an entry inside a transaction Bundle.
fn locate(prefix: Option<&str>, path: &str) -> String {
    match prefix {
        None => path.to_string(),
        Some(p) => match path.find(['.', '[']) {
            Some(i) => format!("{p}{}", &path[i..]),
            None => p.to_string(),
        },
    }
}

fn parse_json(body: &[u8]) -> Result<Value, FhirError> {
    serde_json::from_slice(body).map_err(|e| {
        // Line and column locate the problem without echoing content.
        FhirError::new(
            400,
            "structure",
            format!(
                "the body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        )
    })
}

/// FHIR R4 structure checks, shared with the mapping stage. Patients reach this with the
/// server's narrative already written, so the IG's minimal Patient (`text` without `div`) passes.
fn r4_issues(resource: &Value) -> Vec<Issue> {
    crate::validate::validate_r4(resource)
}

/// A resource that passed the checks that need no store: its center, its index rows and the
/// Patient its `subject` names (checked against the store by [`link_subject`]).
struct Checked {
    ccn: String,
    index: Index,
    subject: Option<(i64, String)>,
}

/// Checks and normalizes a resource about to be stored, without the store (so that it can run
/// outside the store lock).
fn check(
    ctx: &Ctx<'_>,
    tdef: &TypeDef,
    body: &mut Value,
    prefix: Option<&str>,
) -> Result<Checked, FhirError> {
    let t = tdef.name;
    let obj = body.as_object_mut().ok_or_else(|| {
        FhirError::at(
            400,
            "structure",
            "a resource must be a JSON object",
            locate(prefix, t),
        )
    })?;
    match obj.get("resourceType") {
        Some(Value::String(s)) if s == t => {}
        _ => {
            return Err(FhirError::at(
                400,
                "invalid",
                format!("resourceType must be `{t}` here"),
                locate(prefix, &format!("{t}.resourceType")),
            ));
        }
    }
    let ccn = center_label(obj, t, ctx, prefix)?;
    if t == "Patient" {
        redact_patient(obj, &ccn);
    }
    let issues: Vec<OoIssue> = r4_issues(body)
        .into_iter()
        .filter(|i| i.severity == Severity::Error)
        .map(|i| OoIssue {
            code: "invalid",
            diagnostics: i.message,
            expression: Some(locate(prefix, &i.path)),
        })
        .collect();
    if !issues.is_empty() {
        return Err(FhirError {
            status: 422,
            issues,
        });
    }
    let mut index = Index::default();
    let mut subject = None;
    index_tokens(body, "identifier", &["identifier"], &mut index);
    index_tokens(body, "_security", &["meta", "security"], &mut index);
    if tdef.code {
        index_tokens(body, "code", &["code", "coding"], &mut index);
    }
    if tdef.subject
        && let Some(reference) = body.pointer("/subject/reference")
    {
        let path = locate(prefix, &format!("{t}.subject.reference"));
        let target = reference
            .as_str()
            .and_then(|r| r.strip_prefix("Patient/"))
            .and_then(|id| id.parse::<i64>().ok())
            .ok_or_else(|| {
                FhirError::at(
                    422,
                    "invalid",
                    "subject must reference a Patient stored here (`Patient/<server id>`)",
                    path.clone(),
                )
            })?;
        subject = Some((target, path));
    }
    Ok(Checked {
        ccn,
        index,
        subject,
    })
}

/// The subject must be a stored Patient of a center the token may use.
fn link_subject(store: &Store, ctx: &Ctx<'_>, checked: &mut Checked) -> Result<(), FhirError> {
    let Some((target, path)) = checked.subject.take() else {
        return Ok(());
    };
    match store.ccn_of("Patient", target)? {
        None => Err(FhirError::at(
            422,
            "invalid",
            "the referenced Patient does not exist",
            path,
        )),
        Some(c) if !ctx.ccns.contains(&c) => Err(FhirError::at(
            403,
            "forbidden",
            "the referenced Patient belongs to a center this token may not use",
            path,
        )),
        Some(_) => {
            checked.index.refs.push(RefEntry {
                param: "subject",
                target_type: "Patient".into(),
                target_id: target,
            });
            Ok(())
        }
    }
}

/// Finds the center label and checks the token may use it.
fn center_label(
    obj: &Map<String, Value>,
    t: &str,
    ctx: &Ctx<'_>,
    prefix: Option<&str>,
) -> Result<String, FhirError> {
    let labels = obj
        .get("meta")
        .and_then(|m| m.get("security"))
        .and_then(Value::as_array);
    let mut found: Option<String> = None;
    for (i, l) in labels.into_iter().flatten().enumerate() {
        let system = l.get("system").and_then(Value::as_str);
        if system != Some(CENTER_SYSTEM) && system != Some(CENTER_SYSTEM_TERMINOLOGY) {
            continue;
        }
        let path = locate(prefix, &format!("{t}.meta.security[{i}].code"));
        let code = l.get("code").and_then(Value::as_str).unwrap_or("");
        let ccn = code
            .strip_prefix("rc_")
            .filter(|c| c.len() == 5 && c.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| {
                FhirError::at(
                    422,
                    "invalid",
                    "a center label code must match ^rc_[0-9]{5}$",
                    path.clone(),
                )
            })?;
        if !ctx.ccns.iter().any(|c| c == ccn) {
            return Err(FhirError::at(
                403,
                "forbidden",
                "the token is not entitled to this center",
                path,
            ));
        }
        if found.is_none() {
            found = Some(ccn.to_string());
        }
    }
    found.ok_or_else(|| {
        FhirError::at(
            422,
            "required",
            format!("meta.security must hold the center label ({CENTER_SYSTEM}|rc_NNNNN)"),
            locate(prefix, &format!("{t}.meta.security")),
        )
    })
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Removes names and SSNs, adds the `REDACTED` label and writes the server's narrative.
fn redact_patient(obj: &mut Map<String, Value>, ccn: &str) {
    obj.remove("name");
    if let Some(Value::Array(ids)) = obj.get_mut("identifier") {
        ids.retain(|i| i.get("system").and_then(Value::as_str) != Some(SSN_SYSTEM));
        if ids.is_empty() {
            obj.remove("identifier");
        }
    }
    let crid = obj
        .get("identifier")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|i| {
            let s = i.get("system").and_then(Value::as_str);
            s == Some(CRID_SYSTEM) || s == Some(CRID_SYSTEM_TERMINOLOGY)
        })
        .and_then(|i| i.get("value"))
        .and_then(Value::as_str)
        .map(escape_html);
    let text = match crid {
        Some(c) => format!("RC {ccn} Patient with CRID {c}"),
        None => format!("RC {ccn} Patient"),
    };
    obj.insert(
        "text".into(),
        json!({
            "status": "generated",
            "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{text}</div>"),
        }),
    );
    // `meta.security` exists: the center label was found there.
    if let Some(Value::Array(sec)) = obj.get_mut("meta").and_then(|m| m.get_mut("security")) {
        let has = sec.iter().any(|l| {
            l.get("system").and_then(Value::as_str) == Some(REDACTED_SYSTEM)
                && l.get("code").and_then(Value::as_str) == Some("REDACTED")
        });
        if !has {
            sec.push(json!({"system": REDACTED_SYSTEM, "code": "REDACTED", "display": "redacted"}));
        }
    }
}

fn index_tokens(body: &Value, param: &'static str, path: &[&str], index: &mut Index) {
    let mut cur = body;
    for p in path {
        match cur.get(p) {
            Some(v) => cur = v,
            None => return,
        }
    }
    for item in cur.as_array().into_iter().flatten() {
        let value = item
            .get("value")
            .or_else(|| item.get("code"))
            .and_then(Value::as_str);
        if let Some(value) = value {
            index.tokens.push(TokenEntry {
                param,
                system: item
                    .get("system")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                value: value.to_string(),
            });
        }
    }
}

/// Sets the server id, `meta.versionId` and `meta.lastUpdated`.
fn stamp(body: &mut Value, id: i64, version: i64, now: &str) {
    if let Some(obj) = body.as_object_mut() {
        obj.shift_insert(1.min(obj.len()), "id".into(), json!(id.to_string()));
        let meta = obj
            .entry("meta")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(m) = meta.as_object_mut() {
            m.shift_insert(0, "versionId".into(), json!(version.to_string()));
            m.shift_insert(1, "lastUpdated".into(), json!(now));
        }
    }
}

fn serialize(body: &Value) -> String {
    // Serializing a serde_json::Value cannot fail (string keys only).
    serde_json::to_string(body).unwrap_or_default()
}

fn location(ctx: &Ctx<'_>, t: &str, id: i64, version: i64) -> String {
    format!("{}/r4/{t}/{id}/_history/{version}", ctx.base)
}

fn known_type(t: &str) -> Result<&'static TypeDef, FhirError> {
    type_def(t).ok_or_else(|| {
        FhirError::new(
            405,
            "not-supported",
            format!("resource type `{t}` is not supported by this server"),
        )
    })
}

fn create_in(
    store: &mut Store,
    ctx: &Ctx<'_>,
    tdef: &TypeDef,
    mut checked: Checked,
    mut body: Value,
    id: Option<i64>,
) -> Result<(i64, String), FhirError> {
    link_subject(store, ctx, &mut checked)?;
    let id = id.unwrap_or_else(|| store.allocate_id());
    stamp(&mut body, id, 1, &ctx.now);
    let text = serialize(&body);
    store.insert(id, tdef.name, &checked.ccn, &ctx.now, &text, &checked.index)?;
    Ok((id, text))
}

/// `POST /r4/{type}`. Parsing and validation run before the store is locked.
pub fn create(
    store: &Mutex<Store>,
    ctx: &Ctx<'_>,
    t: &str,
    raw: &[u8],
) -> Result<FhirOk, FhirError> {
    let tdef = known_type(t)?;
    let mut body = parse_json(raw)?;
    let checked = check(ctx, tdef, &mut body, None)?;
    let (id, text) = lock(store).transaction(|s| create_in(s, ctx, tdef, checked, body, None))?;
    Ok(FhirOk {
        status: 201,
        location: Some(location(ctx, t, id, 1)),
        version: Some(1),
        body: text,
    })
}

fn parse_id(id: &str) -> Option<i64> {
    if id.is_empty() || id.len() > 18 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok()
}

fn update_in(
    store: &mut Store,
    ctx: &Ctx<'_>,
    tdef: &TypeDef,
    id: &str,
    mut checked: Checked,
    mut body: Value,
    prefix: Option<&str>,
) -> Result<(i64, i64, String), FhirError> {
    let t = tdef.name;
    let body_id = body.get("id").and_then(Value::as_str);
    if body_id != Some(id) {
        return Err(FhirError::at(
            400,
            "invalid",
            "the resource id must be present and equal the id in the URL",
            locate(prefix, &format!("{t}.id")),
        ));
    }
    let not_found = || FhirError::new(404, "not-found", format!("{t}/{id} does not exist"));
    let rid = parse_id(id).ok_or_else(not_found)?;
    let old = store.get(t, rid)?.ok_or_else(not_found)?;
    if !ctx.ccns.contains(&old.ccn) {
        return Err(FhirError::new(
            403,
            "forbidden",
            "the stored resource belongs to a center this token may not use",
        ));
    }
    link_subject(store, ctx, &mut checked)?;
    let version = old.version + 1;
    stamp(&mut body, rid, version, &ctx.now);
    let text = serialize(&body);
    store.update(rid, &checked.ccn, version, &ctx.now, &text, &checked.index)?;
    Ok((rid, version, text))
}

/// `PUT /r4/{type}/{id}`: a new version of an existing resource. An unknown id is a 404: the
/// server assigns ids, so update-as-create is not offered.
pub fn update(
    store: &Mutex<Store>,
    ctx: &Ctx<'_>,
    t: &str,
    id: &str,
    raw: &[u8],
) -> Result<FhirOk, FhirError> {
    let tdef = known_type(t)?;
    let mut body = parse_json(raw)?;
    let checked = check(ctx, tdef, &mut body, None)?;
    let (rid, version, text) =
        lock(store).transaction(|s| update_in(s, ctx, tdef, id, checked, body, None))?;
    Ok(FhirOk {
        status: 200,
        location: Some(location(ctx, t, rid, version)),
        version: Some(version),
        body: text,
    })
}

/// `GET /r4/{type}/{id}`.
pub fn read(store: &Store, ctx: &Ctx<'_>, t: &str, id: &str) -> Result<FhirOk, FhirError> {
    known_type(t)?;
    let not_found = || FhirError::new(404, "not-found", format!("{t}/{id} does not exist"));
    let rid = parse_id(id).ok_or_else(not_found)?;
    let stored = store.get(t, rid)?.ok_or_else(not_found)?;
    if !ctx.ccns.contains(&stored.ccn) {
        return Err(FhirError::new(
            403,
            "forbidden",
            "the resource belongs to a center this token may not use",
        ));
    }
    Ok(FhirOk {
        status: 200,
        location: None,
        version: Some(stored.version),
        body: stored.body,
    })
}

fn token_matches(param: &str, raw: &str) -> Result<Vec<TokenMatch>, FhirError> {
    raw.split(',')
        .map(|alt| {
            if alt.is_empty() {
                return Err(FhirError::new(
                    400,
                    "invalid",
                    format!("search parameter `{param}` has an empty value"),
                ));
            }
            Ok(match alt.split_once('|') {
                None => TokenMatch {
                    system: None,
                    value: Some(alt.to_string()),
                },
                Some((s, v)) => TokenMatch {
                    system: Some(s.to_string()),
                    value: (!v.is_empty()).then(|| v.to_string()),
                },
            })
        })
        .collect()
}

fn reference_targets(ctx: &Ctx<'_>, raw: &str) -> Vec<(String, i64)> {
    raw.split(',')
        .filter_map(|alt| {
            let local = alt
                .strip_prefix(ctx.base)
                .and_then(|r| r.strip_prefix("/r4/"))
                .unwrap_or(alt);
            let id = local.strip_prefix("Patient/").unwrap_or(local);
            parse_id(id).map(|n| ("Patient".to_string(), n))
        })
        .collect()
}

/// `GET /r4/{type}?…`: a searchset Bundle with `total`, one page of matches and a `next` link.
pub fn search(
    store: &Store,
    ctx: &Ctx<'_>,
    t: &str,
    query: &[(String, String)],
) -> Result<FhirOk, FhirError> {
    let tdef = known_type(t)?;
    let mut conditions = Vec::new();
    let mut count = ctx.default_page_size;
    let mut offset = 0usize;
    let mut summary_count = false;
    for (name, value) in query {
        let bad = |what: &str| {
            FhirError::new(400, "invalid", format!("search parameter `{name}`: {what}"))
        };
        match name.as_str() {
            "_count" => {
                count = value
                    .parse::<usize>()
                    .map_err(|_| bad("must be a whole number"))?
                    .min(ctx.max_page_size)
            }
            "_offset" => {
                offset = value
                    .parse::<usize>()
                    .map_err(|_| bad("must be a whole number"))?
            }
            "_summary" => {
                if value == "count" {
                    summary_count = true;
                } else if value != "false" {
                    return Err(bad("only `count` and `false` are supported"));
                }
            }
            "_format" => {
                if !value.contains("json") {
                    return Err(bad("only JSON is supported"));
                }
            }
            p if tdef.search.contains(&p) => match p {
                "identifier" | "_security" | "code" => {
                    let param = match p {
                        "identifier" => "identifier",
                        "_security" => "_security",
                        _ => "code",
                    };
                    conditions.push(Condition::Token {
                        param,
                        alternatives: token_matches(p, value)?,
                    });
                }
                "subject" | "patient" => {
                    let alternatives = reference_targets(ctx, value);
                    conditions.push(if alternatives.is_empty() {
                        Condition::Nothing
                    } else {
                        Condition::Ref {
                            param: "subject",
                            alternatives,
                        }
                    });
                }
                _ => conditions.push(Condition::ChainedIdentifier {
                    ref_param: "subject",
                    alternatives: token_matches(p, value)?,
                }),
            },
            _ => {
                return Err(FhirError::new(
                    400,
                    "not-supported",
                    format!(
                        "unknown search parameter `{name}` for {t}; supported: {}, _count, _offset, _summary",
                        tdef.search.join(", ")
                    ),
                ));
            }
        }
    }
    let (total, bodies) = store.search(t, ctx.ccns, &conditions, count, offset, !summary_count)?;
    let page_url = |off: usize| {
        let mut ser = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in query {
            if k != "_offset" && k != "_count" {
                ser.append_pair(k, v);
            }
        }
        ser.append_pair("_count", &count.to_string());
        if off > 0 {
            ser.append_pair("_offset", &off.to_string());
        }
        format!("{}/r4/{t}?{}", ctx.base, ser.finish())
    };
    let mut links = vec![json!({"relation": "self", "url": page_url(offset)})];
    let shown = bodies.len();
    if !summary_count && count > 0 && (offset + shown) < usize::try_from(total).unwrap_or(0) {
        links.push(json!({"relation": "next", "url": page_url(offset + count)}));
    }
    let mut entries = Vec::with_capacity(shown);
    for b in bodies {
        let resource: Value = serde_json::from_str(&b).unwrap_or(Value::Null);
        let id = resource.get("id").and_then(Value::as_str).unwrap_or("");
        entries.push(json!({
            "fullUrl": format!("{}/r4/{t}/{id}", ctx.base),
            "resource": resource,
            "search": {"mode": "match"},
        }));
    }
    let mut bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    });
    if !entries.is_empty()
        && let Some(o) = bundle.as_object_mut()
    {
        o.insert("entry".into(), Value::Array(entries));
    }
    Ok(FhirOk {
        status: 200,
        location: None,
        version: None,
        body: serialize(&bundle),
    })
}

/// Replaces every `reference` equal to a key of `map` (a bundle-local fullUrl).
fn resolve_references(v: &mut Value, map: &HashMap<String, String>) {
    match v {
        Value::Object(o) => {
            for (k, child) in o.iter_mut() {
                if k == "reference"
                    && let Value::String(s) = child
                    && let Some(target) = map.get(s.as_str())
                {
                    *s = target.clone();
                    continue;
                }
                resolve_references(child, map);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| resolve_references(c, map)),
        _ => {}
    }
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Pass {
    CreatePatients,
    CreateOthers,
    Update,
}

enum EntryOp {
    Create { tdef: &'static TypeDef, id: i64 },
    Update { tdef: &'static TypeDef, id: String },
}

/// `POST /r4` with a transaction Bundle: all entries or none, in one store transaction.
pub fn transaction(store: &mut Store, ctx: &Ctx<'_>, raw: &[u8]) -> Result<FhirOk, FhirError> {
    let mut bundle = parse_json(raw)?;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(FhirError::at(
            400,
            "invalid",
            "POST to the base URL takes a transaction Bundle",
            "Bundle.resourceType".into(),
        ));
    }
    if bundle.get("type").and_then(Value::as_str) != Some("transaction") {
        return Err(FhirError::at(
            400,
            "not-supported",
            "only Bundle.type `transaction` is processed",
            "Bundle.type".into(),
        ));
    }
    let mut entries: Vec<Value> = match bundle.get_mut("entry").map(Value::take) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(FhirError::at(
                400,
                "structure",
                "Bundle.entry must be an array",
                "Bundle.entry".into(),
            ));
        }
    };
    if entries.len() > ctx.max_bundle_entries {
        return Err(FhirError::at(
            400,
            "too-costly",
            format!(
                "a transaction holds at most {} entries; this one has {}",
                ctx.max_bundle_entries,
                entries.len()
            ),
            "Bundle.entry".into(),
        ));
    }
    let results = store.transaction(|s| -> Result<Vec<Value>, FhirError> {
        // First pass: check each entry's request and reserve ids for creates, so that bundle-local
        // references can be resolved before anything is validated.
        let mut ops = Vec::with_capacity(entries.len());
        let mut local: HashMap<String, String> = HashMap::new();
        for (i, e) in entries.iter().enumerate() {
            let at = |p: &str| format!("Bundle.entry[{i}].{p}");
            let method = e.pointer("/request/method").and_then(Value::as_str);
            let url = e.pointer("/request/url").and_then(Value::as_str);
            let (Some(method), Some(url)) = (method, url) else {
                return Err(FhirError::at(
                    400,
                    "required",
                    "each entry needs request.method and request.url",
                    at("request"),
                ));
            };
            if e.pointer("/request/ifNoneExist").is_some() || url.contains('?') {
                return Err(FhirError::at(
                    400,
                    "not-supported",
                    "conditional interactions are not supported",
                    at("request"),
                ));
            }
            let url = url
                .strip_prefix(ctx.base)
                .and_then(|u| u.strip_prefix("/r4/"))
                .unwrap_or(url);
            let op = match (method, url.split_once('/')) {
                ("POST", None) => {
                    let tdef = known_type(url).map_err(|mut err| {
                        err.status = 400;
                        err.issues[0].expression = Some(at("request.url"));
                        err
                    })?;
                    let id = s.allocate_id();
                    if let Some(full) = e.get("fullUrl").and_then(Value::as_str) {
                        local.insert(full.to_string(), format!("{}/{id}", tdef.name));
                    }
                    EntryOp::Create { tdef, id }
                }
                ("PUT", Some((t, id))) => {
                    let tdef = known_type(t).map_err(|mut err| {
                        err.status = 400;
                        err.issues[0].expression = Some(at("request.url"));
                        err
                    })?;
                    EntryOp::Update {
                        tdef,
                        id: id.to_string(),
                    }
                }
                _ => {
                    return Err(FhirError::at(
                        400,
                        "not-supported",
                        "only POST {type} and PUT {type}/{id} entries are supported",
                        at("request"),
                    ));
                }
            };
            ops.push(op);
        }
        let mut resources: Vec<Option<Value>> = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter_mut().enumerate() {
            match e.get_mut("resource").map(Value::take) {
                Some(mut r) if r.is_object() => {
                    resolve_references(&mut r, &local);
                    resources.push(Some(r));
                }
                _ => {
                    return Err(FhirError::at(
                        400,
                        "required",
                        "each entry needs a resource object",
                        format!("Bundle.entry[{i}].resource"),
                    ));
                }
            }
        }
        // FHIR processing order: creates before updates. Patients are created first because
        // the other types' `subject` must name a Patient that exists. Answers stay in entry order.
        let mut out: Vec<Value> = vec![Value::Null; entries.len()];
        for pass in [Pass::CreatePatients, Pass::CreateOthers, Pass::Update] {
            for (i, op) in ops.iter().enumerate() {
                let prefix = format!("Bundle.entry[{i}].resource");
                match op {
                    EntryOp::Create { tdef, id }
                        if pass == Pass::CreatePatients && tdef.name == "Patient"
                            || pass == Pass::CreateOthers && tdef.name != "Patient" =>
                    {
                        let Some(mut resource) = resources[i].take() else {
                            continue;
                        };
                        let checked = check(ctx, tdef, &mut resource, Some(&prefix))?;
                        create_in(s, ctx, tdef, checked, resource, Some(*id))?;
                        out[i] = json!({
                            "response": {
                                "status": "201 Created",
                                "location": format!("{}/{id}/_history/1", tdef.name),
                                "etag": "W/\"1\"",
                                "lastModified": ctx.now,
                            }
                        });
                    }
                    EntryOp::Update { tdef, id } if pass == Pass::Update => {
                        let Some(mut resource) = resources[i].take() else {
                            continue;
                        };
                        let checked = check(ctx, tdef, &mut resource, Some(&prefix))?;
                        let (rid, version, _) =
                            update_in(s, ctx, tdef, id, checked, resource, Some(&prefix))?;
                        out[i] = json!({
                            "response": {
                                "status": "200 OK",
                                "location": format!("{}/{rid}/_history/{version}", tdef.name),
                                "etag": format!("W/\"{version}\""),
                                "lastModified": ctx.now,
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    })?;
    let response = json!({
        "resourceType": "Bundle",
        "type": "transaction-response",
        "entry": results,
    });
    Ok(FhirOk {
        status: 200,
        location: None,
        version: None,
        body: serialize(&response),
    })
}

/// `GET /r4/metadata`: exactly what this server supports.
pub fn capability_statement(base: &str, now: &str) -> String {
    let resources: Vec<Value> = TYPES
        .iter()
        .map(|t| {
            let params: Vec<Value> = t
                .search
                .iter()
                .map(|p| {
                    let ty = match *p {
                        "subject" | "patient" => "reference",
                        _ => "token",
                    };
                    json!({"name": p, "type": ty})
                })
                .collect();
            json!({
                "type": t.name,
                "interaction": [
                    {"code": "create"}, {"code": "update"}, {"code": "read"}, {"code": "search-type"}
                ],
                "versioning": "versioned-update",
                "readHistory": false,
                "updateCreate": false,
                "conditionalCreate": false,
                "conditionalUpdate": false,
                "conditionalDelete": "not-supported",
                "searchParam": params,
            })
        })
        .collect();
    serialize(&json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now,
        "publisher": "fhirlift sandbox",
        "kind": "instance",
        "software": {"name": "fhirlift sandbox", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {
            "description": "Local stand-in for the CIBMTR Direct FHIR API",
            "url": format!("{}/r4", base),
        },
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "security": {
                "service": [{"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                    "code": "OAuth",
                }]}],
                "description": format!("OAuth2 bearer tokens from {}/oauth2/token (password or client_credentials grant)", base),
            },
            "resource": resources,
            "interaction": [{"code": "transaction"}],
            "searchParam": [
                {"name": "_count", "type": "number"},
                {"name": "_offset", "type": "number"},
                {"name": "_summary", "type": "token"},
            ],
        }],
    }))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn issue_paths_are_rebased_into_bundle_entries() {
        assert_eq!(locate(None, "Observation.status"), "Observation.status");
        assert_eq!(
            locate(
                Some("Bundle.entry[2].resource"),
                "Observation.code.coding[0]"
            ),
            "Bundle.entry[2].resource.code.coding[0]"
        );
        assert_eq!(
            locate(Some("Bundle.entry[0].resource"), "Patient"),
            "Bundle.entry[0].resource"
        );
    }

    #[test]
    fn token_values_follow_fhir_semantics() {
        let m = token_matches("identifier", "s|v,|w,x,s|").unwrap();
        let pairs: Vec<(Option<&str>, Option<&str>)> = m
            .iter()
            .map(|t| (t.system.as_deref(), t.value.as_deref()))
            .collect();
        assert_eq!(
            pairs,
            vec![
                (Some("s"), Some("v")),
                (Some(""), Some("w")),
                (None, Some("x")),
                (Some("s"), None)
            ]
        );
        assert!(token_matches("identifier", "a,,b").is_err());
    }

    #[test]
    fn bundle_references_are_resolved_everywhere() {
        let mut v = json!({
            "subject": {"reference": "urn:uuid:1"},
            "hasMember": [{"reference": "urn:uuid:1"}, {"reference": "Patient/9"}],
            "note": [{"text": "urn:uuid:1"}],
        });
        let map = HashMap::from([("urn:uuid:1".to_string(), "Patient/5".to_string())]);
        resolve_references(&mut v, &map);
        assert_eq!(v["subject"]["reference"], "Patient/5");
        assert_eq!(v["hasMember"][0]["reference"], "Patient/5");
        assert_eq!(v["hasMember"][1]["reference"], "Patient/9");
        assert_eq!(
            v["note"][0]["text"], "urn:uuid:1",
            "only references are rewritten"
        );
    }

    #[test]
    fn redaction_keeps_what_is_not_personal() {
        let mut p = json!({
            "resourceType": "Patient",
            "meta": {"security": [{"system": CENTER_SYSTEM, "code": "rc_12001"}]},
            "name": [{"family": "X"}],
            "identifier": [
                {"system": SSN_SYSTEM, "value": "123-45-6789"},
                {"system": CRID_SYSTEM, "value": "<7>"}
            ],
            "gender": "male"
        });
        let obj = p.as_object_mut().unwrap();
        redact_patient(obj, "12001");
        redact_patient(obj, "12001");
        assert!(p.get("name").is_none());
        assert_eq!(p["identifier"].as_array().unwrap().len(), 1);
        assert_eq!(p["gender"], "male");
        assert_eq!(
            p["text"]["div"],
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">RC 12001 Patient with CRID &lt;7&gt;</div>"
        );
        // Redacting twice adds the label once.
        assert_eq!(p["meta"]["security"].as_array().unwrap().len(), 2);
    }
}
