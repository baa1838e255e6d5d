//! Integration tests: the sandbox, over real HTTP on 127.0.0.1. Each test starts its own server
//! on an ephemeral port.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use fhirlift::sandbox::{Account, SandboxConfig, SandboxHandle};
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

fn two_center_config() -> SandboxConfig {
    SandboxConfig {
        accounts: vec![
            Account {
                ccns: vec!["12001".into(), "12002".into()],
                ..Account::default()
            },
            Account {
                client_id: "other-center".into(),
                client_secret: "other-secret".into(),
                ccns: vec!["12002".into()],
                ..Account::default()
            },
        ],
        ..SandboxConfig::default()
    }
}

fn expressions(outcome: &Value) -> Vec<String> {
    outcome["issue"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|i| i["expression"].as_array().cloned().unwrap_or_default())
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

async fn token_form(
    c: &reqwest::Client,
    sb: &SandboxHandle,
    basic: Option<(&str, &str)>,
    form: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut req = c.post(sb.token_url()).form(form);
    if let Some((id, secret)) = basic {
        req = req.basic_auth(id, Some(secret));
    }
    let r = req.send().await.unwrap();
    let s = r.status();
    (s, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_grants_and_errors() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let good = Some(("fhirlift-sandbox", "sandbox-secret"));
    let pw = [
        ("grant_type", "password"),
        ("username", "sandbox-user"),
        ("password", "sandbox-password"),
    ];
    let (s, v) = token_form(&c, &sb, good, &pw).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 1800);
    assert_eq!(v["scope"], "api_cibmtr_fhir_ehr_client");

    // client_credentials, with the client authenticating in the form body.
    let (s, v) = token_form(
        &c,
        &sb,
        None,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", "fhirlift-sandbox"),
            ("client_secret", "sandbox-secret"),
        ],
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["access_token"].as_str().unwrap().len() > 1000);

    let (s, v) = token_form(&c, &sb, Some(("fhirlift-sandbox", "wrong")), &pw).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
    let (s, v) = token_form(&c, &sb, None, &pw).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("invalid_client"))
    );
    let (s, v) = token_form(
        &c,
        &sb,
        good,
        &[
            ("grant_type", "password"),
            ("username", "sandbox-user"),
            ("password", "nope"),
        ],
    )
    .await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_grant"))
    );
    let (s, v) = token_form(&c, &sb, good, &[("grant_type", "authorization_code")]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("unsupported_grant_type"))
    );
    let (s, v) = token_form(&c, &sb, good, &[("username", "sandbox-user")]).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request"))
    );
    let mut with_scope = pw.to_vec();
    with_scope.push(("scope", "admin"));
    let (s, v) = token_form(&c, &sb, good, &with_scope).await;
    assert_eq!(
        (s, v["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_scope"))
    );
    assert_eq!(sb.stats().requests("token", "200"), 2);
    assert_eq!(sb.stats().requests("token", "401"), 2);
    assert_eq!(sb.stats().requests("token", "400"), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_missing_and_expired_tokens_get_401() {
    let sb = start(SandboxConfig {
        token_ttl_secs: 0,
        ..SandboxConfig::default()
    });
    let c = client();
    let base = sb.base_url();
    // A zero lifetime issues tokens that are expired on arrival.
    let expired = token(&c, &sb).await;
    for tok in [expired.as_str(), "not-a-token"] {
        let (s, v) = get(&c, format!("{base}/r4/Patient"), tok).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(v["resourceType"], "OperationOutcome");
        let (s, v) = put_crid(&c, &sb, tok, &json!({})).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(v["errorMessage"].is_string());
    }
    let r = c.get(format!("{base}/r4/Patient")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    // Capabilities are public.
    let r = c.get(format!("{base}/r4/metadata")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

fn crid_body(p: Value) -> Value {
    json!({"ccn": "12001", "patient": p})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crid_validation_errors_name_the_field() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let tok = token(&c, &sb).await;
    let ok =
        json!({"firstName": "Ana", "lastName": "Souza", "birthDate": "1975-04-09", "gender": "F"});
    let with = |k: &str, v: Value| {
        let mut p = ok.clone();
        p[k] = v;
        crid_body(p)
    };
    let without = |k: &str| {
        let mut p = ok.clone();
        p.as_object_mut().unwrap().remove(k);
        crid_body(p)
    };
    let cases: Vec<(Value, &str)> = vec![
        (json!({"patient": ok.clone()}), "ccn"),
        (json!({"ccn": "1200", "patient": ok.clone()}), "ccn"),
        (json!({"ccn": 12001, "patient": ok.clone()}), "ccn"),
        (json!({"ccn": "12001"}), "patient"),
        (without("firstName"), "firstName"),
        (without("lastName"), "lastName"),
        (without("birthDate"), "birthDate"),
        (without("gender"), "gender"),
        (with("birthDate", json!("09/04/1975")), "birthDate"),
        (with("gender", json!("U")), "gender"),
        (with("ssn", json!("123456789")), "ssn"),
        (with("race", json!(["white"])), "race"),
        (with("race", json!("2106-3")), "race"),
        (with("ethnicity", json!("H")), "ethnicity"),
        (with("nmdpRid", json!("12")), "nmdpRid"),
        (with("cibmtrTeam", json!(1.5)), "cibmtrTeam"),
        (with("ssn", Value::Null), "ssn"),
        (with("dob", json!("1975-04-09")), "dob"),
    ];
    for (body, field) in cases {
        let (s, v) = put_crid(&c, &sb, &tok, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        let msg = v["errorMessage"].as_str().unwrap();
        assert!(msg.contains(field), "{msg} should name {field}");
        assert!(
            !msg.contains("Souza") && !msg.contains("1975"),
            "no values in errors: {msg}"
        );
    }
    let r = c
        .put(format!("{}/CRID", sb.base_url()))
        .bearer_auth(&tok)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // A CCN the token is not entitled to.
    let mut other = crid_body(ok.clone());
    other["ccn"] = json!("99999");
    let (s, v) = put_crid(&c, &sb, &tok, &other).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert!(v["errorMessage"].is_string());
    assert_eq!(sb.stats().crids_assigned, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crid_matching_is_stable() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let tok = token(&c, &sb).await;
    let base =
        json!({"firstName": "José", "lastName": "Núñez", "birthDate": "1961-12-01", "gender": "M"});
    let (s, v) = put_crid(&c, &sb, &tok, &crid_body(base.clone())).await;
    assert_eq!(s, StatusCode::OK);
    let crid = v["crid"].as_u64().unwrap();
    assert!(v.get("perfectMatch").is_none());

    // Same demographics, case and accents aside: a perfect match on names.
    let (_, v) = put_crid(
        &c,
        &sb,
        &tok,
        &crid_body(json!({"firstName": "JOSE", "lastName": "nunez", "birthDate": "1961-12-01", "gender": "M", "ssn": "111-22-3333"})),
    )
    .await;
    assert_eq!(v["perfectMatch"].as_array().unwrap().len(), 1);
    assert_eq!(v["perfectMatch"][0]["crid"].as_u64(), Some(crid));
    assert_eq!(v["perfectMatch"][0]["matchType"], "Perfect1");
    assert_eq!(
        v["perfectMatch"][0]["matchedCriteria"],
        json!(["FirstName", "LastName", "Gender", "DateOfBirth"])
    );
    // SSN + birth date + gender, whatever the names.
    let (_, v) = put_crid(
        &c,
        &sb,
        &tok,
        &crid_body(json!({"firstName": "Joe", "lastName": "N", "birthDate": "1961-12-01", "gender": "M", "ssn": "111-22-3333"})),
    )
    .await;
    assert_eq!(v["perfectMatch"][0]["crid"].as_u64(), Some(crid));
    assert_eq!(
        v["perfectMatch"][0]["matchedCriteria"],
        json!(["SSN", "Gender", "DateOfBirth"])
    );
    // Another gender or birth date is another person.
    let mut other = base.clone();
    other["gender"] = json!("F");
    let (_, v) = put_crid(&c, &sb, &tok, &crid_body(other)).await;
    let crid2 = v["crid"].as_u64().unwrap();
    assert_ne!(crid2, crid);
    // Asking again always gives the same answer.
    for _ in 0..3 {
        let (_, v) = put_crid(&c, &sb, &tok, &crid_body(base.clone())).await;
        assert_eq!(v["perfectMatch"][0]["crid"].as_u64(), Some(crid));
    }
    assert_eq!(sb.stats().crids_assigned, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_update_read_versions_and_errors() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let (s, loc, p) = post(
        &c,
        format!("{base}/r4/Patient"),
        &tok,
        &patient("12001", "4000001"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let pid = id_from_location(&loc.unwrap());
    assert!(p["meta"]["lastUpdated"].as_str().unwrap().ends_with('Z'));

    let (s, read) = get(&c, format!("{base}/r4/Patient/{pid}"), &tok).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(read, p);

    let mut changed = read.clone();
    changed["gender"] = json!("female");
    let r = c
        .put(format!("{base}/r4/Patient/{pid}"))
        .bearer_auth(&tok)
        .header("Content-Type", FHIR_JSON)
        .body(changed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["etag"], "W/\"2\"");
    assert!(
        r.headers()["location"]
            .to_str()
            .unwrap()
            .ends_with(&format!("/r4/Patient/{pid}/_history/2"))
    );
    let (_, read) = get(&c, format!("{base}/r4/Patient/{pid}"), &tok).await;
    assert_eq!(read["meta"]["versionId"], "2");
    assert_eq!(read["gender"], "female");

    // Update of an unknown id: 404 (no update-as-create); id mismatch: 400.
    let mut ghost = changed.clone();
    ghost["id"] = json!("999999");
    let put = |url: String, body: Value| {
        c.put(url)
            .bearer_auth(&tok)
            .header("Content-Type", FHIR_JSON)
            .body(body.to_string())
            .send()
    };
    let r = put(format!("{base}/r4/Patient/999999"), ghost)
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = put(format!("{base}/r4/Patient/{pid}"), patient("12001", "1"))
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(expressions(&v), vec!["Patient.id"]);

    for id in ["999999", "abc"] {
        let (s, v) = get(&c, format!("{base}/r4/Patient/{id}"), &tok).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["code"], "not-found");
    }
    // A Patient id read as an Observation does not exist.
    let (s, _) = get(&c, format!("{base}/r4/Observation/{pid}"), &tok).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(sb.stats().requests("update:Patient", "200"), 1);
    assert_eq!(sb.stats().requests("update:Patient", "404"), 1);
    assert_eq!(sb.stats().requests("read:Patient", "404"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn center_rules_and_invalid_resources() {
    let sb = start(two_center_config());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let other = token_for(&c, &sb, "other-center", "other-secret").await;

    // Missing label: 422 naming meta.security.
    let mut p = patient("12001", "1");
    p["meta"]["security"] = json!([]);
    let (s, _, v) = post(&c, format!("{base}/r4/Patient"), &tok, &p).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(expressions(&v), vec!["Patient.meta.security"]);
    // Malformed label code.
    p["meta"]["security"] = json!([{"system": SEC, "code": "rc_1200"}]);
    let (s, _, v) = post(&c, format!("{base}/r4/Patient"), &tok, &p).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(expressions(&v), vec!["Patient.meta.security[0].code"]);
    // A center the token may not use.
    let (s, _, v) = post(
        &c,
        format!("{base}/r4/Patient"),
        &other,
        &patient("12001", "1"),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(v["issue"][0]["code"], "forbidden");
    // Malformed JSON.
    let r = c
        .post(format!("{base}/r4/Patient"))
        .bearer_auth(&tok)
        .header("Content-Type", FHIR_JSON)
        .body("{\"resourceType\": \"Patient\",")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["resourceType"], "OperationOutcome");
    // Wrong content type.
    let r = c
        .post(format!("{base}/r4/Patient"))
        .bearer_auth(&tok)
        .header("Content-Type", "application/xml")
        .body("<Patient/>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // resourceType that does not match the URL.
    let (s, _, v) = post(
        &c,
        format!("{base}/r4/Observation"),
        &tok,
        &patient("12001", "1"),
    )
    .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(expressions(&v), vec!["Observation.resourceType"]);
    // Invalid R4: an Observation without status.
    let (_, loc, _) = post(
        &c,
        format!("{base}/r4/Patient"),
        &tok,
        &patient("12001", "5"),
    )
    .await;
    let pid = id_from_location(&loc.unwrap());
    let mut o = observation("12001", &format!("Patient/{pid}"), "x");
    o.as_object_mut().unwrap().remove("status");
    let (s, _, v) = post(&c, format!("{base}/r4/Observation"), &tok, &o).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        expressions(&v).contains(&"Observation.status".to_string()),
        "{v}"
    );
    // A subject that does not exist.
    let o = observation("12001", "Patient/987654", "y");
    let (s, _, v) = post(&c, format!("{base}/r4/Observation"), &tok, &o).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(expressions(&v), vec!["Observation.subject.reference"]);
    // The other center cannot read, update or refer to this center's Patient.
    let (s, _) = get(&c, format!("{base}/r4/Patient/{pid}"), &other).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    let (s, _, _) = post(
        &c,
        format!("{base}/r4/Observation"),
        &other,
        &observation("12002", &format!("Patient/{pid}"), "z"),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(sb.stats().resources("Patient"), 1);
    assert_eq!(sb.stats().resources("Observation"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patients_are_redacted_on_store() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let mut p = patient("12001", "4000123");
    p["name"] = json!([{"family": "Souza", "given": ["Ana"]}]);
    p["identifier"]
        .as_array_mut()
        .unwrap()
        .push(json!({"system": "http://hl7.org/fhir/sid/us-ssn", "value": "123-45-6789"}));
    p["gender"] = json!("female");
    p["birthDate"] = json!("1975-04-09");
    let (s, loc, created) = post(&c, format!("{base}/r4/Patient"), &tok, &p).await;
    assert_eq!(s, StatusCode::CREATED);
    let (_, stored) = get(
        &c,
        format!("{base}/r4/Patient/{}", id_from_location(&loc.unwrap())),
        &tok,
    )
    .await;
    assert_eq!(stored, created);
    let text = stored.to_string();
    assert!(
        !text.contains("Souza") && !text.contains("123-45-6789"),
        "{text}"
    );
    assert_eq!(stored["identifier"].as_array().unwrap().len(), 1);
    assert_eq!(stored["gender"], "female");
    let labels = stored["meta"]["security"].as_array().unwrap();
    assert!(labels.iter().any(|l| l["code"] == "REDACTED"));
    assert!(labels.iter().any(|l| l["code"] == "rc_12001"));
    assert_eq!(stored["text"]["status"], "generated");
}

fn total(bundle: &Value) -> u64 {
    bundle["total"].as_u64().unwrap()
}

fn ids(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_parameters_and_token_semantics() {
    let sb = start(two_center_config());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let other = token_for(&c, &sb, "other-center", "other-secret").await;
    let mut pids = Vec::new();
    for (ccn, crid) in [("12001", "100"), ("12001", "200"), ("12002", "300")] {
        let (s, loc, _) = post(&c, format!("{base}/r4/Patient"), &tok, &patient(ccn, crid)).await;
        assert_eq!(s, StatusCode::CREATED);
        pids.push(id_from_location(&loc.unwrap()));
    }
    // An identifier without a system.
    let mut nosys = patient("12001", "x");
    nosys["identifier"] = json!([{"value": "100"}]);
    let (_, loc, _) = post(&c, format!("{base}/r4/Patient"), &tok, &nosys).await;
    let nosys_id = id_from_location(&loc.unwrap());
    let q = |query: &str| format!("{base}/r4/Patient?{query}");

    let (_, b) = get(&c, q(&format!("identifier={CRID}%7C100")), &tok).await;
    assert_eq!(ids(&b), vec![pids[0].clone()]);
    let (_, b) = get(&c, q("identifier=100"), &tok).await;
    assert_eq!(ids(&b), vec![pids[0].clone(), nosys_id.clone()]);
    let (_, b) = get(&c, q("identifier=%7C100"), &tok).await;
    assert_eq!(ids(&b), vec![nosys_id.clone()]);
    let (_, b) = get(&c, q(&format!("identifier={CRID}%7C")), &tok).await;
    assert_eq!(total(&b), 3);
    let (_, b) = get(
        &c,
        q(&format!("identifier={CRID}%7C100,{CRID}%7C300")),
        &tok,
    )
    .await;
    assert_eq!(ids(&b), vec![pids[0].clone(), pids[2].clone()]);
    let (_, b) = get(&c, q(&format!("_security={SEC}%7Crc_12002")), &tok).await;
    assert_eq!(ids(&b), vec![pids[2].clone()]);
    let (_, b) = get(
        &c,
        q(&format!(
            "_security={SEC}%7Crc_12001&identifier={CRID}%7C300"
        )),
        &tok,
    )
    .await;
    assert_eq!(total(&b), 0);
    assert!(b.get("entry").is_none());
    // Another center only sees its own resources.
    let (_, b) = get(&c, q(""), &other).await;
    assert_eq!(ids(&b), vec![pids[2].clone()]);

    // Observations: subject, patient, patient.identifier, code, identifier.
    for (i, pid) in pids.iter().take(2).enumerate() {
        for n in 0..2 {
            let mut o = observation("12001", &format!("Patient/{pid}"), &format!("o{i}{n}"));
            if n == 1 {
                o["code"]["coding"][0]["code"] = json!("2345-7");
            }
            let (s, _, v) = post(&c, format!("{base}/r4/Observation"), &tok, &o).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
        }
    }
    let oq = |query: String| format!("{base}/r4/Observation?{query}");
    let p0 = &pids[0];
    for query in [
        format!("subject=Patient/{p0}"),
        format!("patient={p0}"),
        format!("patient=Patient/{p0}"),
        format!("subject={base}/r4/Patient/{p0}"),
        format!("patient.identifier={CRID}%7C100"),
        "patient.identifier=100".to_string(),
    ] {
        let (s, b) = get(&c, oq(query.clone()), &tok).await;
        assert_eq!(s, StatusCode::OK, "{query}");
        assert_eq!(total(&b), 2, "{query}");
    }
    let (_, b) = get(&c, oq("code=http://loinc.org%7C2345-7".into()), &tok).await;
    assert_eq!(total(&b), 2);
    let (_, b) = get(&c, oq(format!("code=2345-7&patient={p0}")), &tok).await;
    assert_eq!(total(&b), 1);
    let (_, b) = get(&c, oq("identifier=urn:fhirlift:test%7Co11".into()), &tok).await;
    assert_eq!(total(&b), 1);
    let (_, b) = get(&c, oq("patient=nonsense".into()), &tok).await;
    assert_eq!(total(&b), 0);

    // _summary=count: the total only.
    let (_, b) = get(&c, oq("_summary=count".into()), &tok).await;
    assert_eq!(total(&b), 4);
    assert!(b.get("entry").is_none());

    // Unknown parameters and bad values are errors, not silently ignored.
    for bad in [
        "name=Ana",
        "identifier:of-type=x",
        "_count=many",
        "_summary=true",
        "identifier=",
    ] {
        let (s, v) = get(&c, q(bad), &tok).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(v["resourceType"], "OperationOutcome");
    }
    let (s, _) = get(&c, oq("code:text=x".into()), &tok).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_pages_follow_next_links() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let mut created = Vec::new();
    for i in 0..7 {
        let (_, loc, _) = post(
            &c,
            format!("{base}/r4/Patient"),
            &tok,
            &patient("12001", &i.to_string()),
        )
        .await;
        created.push(id_from_location(&loc.unwrap()));
    }
    let mut url = Some(format!(
        "{base}/r4/Patient?_security={SEC}%7Crc_12001&_count=3"
    ));
    let mut seen = Vec::new();
    let mut pages = 0;
    while let Some(u) = url {
        let (s, b) = get(&c, u, &tok).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(b["type"], "searchset");
        assert_eq!(total(&b), 7);
        let page = ids(&b);
        assert!(page.len() <= 3);
        seen.extend(page);
        pages += 1;
        url = b["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_string());
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created);
    // The default page size is 20 and _count is capped.
    let (_, b) = get(&c, format!("{base}/r4/Patient?_count=0"), &tok).await;
    assert_eq!(total(&b), 7);
    assert!(b.get("entry").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_are_all_or_nothing() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let (_, loc, existing) = post(
        &c,
        format!("{base}/r4/Patient"),
        &tok,
        &patient("12001", "1"),
    )
    .await;
    let existing_id = id_from_location(&loc.unwrap());
    let pfull = "urn:uuid:0d6f7a7e-1111-4000-8000-000000000001";
    let mut updated = existing.clone();
    updated["gender"] = json!("male");
    let good = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"resource": observation("12001", pfull, "t1"), "request": {"method": "POST", "url": "Observation"}},
            {"fullUrl": pfull, "resource": patient("12001", "2"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": updated, "request": {"method": "PUT", "url": format!("Patient/{existing_id}")}}
        ]
    });
    let (s, _, r) = post(&c, format!("{base}/r4"), &tok, &good).await;
    assert_eq!(s, StatusCode::OK, "{r}");
    let statuses: Vec<&str> = r["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["201 Created", "201 Created", "200 OK"]);
    assert_eq!(
        r["entry"][2]["response"]["location"],
        format!("Patient/{existing_id}/_history/2")
    );
    let new_pid = id_from_location(r["entry"][1]["response"]["location"].as_str().unwrap());
    let (_, b) = get(&c, format!("{base}/r4/Observation?patient={new_pid}"), &tok).await;
    assert_eq!(total(&b), 1);
    assert_eq!(
        b["entry"][0]["resource"]["subject"]["reference"],
        format!("Patient/{new_pid}")
    );
    let before = sb.stats();

    // One bad entry: nothing of the bundle is stored, and the error names the entry.
    let bad = json!({
        "resourceType": "Bundle", "type": "transaction",
        "entry": [
            {"fullUrl": pfull, "resource": patient("12001", "3"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": {"resourceType": "Observation", "meta": {"security": [label("12001")]}, "code": {"text": "x"}, "subject": {"reference": pfull}},
             "request": {"method": "POST", "url": "Observation"}}
        ]
    });
    let (s, _, v) = post(&c, format!("{base}/r4"), &tok, &bad).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert!(
        expressions(&v).contains(&"Bundle.entry[1].resource.status".to_string()),
        "{v}"
    );
    let after = sb.stats();
    assert_eq!(after.resources, before.resources);

    // More than 50 entries are refused.
    let entries: Vec<Value> = (0..51)
        .map(|i| json!({"resource": patient("12001", &format!("b{i}")), "request": {"method": "POST", "url": "Patient"}}))
        .collect();
    let big = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let (s, _, v) = post(&c, format!("{base}/r4"), &tok, &big).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(expressions(&v), vec!["Bundle.entry"]);
    // Exactly 50 is fine.
    let entries: Vec<Value> = (0..50)
        .map(|i| json!({"resource": patient("12001", &format!("b{i}")), "request": {"method": "POST", "url": "Patient"}}))
        .collect();
    let (s, _, _) = post(
        &c,
        format!("{base}/r4"),
        &tok,
        &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
    )
    .await;
    assert_eq!(s, StatusCode::OK);

    // Batches, other methods and non-Bundles are refused.
    for body in [
        json!({"resourceType": "Bundle", "type": "batch", "entry": []}),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "DELETE", "url": "Patient/1"}}]}),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"resource": patient("12001", "q"), "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=q"}}]}),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": [{"request": {"method": "POST", "url": "Patient"}}]}),
        patient("12001", "1"),
    ] {
        let (s, _, v) = post(&c, format!("{base}/r4"), &tok, &body).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(v["resourceType"], "OperationOutcome");
    }
    // A bundle entry for another center is forbidden, and rolls the bundle back.
    let forbidden = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": patient("12001", "ok"), "request": {"method": "POST", "url": "Patient"}},
        {"resource": patient("54321", "no"), "request": {"method": "POST", "url": "Patient"}}
    ]});
    let before = sb.stats().resources("Patient");
    let (s, _, _) = post(&c, format!("{base}/r4"), &tok, &forbidden).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(sb.stats().resources("Patient"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capability_statement_and_unsupported_interactions() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    let (_, cap) = get(&c, format!("{base}/r4/metadata"), &tok).await;
    let rest = &cap["rest"][0];
    assert_eq!(rest["interaction"], json!([{"code": "transaction"}]));
    let obs = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Observation")
        .unwrap();
    let params: Vec<&str> = obs["searchParam"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        params,
        vec![
            "identifier",
            "subject",
            "patient",
            "patient.identifier",
            "code",
            "_security"
        ]
    );
    let interactions: Vec<&str> = obs["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        interactions,
        vec!["create", "update", "read", "search-type"]
    );
    assert_eq!(obs["updateCreate"], false);

    let (_, loc, _) = post(
        &c,
        format!("{base}/r4/Patient"),
        &tok,
        &patient("12001", "1"),
    )
    .await;
    let pid = id_from_location(&loc.unwrap());
    let unsupported = [
        (reqwest::Method::DELETE, format!("{base}/r4/Patient/{pid}")),
        (reqwest::Method::PATCH, format!("{base}/r4/Patient/{pid}")),
        (
            reqwest::Method::GET,
            format!("{base}/r4/Patient/{pid}/_history/1"),
        ),
        (
            reqwest::Method::GET,
            format!("{base}/r4/Patient/{pid}/_history"),
        ),
        (
            reqwest::Method::POST,
            format!("{base}/r4/Patient/$crid-assignment"),
        ),
        (reqwest::Method::POST, format!("{base}/r4/Bundle")),
        (reqwest::Method::GET, format!("{base}/r4/patient")),
        (reqwest::Method::GET, format!("{base}/R4/Patient")),
        (reqwest::Method::GET, format!("{base}/crid")),
        (reqwest::Method::GET, format!("{base}/CRID")),
        (reqwest::Method::PUT, format!("{base}/r4/Patient")),
        (reqwest::Method::DELETE, format!("{base}/r4")),
        (reqwest::Method::GET, format!("{base}/oauth2/token")),
    ];
    for (method, url) in unsupported {
        let r = c
            .request(method.clone(), &url)
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method} {url}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["resourceType"], "OperationOutcome");
    }
    assert_eq!(sb.stats().requests("unsupported", "405"), 13);
}

fn with_faults(f: impl FnOnce(&mut fhirlift::sandbox::Faults)) -> SandboxConfig {
    let mut config = SandboxConfig::default();
    f(&mut config.faults);
    config
}

/// Sends a raw HTTP/1.1 request and returns everything the server sent before closing.
fn raw_exchange(sb: &SandboxHandle, request: &str) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(sb.addr()).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    // A reset counts as a close too.
    let _ = s.read_to_end(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_close_without_answer_and_store_nothing() {
    let sb = start(with_faults(|f| f.drop_rate = 1.0));
    let c = client();
    let base = sb.base_url();
    // The token endpoint is exempt by default.
    let tok = token(&c, &sb).await;
    let err = c
        .post(format!("{base}/r4/Patient"))
        .bearer_auth(&tok)
        .header("Content-Type", FHIR_JSON)
        .body(patient("12001", "1").to_string())
        .send()
        .await
        .unwrap_err();
    assert!(!err.is_timeout() && err.status().is_none(), "{err:?}");
    let body = patient("12001", "2").to_string();
    let raw = raw_exchange(
        &sb,
        &format!(
            "POST /r4/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: {FHIR_JSON}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(
        raw.is_empty(),
        "no byte of an answer: {}",
        String::from_utf8_lossy(&raw)
    );
    let stats = sb.stats();
    assert_eq!(stats.requests("create:Patient", "dropped"), 2);
    assert_eq!(stats.faults("drop"), 2);
    assert_eq!(stats.resources("Patient"), 0);
    // Stats are never faulted.
    let (s, _) = get(&c, format!("{base}/_sandbox/stats"), "").await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_answers_are_stored_but_never_answered() {
    let sb = start(with_faults(|f| f.lost_answer_rate = 1.0));
    let c = client();
    let tok = token(&c, &sb).await;
    let body = patient("12001", "1").to_string();
    let raw = raw_exchange(
        &sb,
        &format!(
            "POST /r4/Patient HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\nContent-Type: {FHIR_JSON}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(raw.is_empty(), "{}", String::from_utf8_lossy(&raw));
    let err = put_crid_err(&c, &sb, &tok).await;
    assert!(err.status().is_none(), "{err:?}");
    let stats = sb.stats();
    assert_eq!(stats.resources("Patient"), 1, "processed and stored");
    assert_eq!(stats.requests("create:Patient", "201"), 1);
    assert_eq!(stats.crids_assigned, 1);
    assert_eq!(stats.faults("lost_answer"), 2);
}

async fn put_crid_err(c: &reqwest::Client, sb: &SandboxHandle, tok: &str) -> reqwest::Error {
    c.put(format!("{}/CRID", sb.base_url()))
        .bearer_auth(tok)
        .json(&crid_body(
            json!({"firstName": "A", "lastName": "B", "birthDate": "2000-01-01", "gender": "F"}),
        ))
        .send()
        .await
        .unwrap_err()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_and_throttling_store_nothing() {
    let sb = start(with_faults(|f| f.error_rate = 1.0));
    let c = client();
    let base = sb.base_url();
    let tok = token(&c, &sb).await;
    for i in 0..6 {
        let (s, _, v) = post(
            &c,
            format!("{base}/r4/Patient"),
            &tok,
            &patient("12001", &i.to_string()),
        )
        .await;
        assert!(
            s == StatusCode::INTERNAL_SERVER_ERROR || s == StatusCode::SERVICE_UNAVAILABLE,
            "{s}"
        );
        assert_eq!(v["resourceType"], "OperationOutcome");
    }
    let stats = sb.stats();
    assert_eq!(stats.resources("Patient"), 0);
    assert_eq!(stats.faults("error"), 6);
    assert_eq!(
        stats.requests("create:Patient", "500") + stats.requests("create:Patient", "503"),
        6
    );
    sb.shutdown();

    let sb = start(with_faults(|f| {
        f.throttle_rate = 1.0;
        f.retry_after_secs = 7;
    }));
    let tok = token(&c, &sb).await;
    let r = c
        .get(format!("{}/r4/metadata", sb.base_url()))
        .bearer_auth(&tok)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.headers()["retry-after"], "7");
    let (s, _) = put_crid(&c, &sb, &tok, &crid_body(json!({}))).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(sb.stats().requests("metadata", "429"), 1);
    assert_eq!(sb.stats().faults("throttle"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_endpoint_faults_only_when_asked() {
    let sb = start(with_faults(|f| {
        f.error_rate = 1.0;
        f.include_token_endpoint = true;
    }));
    let c = client();
    let (s, _) = token_form(
        &c,
        &sb,
        Some(("fhirlift-sandbox", "sandbox-secret")),
        &[("grant_type", "client_credentials")],
    )
    .await;
    assert!(s.is_server_error());
    assert_eq!(sb.stats().faults("error"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_added_and_counted() {
    let sb = start(with_faults(|f| {
        f.latency_ms = 5;
        f.jitter_ms = 5;
    }));
    let c = client();
    let tok = token(&c, &sb).await;
    for _ in 0..3 {
        let (s, _) = get(&c, format!("{}/r4/metadata", sb.base_url()), &tok).await;
        assert_eq!(s, StatusCode::OK);
    }
    // The token request is exempt; the three API calls were delayed.
    assert_eq!(sb.stats().faults("latency"), 3);
}

/// The statuses of `n` sequential metadata requests.
async fn fault_sequence(seed: u64, n: usize) -> Vec<u16> {
    let mut config = with_faults(|f| {
        f.error_rate = 0.3;
        f.throttle_rate = 0.2;
    });
    config.seed = seed;
    let sb = start(config);
    let c = client();
    let tok = token(&c, &sb).await;
    let mut out = Vec::new();
    for _ in 0..n {
        let r = c
            .get(format!("{}/r4/metadata", sb.base_url()))
            .bearer_auth(&tok)
            .send()
            .await
            .unwrap();
        out.push(r.status().as_u16());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_reproducible_with_a_seed() {
    let a = fault_sequence(42, 40).await;
    let b = fault_sequence(42, 40).await;
    let other = fault_sequence(7, 40).await;
    assert_eq!(a, b);
    assert_ne!(a, other);
    assert!(
        a.contains(&200) && a.contains(&429) && a.iter().any(|s| *s >= 500),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_store_persists_and_dumps_as_ndjson() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("sandbox.db");
    let c = client();
    let demo = crid_body(
        json!({"firstName": "Ana", "lastName": "Souza", "birthDate": "1975-04-09", "gender": "F"}),
    );
    let config = || SandboxConfig {
        db: Some(db.clone()),
        ..SandboxConfig::default()
    };

    let sb = start(config());
    let tok = token(&c, &sb).await;
    let (_, v) = put_crid(&c, &sb, &tok, &demo).await;
    let crid = v["crid"].as_u64().unwrap();
    let (_, loc, _) = post(
        &c,
        format!("{}/r4/Patient", sb.base_url()),
        &tok,
        &patient("12001", &crid.to_string()),
    )
    .await;
    let pid = id_from_location(&loc.unwrap());
    let (s, _, _) = post(
        &c,
        format!("{}/r4/Observation", sb.base_url()),
        &tok,
        &observation("12001", &format!("Patient/{pid}"), "persisted"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    sb.shutdown();

    // A restart keeps resources, CRIDs and the id sequence; tokens do not survive.
    let sb = start(config());
    let (s, _) = get(&c, format!("{}/r4/Patient/{pid}", sb.base_url()), &tok).await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let tok = token(&c, &sb).await;
    let (s, p) = get(&c, format!("{}/r4/Patient/{pid}", sb.base_url()), &tok).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(p["identifier"][0]["value"], crid.to_string());
    let (_, v) = put_crid(&c, &sb, &tok, &demo).await;
    assert_eq!(v["perfectMatch"][0]["crid"].as_u64(), Some(crid));
    let (_, loc, _) = post(
        &c,
        format!("{}/r4/Patient", sb.base_url()),
        &tok,
        &patient("12001", "9"),
    )
    .await;
    let pid2 = id_from_location(&loc.unwrap());
    assert!(pid2.parse::<u64>().unwrap() > pid.parse::<u64>().unwrap());
    let stats = sb.stats();
    assert_eq!(
        (
            stats.resources("Patient"),
            stats.resources("Observation"),
            stats.crids_assigned
        ),
        (2, 1, 1)
    );
    sb.shutdown();

    // The store holds no names or birth dates, only hashes.
    let bytes = std::fs::read(&db).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(!text.contains("Souza") && !text.contains("1975-04-09"));

    let out = dir.path().join("dump");
    let run = fhirlift()
        .args(["sandbox", "--db"])
        .arg(&db)
        .arg("--dump")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let patients = std::fs::read_to_string(out.join("Patient.ndjson")).unwrap();
    let lines: Vec<Value> = patients
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], pid.as_str());
    let obs = std::fs::read_to_string(out.join("Observation.ndjson")).unwrap();
    assert_eq!(obs.lines().count(), 1);
}

use crate::it::common::fhirlift;

#[test]
fn cli_rejects_bad_settings_and_missing_stores() {
    let out = fhirlift()
        .args(["sandbox", "--error-rate", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error-rate"));
    let out = fhirlift()
        .args(["sandbox", "--ccn", "12"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let dir = tempfile::tempdir().unwrap();
    let out = fhirlift()
        .args(["sandbox", "--db"])
        .arg(dir.path().join("none.db"))
        .arg("--dump")
        .arg(dir.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        !dir.path().join("none.db").exists(),
        "a dump never creates a store"
    );
    // --dump needs --db.
    let out = fhirlift()
        .args(["sandbox", "--dump", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_serves_with_the_given_account() {
    use std::io::BufRead;
    let mut child = fhirlift()
        .args([
            "sandbox",
            "--addr",
            "127.0.0.1:0",
            "--client-id",
            "center-app",
            "--client-secret",
            "s3",
            "--username",
            "svc",
            "--password",
            "pw",
            "--ccn",
            "12001",
            "--ccn",
            "12002",
            "--token-ttl",
            "60",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut base = None;
    let mut token_url = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(u) = line.trim().strip_prefix("base URL:") {
            base = Some(u.trim().to_string());
        }
        if let Some(u) = line.trim().strip_prefix("token URL:") {
            token_url = Some(u.trim().to_string());
        }
        if line.starts_with("Press Ctrl-C") {
            break;
        }
    }
    let (base, token_url) = (base.unwrap(), token_url.unwrap());
    assert!(base.starts_with("http://127.0.0.1:"));
    assert_eq!(token_url, format!("{base}/oauth2/token"));
    let c = client();
    let r = c
        .post(&token_url)
        .basic_auth("center-app", Some("s3"))
        .form(&[
            ("grant_type", "password"),
            ("username", "svc"),
            ("password", "pw"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["expires_in"], 60);
    let tok = v["access_token"].as_str().unwrap().to_string();
    let (s, _, _) = post(
        &c,
        format!("{base}/r4/Patient"),
        &tok,
        &patient("12002", "1"),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_get_distinct_ids_and_one_crid_per_person() {
    let sb = start(SandboxConfig::default());
    let c = client();
    let tok = token(&c, &sb).await;
    let mut tasks = Vec::new();
    for i in 0..40 {
        let (c, tok, url) = (
            c.clone(),
            tok.clone(),
            format!("{}/r4/Patient", sb.base_url()),
        );
        tasks.push(tokio::spawn(async move {
            let (s, loc, _) = post(&c, url, &tok, &patient("12001", &i.to_string())).await;
            assert_eq!(s, StatusCode::CREATED);
            id_from_location(&loc.unwrap())
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 40);

    let demo = crid_body(
        json!({"firstName": "Li", "lastName": "Wei", "birthDate": "1990-05-06", "gender": "M"}),
    );
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, tok, url, demo) = (
            c.clone(),
            tok.clone(),
            format!("{}/CRID", sb.base_url()),
            demo.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let v: Value = c
                .put(url)
                .bearer_auth(&tok)
                .json(&demo)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["crid"]
                .as_u64()
                .or_else(|| v["perfectMatch"][0]["crid"].as_u64())
                .unwrap()
        }));
    }
    let mut crids = Vec::new();
    for t in tasks {
        crids.push(t.await.unwrap());
    }
    crids.dedup();
    assert_eq!(crids.len(), 1, "{crids:?}");
    assert_eq!(sb.stats().crids_assigned, 1);
}
