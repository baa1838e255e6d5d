//! What the mapping stage hands to a sink: validated resources with everything a sink needs to
//! submit them once and only once.
//!
//! Conventions shared by the mapping stage and the sinks:
//! - A reference to a Patient whose server id is not known yet is the placeholder
//!   [`patient_placeholder`]`(patient_key)`: `urn:uuid:` + a UUID v5 of the patient key. It is
//!   deterministic, valid inside a transaction Bundle, and the loader swaps it for
//!   `Patient/<server id>` before sending.
//! - A Patient's CRID identifier (system = the configured CRID system) carries
//!   [`CRID_PENDING`] until the CRID step fills in the real value; the loader sets it by system.

pub mod json;

use std::sync::Arc;

use serde::Serialize;
use uuid::Uuid;

use crate::source::RowLocation;

/// The value a Patient's CRID identifier carries before the CRID is known (dry runs show it).
pub const CRID_PENDING: &str = "pending";

/// Namespace for deterministic placeholder and identifier UUIDs (UUID v5).
pub const FHIRLIFT_NAMESPACE: Uuid = Uuid::from_u128(0x6d1c_2f0e_8a3b_4c55_9e47_0b1f_7a2d_c3e9);

/// The deterministic placeholder reference for a patient key: `urn:uuid:` and [`patient_uuid`].
pub fn patient_placeholder(patient_key: &str) -> String {
    format!("urn:uuid:{}", patient_uuid(patient_key))
}

/// The UUID of a patient key's placeholder (v5, in fhirlift's namespace).
pub fn patient_uuid(patient_key: &str) -> Uuid {
    Uuid::new_v5(
        &FHIRLIFT_NAMESPACE,
        format!("patient:{patient_key}").as_bytes(),
    )
}

/// A business identifier: the loader searches `identifier=<system>|<value>` before any create.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct BusinessIdentifier {
    pub system: String,
    pub value: String,
}

/// One resource, rendered and validated.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MappedResource {
    /// The row it came from.
    #[serde(serialize_with = "serialize_display")]
    pub location: RowLocation,
    /// The mapping's name.
    pub mapping: String,
    pub resource_type: String,
    /// The patient key value this resource belongs to (for a Patient, its own key).
    pub patient_key: String,
    /// The stable business identifier (for a Patient: the record key under the mapping's system).
    pub identifier: BusinessIdentifier,
    pub body: Body,
}

/// A validated resource body, as the compact JSON a sink writes or sends.
#[derive(Clone, PartialEq, Eq)]
pub struct Body(Arc<str>);

impl Body {
    /// The body of a tree (nulls already stripped, validated).
    pub fn from_node(node: &json::Node<'_>) -> Body {
        let mut text = String::with_capacity(1024);
        json::write_compact(&mut text, node);
        Body(text.into())
    }

    /// The body of a `serde_json` value.
    pub fn from_value(value: &serde_json::Value) -> Body {
        Body::from_node(&json::Node::from_value(value))
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The body as a tree borrowing from the text.
    pub fn node(&self) -> json::Node<'_> {
        // The text was written from a tree, so it always parses.
        json::parse(&self.0).unwrap_or(json::Node::Null)
    }

    /// Changes the body through its `serde_json` value (tests and tools that make a resource
    /// differ from what the mapping stage wrote).
    pub fn edit(&mut self, f: impl FnOnce(&mut serde_json::Value)) {
        let mut v = self.value();
        f(&mut v);
        *self = Body::from_value(&v);
    }

    /// The body as a `serde_json` value, for a sink that edits it before sending.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(&self.0).unwrap_or(serde_json::Value::Null)
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Body {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value().serialize(s)
    }
}

/// A patient: its Patient resource plus what the CRID step needs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MappedPatient {
    pub resource: MappedResource,
    /// The `patient` object of a `PUT /CRID` body (firstName, lastName, birthDate, gender, …;
    /// absent fields left out). Personal data: never logged.
    pub crid_demographics: Option<serde_json::Map<String, serde_json::Value>>,
    /// A CRID taken from a column (generic servers, or centers that already know it).
    pub known_crid: Option<String>,
}

fn serialize_display<S: serde::Serializer>(v: &RowLocation, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_deterministic_and_distinct() {
        assert_eq!(patient_placeholder("000123"), patient_placeholder("000123"));
        assert_ne!(patient_placeholder("000123"), patient_placeholder("123"));
        assert!(patient_placeholder("1").starts_with("urn:uuid:"));
    }
}
