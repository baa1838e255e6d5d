//! Content hashes the ledger compares to decide whether a record changed since it was last sent.
//!
//! A hash is the lowercase hex SHA-256 of a canonical JSON text: object keys sorted by their UTF-8
//! bytes, no whitespace, numbers written exactly as parsed (serde_json's `arbitrary_precision`
//! keeps `12.50` as `12.50`), strings escaped as serde_json escapes them. The same resource always
//! hashes the same, whatever order its template wrote the keys in.
//!
//! This module must not keep or log what it hashes: the inputs may hold personal data.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::resource::json::{Node, Object};

/// The hash of a resource body as the loader submits it, with the server-dependent parts left out
/// so that the hash depends only on what the source and the mapping produced:
///
/// - the top-level `id` (assigned by the server on create, added by the loader on update);
/// - `meta.versionId`, `meta.lastUpdated` and `meta.source` (written by the server).
///
/// References are hashed as they are: hash the body *after* the CRID step filled in the Patient's
/// CRID identifier and *before* patient placeholders (`urn:uuid:…`, see
/// [`crate::resource::patient_placeholder`]) are swapped for `Patient/<server id>`. The
/// placeholder is derived from the patient key, so a resource that moves to another patient gets
/// a new hash, while a patient's server id never enters it.
pub fn content_hash(body: &Value) -> String {
    content_hash_node(&Node::from_value(body))
}

/// [`content_hash`] of a parsed tree (what the mapping stage holds).
pub fn content_hash_node(body: &Node<'_>) -> String {
    let mut h = HashWriter(Sha256::new());
    match body {
        Node::Object(map) => {
            let mut keys: Vec<(&str, &Node<'_>)> = map.iter().filter(|(k, _)| *k != "id").collect();
            keys.sort_by(|a, b| a.0.cmp(b.0));
            h.put(b"{");
            for (i, (k, v)) in keys.into_iter().enumerate() {
                if i > 0 {
                    h.put(b",");
                }
                write_string(&mut h, k);
                h.put(b":");
                match (k, v) {
                    ("meta", Node::Object(meta)) => {
                        write_object(&mut h, meta, &["versionId", "lastUpdated", "source"])
                    }
                    (_, v) => write_canonical(&mut h, v),
                }
            }
            h.put(b"}");
        }
        other => write_canonical(&mut h, other),
    }
    h.finish()
}

/// The hash of a `PUT /CRID` request body (`{"ccn": …, "patient": {…}}`), as the loader sends it.
/// The ledger keeps this hash, never the demographics: an equal hash means the same request, and
/// the CRID service answers the same request with the same CRID, so no new request is needed.
pub fn demographics_hash(crid_request_body: &Value) -> String {
    canonical_hash(crid_request_body)
}

/// The hash of any JSON value in canonical form (no field left out).
pub fn canonical_hash(value: &Value) -> String {
    let mut h = HashWriter(Sha256::new());
    write_canonical(&mut h, &Node::from_value(value));
    h.finish()
}

/// The canonical text of a JSON value (what the hashes are computed over). For tests and for
/// explaining a hash difference; never log it for patient data.
pub fn canonical_json(value: &Value) -> String {
    let mut out = Vec::new();
    write_canonical(&mut out, &Node::from_value(value));
    String::from_utf8_lossy(&out).into_owned()
}

/// The hash of a configuration: the pipeline file's bytes followed by each mapping file's bytes,
/// in order. Files that cannot be read contribute their path and the word `unreadable`, so the
/// hash still changes when they appear.
pub fn files_hash(paths: &[&std::path::Path]) -> String {
    let mut h = Sha256::new();
    for p in paths {
        match std::fs::read(p) {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(_) => {
                h.update(p.to_string_lossy().as_bytes());
                h.update(b"unreadable");
            }
        }
    }
    hex::encode(h.finalize())
}

trait Sinkish {
    fn put(&mut self, bytes: &[u8]);
}

impl Sinkish for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

struct HashWriter(Sha256);

impl HashWriter {
    fn finish(self) -> String {
        hex::encode(self.0.finalize())
    }
}

impl Sinkish for HashWriter {
    fn put(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

fn write_canonical(out: &mut impl Sinkish, v: &Node<'_>) {
    match v {
        Node::Null => out.put(b"null"),
        Node::Bool(true) => out.put(b"true"),
        Node::Bool(false) => out.put(b"false"),
        Node::Number(n) => out.put(n.as_bytes()),
        Node::String(s) => write_string(out, s),
        Node::Array(items) => {
            out.put(b"[");
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                write_canonical(out, item);
            }
            out.put(b"]");
        }
        Node::Object(map) => write_object(out, map, &[]),
    }
}

fn write_object(out: &mut impl Sinkish, map: &Object<'_>, skip: &[&str]) {
    let mut members: Vec<(&str, &Node<'_>)> =
        map.iter().filter(|(k, _)| !skip.contains(k)).collect();
    members.sort_by(|a, b| a.0.cmp(b.0));
    out.put(b"{");
    for (i, (k, v)) in members.into_iter().enumerate() {
        if i > 0 {
            out.put(b",");
        }
        write_string(out, k);
        out.put(b":");
        write_canonical(out, v);
    }
    out.put(b"}");
}

/// A string literal escaped as serde_json escapes it.
fn write_string(out: &mut impl Sinkish, s: &str) {
    let mut text = String::with_capacity(s.len() + 2);
    let _ = crate::resource::json::write_escaped(&mut text, s);
    out.put(text.as_bytes());
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly on purpose")]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b":1,"a":{"y":[1,2],"x":"s"}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":"s","y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_eq!(canonical_json(&a), r#"{"a":{"x":"s","y":[1,2]},"b":1}"#);
    }

    #[test]
    fn array_order_and_number_scale_matter() {
        let a: Value = serde_json::from_str(r#"{"v":[1,2]}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"v":[2,1]}"#).unwrap();
        assert_ne!(content_hash(&a), content_hash(&b));
        let c: Value = serde_json::from_str(r#"{"v":12.5}"#).unwrap();
        let d: Value = serde_json::from_str(r#"{"v":12.50}"#).unwrap();
        assert_ne!(content_hash(&c), content_hash(&d));
    }

    #[test]
    fn server_dependent_parts_are_ignored() {
        let sent = json!({
            "resourceType": "Observation",
            "meta": {"security": [{"code": "rc_12001"}]},
            "status": "final"
        });
        let stored = json!({
            "resourceType": "Observation",
            "id": "42",
            "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z",
                     "security": [{"code": "rc_12001"}]},
            "status": "final"
        });
        assert_eq!(content_hash(&sent), content_hash(&stored));
        let changed = json!({
            "resourceType": "Observation",
            "meta": {"security": [{"code": "rc_12002"}]},
            "status": "final"
        });
        assert_ne!(content_hash(&sent), content_hash(&changed));
        // Nested ids (e.g. in contained resources) are content.
        let nested = json!({"resourceType": "Observation", "code": {"id": "x"}});
        let nested2 = json!({"resourceType": "Observation", "code": {"id": "y"}});
        assert_ne!(content_hash(&nested), content_hash(&nested2));
    }

    #[test]
    fn demographics_hash_sees_every_field() {
        let a = json!({"ccn": "12001", "patient": {"firstName": "A", "birthDate": "2000-01-01"}});
        let b = json!({"patient": {"birthDate": "2000-01-01", "firstName": "A"}, "ccn": "12001"});
        let c = json!({"ccn": "12001", "patient": {"firstName": "B", "birthDate": "2000-01-01"}});
        assert_eq!(demographics_hash(&a), demographics_hash(&b));
        assert_ne!(demographics_hash(&a), demographics_hash(&c));
        assert_eq!(demographics_hash(&a).len(), 64);
    }

    #[test]
    fn the_hashed_text_is_stable_across_releases() {
        // Ledgers keep these hashes between runs: the canonical text must never change.
        let body: Value = serde_json::from_str(
            r#"{"resourceType":"Observation","id":"9","meta":{"versionId":"2","security":[{"code":"rc_12001"}]},
                "valueQuantity":{"value":12.50,"unit":"g/dL"},"note":[{"text":"a\"b\\c\u0001/é"}],"n":1E3}"#,
        )
        .unwrap();
        let text = r#"{"meta":{"security":[{"code":"rc_12001"}]},"n":1e+3,"note":[{"text":"a\"b\\c\u0001/é"}],"resourceType":"Observation","valueQuantity":{"unit":"g/dL","value":12.50}}"#;
        assert_eq!(
            content_hash(&body),
            hex::encode(Sha256::digest(text.as_bytes()))
        );
    }

    #[test]
    fn escaping_is_unambiguous() {
        let a = json!({"a": "x\",\"b\":\"y"});
        let b = json!({"a": "x", "b": "y"});
        assert_ne!(canonical_hash(&a), canonical_hash(&b));
    }
}
