//! Integration tests: the sandbox, over real HTTP on 127.0.0.1. Each test starts its own server
//! on an ephemeral port.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use fhirlift::sandbox::{SandboxConfig, SandboxHandle};
use reqwest::StatusCode;
use serde_json::{Value, json};

const SEC: &str = "http://cibmtr.org/codesystem/transplant-center";
const CRID: &str = "http://cibmtr.org/identifier/CRID";
const FHIR_JSON: &str = "application/fhir+json";

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().build().unwrap()
}

fn start(config: SandboxConfig) -> SandboxHandle {
    SandboxHandle::start(config, "127.0.0.1:0").unwrap()
}

/// A password-grant token for the default account, with HTTP Basic client authentication.
async fn token(c: &reqwest::Client, sb: &SandboxHandle) -> String {
    token_for(c, sb, "fhirlift-sandbox", "sandbox-secret").await
}

async fn token_for(c: &reqwest::Client, sb: &SandboxHandle, id: &str, secret: &str) -> String {
    let r = c
        .post(sb.token_url())
        .basic_auth(id, Some(secret))
        .header("Accept", "application/json")
        .form(&[
            ("grant_type", "password"),
            ("username", "sandbox-user"),
            ("password", "sandbox-password"),
            ("scope", "api_cibmtr_fhir_ehr_client"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

fn label(ccn: &str) -> Value {
    json!({"system": SEC, "code": format!("rc_{ccn}")})
}

fn patient(ccn: &str, crid: &str) -> Value {
    json!({
        "resourceType": "Patient",
        "meta": {"security": [label(ccn)]},
        "text": {"status": "empty"},
        "identifier": [{"use": "official", "system": CRID, "value": crid}],
    })
}

fn observation(ccn: &str, patient_ref: &str, ident: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "meta": {"security": [label(ccn)]},
        "identifier": [{"system": "urn:fhirlift:test", "value": ident}],
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "laboratory"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": "2024-01-02T10:00:00-05:00",
        "valueQuantity": {"value": 12.5, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    })
}

/// POSTs a resource; returns status, Location and body.
async fn post(
    c: &reqwest::Client,
    url: String,
    tok: &str,
    body: &Value,
) -> (StatusCode, Option<String>, Value) {
    let r = c
        .post(url)
        .bearer_auth(tok)
        .header("Content-Type", FHIR_JSON)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status();
    let loc = r
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_string());
    let v: Value = r.json().await.unwrap_or(Value::Null);
    (status, loc, v)
}

async fn get(c: &reqwest::Client, url: String, tok: &str) -> (StatusCode, Value) {
    let r = c.get(url).bearer_auth(tok).send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn put_crid(
    c: &reqwest::Client,
    sb: &SandboxHandle,
    tok: &str,
    body: &Value,
) -> (StatusCode, Value) {
    let r = c
        .put(format!("{}/CRID", sb.base_url()))
        .bearer_auth(tok)
        .json(body)
        .send()
        .await
        .unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// The id in a Location header `…/{type}/{id}/_history/{n}`.
fn id_from_location(loc: &str) -> String {
    let parts: Vec<&str> = loc.rsplit('/').collect();
    assert_eq!(parts[1], "_history", "{loc}");
    parts[2].to_string()
}

/// A client written from the IG's example code works unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ig_example_client_flow() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    assert!(tok.len() > 1000, "tokens are long, like Okta's");

    let (s, crid) = put_crid(
        &c,
        &sb,
        &tok,
        &json!({"ccn": "12001", "patient": {
            "firstName": "Ana", "lastName": "Souza", "birthDate": "1975-04-09", "gender": "F",
            "ssn": "123-45-6789", "race": ["2106-3"], "ethnicity": "2186-5", "nmdpRid": 0, "cibmtrTeam": 0
        }}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let crid = crid["crid"].as_u64().unwrap().to_string();

    let search = format!("{base}/r4/Patient?_security={SEC}%7Crc_12001&identifier={CRID}%7C{crid}");
    let (s, bundle) = get(&c, search.clone(), &tok).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(bundle["total"], 0);

    let (s, loc, created) = post(
        &c,
        format!("{base}/r4/Patient"),
        &tok,
        &patient("12001", &crid),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let loc = loc.unwrap();
    assert!(loc.starts_with(&format!("{base}/r4/Patient/")));
    let pid = id_from_location(&loc);
    assert_eq!(created["id"], pid.as_str());
    assert_eq!(created["meta"]["versionId"], "1");
    assert_eq!(
        created["text"]["div"],
        format!(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\">RC 12001 Patient with CRID {crid}</div>"
        )
    );

    let (_, bundle) = get(&c, search, &tok).await;
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], pid.as_str());

    let (s, oloc, _) = post(
        &c,
        format!("{base}/r4/Observation"),
        &tok,
        &observation("12001", &format!("Patient/{pid}"), "obs-1"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let oid = id_from_location(&oloc.unwrap());

    let (s, bundle) = get(
        &c,
        format!("{base}/r4/Observation?patient.identifier={CRID}%7C{crid}"),
        &tok,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(bundle["total"], 1);
    assert_eq!(bundle["entry"][0]["resource"]["id"], oid.as_str());

    let (s, cap) = get(&c, format!("{base}/r4/metadata"), &tok).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(cap["resourceType"], "CapabilityStatement");
    assert_eq!(cap["fhirVersion"], "4.0.1");

    let tx = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:2b0e1f7e-0000-4000-8000-000000000001",
             "resource": patient("12001", "777"),
             "request": {"method": "POST", "url": "Patient"}},
            {"resource": observation("12001", "urn:uuid:2b0e1f7e-0000-4000-8000-000000000001", "obs-2"),
             "request": {"method": "POST", "url": "Observation"}}
        ]
    });
    let (s, _, resp) = post(&c, format!("{base}/r4"), &tok, &tx).await;
    assert_eq!(s, StatusCode::OK, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    assert_eq!(resp["entry"][0]["response"]["status"], "201 Created");
    let new_pid = id_from_location(resp["entry"][0]["response"]["location"].as_str().unwrap());
    let obs_loc = resp["entry"][1]["response"]["location"].as_str().unwrap();
    let (_, obs) = get(
        &c,
        format!("{base}/r4/{}", obs_loc.split("/_history").next().unwrap()),
        &tok,
    )
    .await;
    assert_eq!(obs["subject"]["reference"], format!("Patient/{new_pid}"));

    let stats = sb.stats();
    assert_eq!(stats.requests("token", "200"), 1);
    assert_eq!(stats.requests("crid", "200"), 1);
    assert_eq!(stats.requests("create:Patient", "201"), 1);
    assert_eq!(stats.requests("create:Observation", "201"), 1);
    assert_eq!(stats.requests("search:Patient", "200"), 2);
    assert_eq!(stats.requests("transaction", "200"), 1);
    assert_eq!(stats.resources("Patient"), 2);
    assert_eq!(stats.resources("Observation"), 2);
    assert_eq!(stats.crids_assigned, 1);

    // The HTTP view of the same counters.
    let (s, http_stats) = get(&c, format!("{base}/_sandbox/stats"), "").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(http_stats["requests"]["create:Patient"]["201"], 1);
    assert_eq!(http_stats["resources"]["Observation"], 2);
    assert_eq!(http_stats["crids_assigned"], 1);
    sb.shutdown();
}

#[test]
fn handle_reports_its_urls() {
    let sb = start(SandboxConfig::default());
    let port = sb.addr().port();
    assert!(sb.addr().ip().is_loopback());
    assert_eq!(sb.base_url(), format!("http://127.0.0.1:{port}"));
    assert_eq!(
        sb.token_url(),
        format!("http://127.0.0.1:{port}/oauth2/token")
    );
    sb.shutdown();
}
