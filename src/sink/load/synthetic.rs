//! Synthetic patients and lab Observations, shaped exactly like the mapping stage's output, for
//! the loader's end-to-end tests and its benchmark (which must not depend on sample files).
//!
//! Everything is deterministic in the index: the same call yields the same resources, so a second
//! load of the same set must change nothing on the server. Not for production use.

use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::config::FhirUris;
use crate::resource::{
    Body, BusinessIdentifier, MappedPatient, MappedResource, patient_placeholder,
};
use crate::source::RowLocation;

/// The identifier system of synthetic patients' record keys.
pub const PATIENT_SYSTEM: &str = "urn:fhirlift:synthetic:patient";
/// The identifier system of synthetic Observations.
pub const OBSERVATION_SYSTEM: &str = "urn:fhirlift:synthetic:observation";

const LABS: &[(&str, &str, &str, f64)] = &[
    ("718-7", "Hemoglobin [Mass/volume] in Blood", "g/dL", 13.5),
    ("777-3", "Platelets [#/volume] in Blood", "10*3/uL", 250.0),
    ("6690-2", "Leukocytes [#/volume] in Blood", "10*3/uL", 6.2),
    (
        "2160-0",
        "Creatinine [Mass/volume] in Serum or Plasma",
        "mg/dL",
        0.9,
    ),
];

/// `patients` patients with `per_patient` Observations each, for center `ccn`.
pub fn generate(
    patients: usize,
    per_patient: usize,
    ccn: &str,
    uris: &FhirUris,
) -> (Vec<MappedPatient>, Vec<MappedResource>) {
    let pfile: Arc<str> = "synthetic-patients.csv".into();
    let ofile: Arc<str> = "synthetic-labs.csv".into();
    let security = json!([{"system": uris.security_system, "code": format!("rc_{ccn}")}]);
    let mut ps = Vec::with_capacity(patients);
    let mut os = Vec::with_capacity(patients * per_patient);
    for i in 0..patients {
        let key = format!("P{i:06}");
        let birth = format!("19{:02}-{:02}-{:02}", 40 + i % 60, 1 + i % 12, 1 + i % 28);
        let gender = if i % 2 == 0 { "male" } else { "female" };
        let body = json!({
            "resourceType": "Patient",
            "meta": {"security": security},
            "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Registry patient</div>"},
            "identifier": [
                {"use": "official", "system": uris.crid_system, "value": crate::resource::CRID_PENDING},
                {"use": "usual", "system": PATIENT_SYSTEM, "value": key},
            ],
            "gender": gender,
            "birthDate": birth,
        });
        let mut demo = Map::new();
        demo.insert("firstName".into(), json!(format!("Given{i}")));
        demo.insert("lastName".into(), json!(format!("Family{i}")));
        demo.insert("birthDate".into(), json!(birth));
        demo.insert("gender".into(), json!(if i % 2 == 0 { "M" } else { "F" }));
        ps.push(MappedPatient {
            resource: MappedResource {
                location: RowLocation {
                    file: pfile.clone(),
                    sheet: None,
                    row: i as u64 + 2,
                },
                mapping: "patients".into(),
                resource_type: "Patient".into(),
                patient_key: key.clone(),
                identifier: BusinessIdentifier {
                    system: PATIENT_SYSTEM.into(),
                    value: key.clone(),
                },
                body: Body::from_value(&body),
            },
            crid_demographics: Some(demo),
            known_crid: None,
        });
        for j in 0..per_patient {
            let (code, display, unit, base) = LABS[j % LABS.len()];
            let id = format!("{key}-{j:04}");
            let day = 1 + j % 28;
            let month = 1 + (j / 28) % 12;
            let body = json!({
                "resourceType": "Observation",
                "meta": {"security": security},
                "identifier": [{"system": OBSERVATION_SYSTEM, "value": id}],
                "status": "final",
                "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
                "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}]},
                "subject": {"reference": patient_placeholder(&key)},
                "effectiveDateTime": format!("2024-{month:02}-{day:02}T08:30:00-06:00"),
                "valueQuantity": {"value": number(base + (j % 7) as f64 * 0.1), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
            });
            os.push(MappedResource {
                location: RowLocation {
                    file: ofile.clone(),
                    sheet: None,
                    row: (i * per_patient + j) as u64 + 2,
                },
                mapping: "labs".into(),
                resource_type: "Observation".into(),
                patient_key: key.clone(),
                identifier: BusinessIdentifier {
                    system: OBSERVATION_SYSTEM.into(),
                    value: id,
                },
                body: Body::from_value(&body),
            });
        }
    }
    (ps, os)
}

/// A JSON number with one decimal, written as the mapping stage writes decimals.
fn number(v: f64) -> Value {
    serde_json::from_str::<serde_json::Number>(&format!("{v:.1}"))
        .map(Value::Number)
        .unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::{CibmtrRules, errors, validate};

    #[test]
    fn synthetic_resources_are_valid_and_deterministic() {
        let uris = FhirUris::default();
        let (p, o) = generate(3, 5, "12001", &uris);
        assert_eq!((p.len(), o.len()), (3, 15));
        assert_eq!(generate(3, 5, "12001", &uris), (p.clone(), o.clone()));
        let rules = CibmtrRules::new("12001", &uris.security_system, &uris.crid_system);
        for r in p.iter().map(|p| &p.resource).chain(o.iter()) {
            let issues = validate(&r.body.value(), &rules);
            let errs: Vec<_> = errors(&issues).collect();
            assert!(errs.is_empty(), "{}: {errs:?}", r.location);
        }
    }
}
