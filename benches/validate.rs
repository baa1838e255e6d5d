//! Validation throughput: how long `validate::validate` (R4 structure and CIBMTR rules) takes per
//! resource, for the resources the CIBMTR pack produces. Single-threaded; the mapping stage runs
//! one validation per resource on each rayon worker.
//!
//! Run: `cargo bench --bench validate` (a release build). Prints ns per resource and resources
//! per second, by wall time and by CPU time, the best of three rounds.

use std::hint::black_box;
use std::time::Instant;

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

/// This process's CPU time (user + system) from `/proc/self/stat`, in seconds. The bench reports
/// CPU time beside wall time because on a shared machine the wall time of a single thread also
/// counts the time other processes held the core. Linux only; `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after the name; they count
    // clock ticks, 100 per second on Linux (USER_HZ).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Best wall and CPU time per resource over several rounds of `iters` calls.
fn measure(name: &str, resource: &Value, rules: &CibmtrRules, iters: u32, per_call: u32) {
    let expected = validate(resource, rules).len();
    let mut best_wall = f64::MAX;
    let mut best_cpu = f64::MAX;
    for _ in 0..ROUNDS {
        let cpu0 = cpu_seconds();
        let start = Instant::now();
        for _ in 0..iters {
            let issues = validate(black_box(resource), black_box(rules));
            assert_eq!(issues.len(), expected);
            black_box(issues);
        }
        best_wall = best_wall.min(start.elapsed().as_secs_f64());
        if let (Some(a), Some(b)) = (cpu0, cpu_seconds()) {
            best_cpu = best_cpu.min(b - a);
        }
    }
    let n = f64::from(iters) * f64::from(per_call);
    let cpu = if best_cpu < f64::MAX {
        format!(
            "{:>8.0} ns CPU {:>10.0}/s CPU",
            best_cpu / n * 1e9,
            n / best_cpu
        )
    } else {
        String::from("(no CPU clock)")
    };
    println!(
        "{name:<44} {:>8.0} ns wall {:>10.0}/s wall  {cpu}  ({expected} issues)",
        best_wall / n * 1e9,
        n / best_wall,
    );
}

const ROUNDS: u32 = 3;

fn main() {
    let rules = CibmtrRules::new("12001", SEC, CRID);
    let obs = observation(1);
    assert!(validate(&obs, &rules).is_empty());
    let mut bad = observation(1);
    bad["status"] = json!("done");
    bad["effectiveDateTime"] = json!("2024-03-01");
    bad["valueQuantity"]["system"] = json!("http://example.org");
    bad["code"]["coding"][0]["code"] = json!("2345-7");
    println!("validate (R4 structure + CIBMTR rules), single thread, best of 3 rounds");
    measure("lab Observation (valid)", &obs, &rules, 100_000, 1);
    measure("lab Observation (4 problems)", &bad, &rules, 100_000, 1);
    measure("Patient (valid)", &patient(), &rules, 100_000, 1);
    let bundle = bundle();
    assert!(validate(&bundle, &rules).is_empty());
    measure(
        "transaction Bundle (50 entries), per entry",
        &bundle,
        &rules,
        2_000,
        50,
    );
}
