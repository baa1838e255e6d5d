//! Validation throughput: how long `validate::validate` (R4 structure and CIBMTR rules) takes per
//! resource, for the resources the CIBMTR pack produces. Single-threaded; the mapping stage runs
//! one validation per resource on each rayon worker.
//!
//! Run: `cargo bench --bench validate` (a release build). Prints ns per resource and resources
//! per second, the best of several rounds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use fhirlift::validate::{CibmtrRules, validate};
use serde_json::{Value, json};

const SEC: &str = "http://cibmtr.org/codesystem/transplant-center";
const CRID: &str = "http://cibmtr.org/identifier/CRID";

fn observation(i: usize) -> Value {
    json!({
        "resourceType": "Observation",
        "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
        "identifier": [{"system": "urn:fhirlift:12001:labs", "value": format!("LAB-{i:06}-2024-03-01-CMVPCR")}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory", "display": "Laboratory"}]}],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "30247-1", "display": "Cytomegalovirus DNA [#/volume] (viral load) in Serum or Plasma by NAA with probe detection"}],
            "text": "CMV PCR quantitative"
        },
        "subject": {"reference": "urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9"},
        "effectiveDateTime": "2024-03-01T08:30:00-05:00",
        "valueQuantity": {"value": 1250, "unit": "copies/mL", "system": "http://unitsofmeasure.org", "code": "{copies}/mL"},
        "referenceRange": [{"high": {"value": 137, "unit": "copies/mL", "system": "http://unitsofmeasure.org", "code": "{copies}/mL"}}]
    })
}

fn patient() -> Value {
    json!({
        "resourceType": "Patient",
        "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
        "text": {"status": "empty", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">Patient</div>"},
        "identifier": [{"use": "official", "system": CRID, "value": "pending"}],
        "gender": "female",
        "birthDate": "1970-01-01",
        "extension": [{
            "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
            "extension": [
                {"url": "ombCategory", "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"}},
                {"url": "text", "valueString": "White"}
            ]
        }]
    })
}

/// A full transaction: the Patient and 49 of its Observations, linked by the placeholder.
fn bundle() -> Value {
    let patient = json!({
        "fullUrl": "urn:uuid:6d1c2f0e-8a3b-4c55-9e47-0b1f7a2dc3e9",
        "resource": patient(),
        "request": {"method": "POST", "url": "Patient"}
    });
    let entries: Vec<Value> = std::iter::once(patient)
        .chain((1..50).map(|i| {
            json!({
                "fullUrl": format!("urn:uuid:00000000-0000-0000-0000-{i:012}"),
                "resource": observation(i),
                "request": {"method": "POST", "url": "Observation"}
            })
        }))
        .collect();
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

/// Best time per call over several rounds of `iters` calls.
fn measure(name: &str, resource: &Value, rules: &CibmtrRules, iters: u32, per_call: u32) {
    let expected = validate(resource, rules).len();
    let mut best = Duration::MAX;
    for _ in 0..7 {
        let start = Instant::now();
        for _ in 0..iters {
            let issues = validate(black_box(resource), black_box(rules));
            assert_eq!(issues.len(), expected);
            black_box(issues);
        }
        best = best.min(start.elapsed());
    }
    let per_resource = best.as_secs_f64() / f64::from(iters) / f64::from(per_call);
    println!(
        "{name:<40} {:>9.0} ns/resource {:>12.0} resources/s ({expected} issues)",
        per_resource * 1e9,
        1.0 / per_resource
    );
}

fn main() {
    let rules = CibmtrRules::new("12001", SEC, CRID);
    let obs = observation(1);
    assert!(validate(&obs, &rules).is_empty());
    let mut bad = observation(1);
    bad["status"] = json!("done");
    bad["effectiveDateTime"] = json!("2024-03-01");
    bad["valueQuantity"]["system"] = json!("http://example.org");
    bad["code"]["coding"][0]["code"] = json!("2345-7");
    println!("validate (R4 structure + CIBMTR rules), single thread, best of 7 rounds");
    measure("lab Observation (valid)", &obs, &rules, 200_000, 1);
    measure("lab Observation (4 problems)", &bad, &rules, 200_000, 1);
    measure("Patient (valid)", &patient(), &rules, 200_000, 1);
    measure(
        "transaction Bundle, 50 Observations",
        &bundle(),
        &rules,
        4_000,
        50,
    );
}
