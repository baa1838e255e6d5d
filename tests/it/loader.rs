//! Integration tests: the loader against the real sandbox on 127.0.0.1 — loads exactly once,
//! repeats change nothing, faults never duplicate, ambiguous CRIDs reject their patient, secrets
//! stay out of logs.
#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::common;
use fhirlift::config::{FhirUris, GrantType, TargetKind};
use fhirlift::ledger::{Ledger, Scope};
use fhirlift::resource::{MappedPatient, MappedResource};
use fhirlift::sandbox::{Faults, SandboxConfig, SandboxHandle};
use fhirlift::sink::load::credentials::{Credentials, Secret};
use fhirlift::sink::load::retry::RetryPolicy;
use fhirlift::sink::load::summary::LoadSummary;
use fhirlift::sink::load::synthetic::{self, OBSERVATION_SYSTEM};
use fhirlift::sink::load::target::Endpoints;
use fhirlift::sink::load::{Auth, LedgerHook, Loader, LoaderConfig};
use fhirlift::sink::{OutcomeStatus, RowOutcome, Sink, SinkError};
use serde_json::{Value, json};

const CCN: &str = "12001";

fn start(config: SandboxConfig) -> SandboxHandle {
    SandboxHandle::start(config, "127.0.0.1:0").unwrap()
}

fn sandbox_auth() -> Auth {
    Auth::OAuth {
        grant: GrantType::Password,
        credentials: Credentials {
            client_id: Secret::new("fhirlift-sandbox"),
            client_secret: Secret::new("sandbox-secret"),
            username: Some(Secret::new("sandbox-user")),
            password: Some(Secret::new("sandbox-password")),
        },
        scope: Some("api_cibmtr_fhir_ehr_client".into()),
    }
}

fn config_for(sb: &SandboxHandle) -> LoaderConfig {
    let base = url::Url::parse(&sb.base_url()).unwrap();
    let token = url::Url::parse(&sb.token_url()).unwrap();
    let mut c = LoaderConfig::new(
        Endpoints::cibmtr(TargetKind::Custom, &base, Some(token)),
        sandbox_auth(),
        CCN,
    );
    c.retry = RetryPolicy {
        max_attempts: 10,
        base_delay: std::time::Duration::from_millis(10),
        max_delay: std::time::Duration::from_millis(200),
        max_retry_after: std::time::Duration::from_secs(1),
    };
    c
}

/// Runs one load and returns its outcomes and summary.
fn load(
    config: LoaderConfig,
    ledger: Option<LedgerHook>,
    patients: Vec<MappedPatient>,
    resources: Vec<MappedResource>,
) -> Result<(Vec<RowOutcome>, LoadSummary), SinkError> {
    let mut loader = Loader::new(config, ledger, None).unwrap();
    let summary = loader.summary_handle();
    loader.patients(patients)?;
    loader.resources(resources)?;
    let outcomes = Box::new(loader).finish()?;
    let s = summary.lock().unwrap().clone().unwrap();
    Ok((outcomes, s))
}

/// Asks the server, by identifier, how many resources carry each identifier value.
fn server_counts(
    sb: &SandboxHandle,
    rtype: &str,
    system: &str,
    values: &[String],
) -> HashMap<String, usize> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = reqwest::Client::new();
        // The sandbox may be injecting faults: ask until it answers.
        let mut token = String::new();
        for _ in 0..50 {
            let r = c
                .post(sb.token_url())
                .basic_auth("fhirlift-sandbox", Some("sandbox-secret"))
                .form(&[
                    ("grant_type", "password"),
                    ("username", "sandbox-user"),
                    ("password", "sandbox-password"),
                ])
                .send()
                .await;
            if let Ok(r) = r
                && r.status() == 200
            {
                let t: Value = r.json().await.unwrap();
                token = t["access_token"].as_str().unwrap().to_string();
                break;
            }
        }
        let mut counts: HashMap<String, usize> = values.iter().map(|v| (v.clone(), 0)).collect();
        for chunk in values.chunks(50) {
            let any: Vec<String> = chunk.iter().map(|v| format!("{system}|{v}")).collect();
            let mut bundle = None;
            for _ in 0..50 {
                let r = c
                    .get(format!("{}/r4/{rtype}", sb.base_url()))
                    .bearer_auth(&token)
                    .query(&[("identifier", any.join(",")), ("_count", "1000".into())])
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status() == 200
                    && let Ok(b) = r.json::<Value>().await
                {
                    bundle = Some(b);
                    break;
                }
            }
            let b = bundle.expect("the sandbox answered a search");
            for e in b["entry"].as_array().cloned().unwrap_or_default() {
                for id in e["resource"]["identifier"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                {
                    if id["system"] == system {
                        *counts
                            .entry(id["value"].as_str().unwrap().to_string())
                            .or_default() += 1;
                    }
                }
            }
        }
        counts
    })
}

fn statuses(outcomes: &[RowOutcome]) -> HashMap<OutcomeStatus, usize> {
    let mut m = HashMap::new();
    for o in outcomes {
        *m.entry(o.status).or_default() += 1;
    }
    m
}

fn obs_values(resources: &[MappedResource]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r.identifier.value.clone())
        .collect()
}

/// Every expected Observation exists exactly once, and refers to its patient's server id.
fn assert_exactly_once(sb: &SandboxHandle, outcomes: &[RowOutcome], resources: &[MappedResource]) {
    let counts = server_counts(
        sb,
        "Observation",
        OBSERVATION_SYSTEM,
        &obs_values(resources),
    );
    let wrong: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(wrong.is_empty(), "not exactly once: {wrong:?}");
    let stats = sb.stats();
    assert_eq!(stats.resources("Observation"), resources.len() as u64);
    let ids: HashSet<_> = outcomes
        .iter()
        .filter_map(|o| o.server_id.clone())
        .collect();
    assert_eq!(ids.len(), outcomes.len(), "every row has its own server id");
}

#[test]
fn loads_every_resource_exactly_once_and_a_repeat_creates_nothing() {
    let sb = start(SandboxConfig::default());
    let (p, o) = synthetic::generate(12, 5, CCN, &FhirUris::default());
    let (out, summary) = load(config_for(&sb), None, p.clone(), o.clone()).unwrap();
    assert_eq!(
        statuses(&out),
        HashMap::from([(OutcomeStatus::Created, 72)]),
        "{out:#?}"
    );
    assert_eq!((summary.created, summary.rejected), (72, 0));
    assert_exactly_once(&sb, &out, &o);
    assert_eq!(sb.stats().resources("Patient"), 12);

    // Observations point at their patient's server id, not at the placeholder or the CRID.
    let patient_ids: HashMap<String, String> = p
        .iter()
        .zip(&out)
        .map(|(p, o)| (p.resource.patient_key.clone(), o.server_id.clone().unwrap()))
        .collect();
    let created_before = sb.stats().requests_total("create:Observation");

    // A fresh loader (no ledger): finds everything, changes nothing, creates nothing.
    let (again, _) = load(config_for(&sb), None, p, o.clone()).unwrap();
    assert_eq!(
        statuses(&again),
        HashMap::from([(OutcomeStatus::Unchanged, 72)])
    );
    assert_eq!(
        sb.stats().requests_total("create:Observation"),
        created_before
    );
    assert_eq!(sb.stats().requests_total("create:Patient"), 12);
    assert_exactly_once(&sb, &again, &o);
    for (r, oc) in o.iter().zip(&again[12..]) {
        assert_eq!(oc.identifier.as_ref().unwrap().value, r.identifier.value);
        assert!(oc.server_id.is_some());
    }
    assert_eq!(patient_ids.len(), 12);
}

#[test]
fn with_a_ledger_a_repeat_sends_nothing_and_a_change_is_an_update() {
    let sb = start(SandboxConfig::default());
    let state = tempfile::tempdir().unwrap();
    let ledger = Arc::new(Ledger::open(state.path()).unwrap());
    let hook = LedgerHook {
        ledger: ledger.clone(),
        scope: Scope::new("sandbox-test", CCN),
    };
    let (p, mut o) = synthetic::generate(4, 3, CCN, &FhirUris::default());
    let (out, _) = load(config_for(&sb), Some(hook.clone()), p.clone(), o.clone()).unwrap();
    assert_eq!(
        statuses(&out),
        HashMap::from([(OutcomeStatus::Created, 16)])
    );
    let before = sb.stats();

    o[0].body.edit(|b| b["status"] = json!("amended"));
    let (again, summary) = load(config_for(&sb), Some(hook), p, o).unwrap();
    assert_eq!(
        statuses(&again),
        HashMap::from([(OutcomeStatus::Unchanged, 15), (OutcomeStatus::Updated, 1)])
    );
    let after = sb.stats();
    // One token and one PUT: no CRID request, no search, no create.
    assert_eq!(summary.requests, 1);
    assert_eq!(after.requests_total("crid"), before.requests_total("crid"));
    assert_eq!(
        after.requests_total("search:Observation"),
        before.requests_total("search:Observation")
    );
    assert_eq!(after.requests_total("update:Observation"), 1);
}

fn faulty(seed: u64) -> SandboxConfig {
    SandboxConfig {
        token_ttl_secs: 2,
        seed,
        faults: Faults {
            latency_ms: 5,
            error_rate: 0.08,
            throttle_rate: 0.08,
            retry_after_secs: 0,
            drop_rate: 0.08,
            lost_answer_rate: 0.08,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    }
}

fn assert_settled(out: &[RowOutcome]) {
    for o in out {
        match o.status {
            OutcomeStatus::Created | OutcomeStatus::Updated | OutcomeStatus::Unchanged => {
                assert!(o.server_id.is_some(), "{o:?}")
            }
            OutcomeStatus::Rejected => assert!(o.message.is_some(), "{o:?}"),
            _ => panic!("row neither submitted nor rejected: {o:?}"),
        }
    }
}

#[test]
fn faults_never_duplicate_single_requests() {
    let sb = start(faulty(7));
    let (p, o) = synthetic::generate(20, 6, CCN, &FhirUris::default());
    let (out, summary) = load(config_for(&sb), None, p, o.clone()).unwrap();
    assert_settled(&out);
    assert_eq!(summary.rejected, 0, "{out:#?}");
    assert_exactly_once(&sb, &out, &o);
    assert_eq!(sb.stats().resources("Patient"), 20);
    let stats = sb.stats();
    for fault in ["error", "throttle", "drop", "lost_answer"] {
        assert!(
            stats.faults(fault) > 0,
            "fault {fault} never fired: {stats:?}"
        );
    }
    assert!(summary.retried > 0);
    // 2-second tokens over a run of several seconds: refreshed, never failed.
    assert!(
        summary.token_requests >= 2 || summary.elapsed.as_secs() < 2,
        "{summary:?}"
    );
}

#[test]
fn faults_never_duplicate_bundles() {
    // Per-patient Bundles (groups larger than a Bundle), and new patients packed with their
    // resources into shared Bundles.
    for (seed, patients, per_patient, bundle) in [(11, 10, 12, 5), (13, 24, 3, 50)] {
        let sb = start(faulty(seed));
        let (p, o) = synthetic::generate(patients, per_patient, CCN, &FhirUris::default());
        let mut c = config_for(&sb);
        c.bundle_size = bundle;
        let (out, summary) = load(c, None, p, o.clone()).unwrap();
        assert_settled(&out);
        assert_eq!(summary.rejected, 0, "{out:#?}");
        assert_exactly_once(&sb, &out, &o);
        assert_eq!(sb.stats().resources("Patient"), patients as u64);
        assert!(sb.stats().requests_total("transaction") > 0);
    }
}

#[test]
fn one_bad_resource_never_blocks_its_bundle() {
    let sb = start(SandboxConfig::default());
    let (p, mut o) = synthetic::generate(2, 10, CCN, &FhirUris::default());
    // No LOINC code: the server refuses it (and with it the whole transaction).
    o[3].body.edit(|b| {
        b["code"] = json!({"text": "no coding"});
        b.as_object_mut().unwrap().remove("status");
    });
    let mut c = config_for(&sb);
    c.bundle_size = 10;
    let (out, summary) = load(c, None, p, o.clone()).unwrap();
    assert_eq!(summary.rejected, 1);
    let bad = &out[2 + 3];
    assert_eq!(bad.status, OutcomeStatus::Rejected);
    assert!(matches!(bad.http_status, Some(400 | 422)), "{bad:?}");
    assert!(
        bad.message.as_deref().unwrap().contains("status"),
        "{bad:?}"
    );
    assert_eq!(bad.location.to_string(), o[3].location.to_string());
    assert_eq!(sb.stats().resources("Observation"), 19);
}

#[test]
fn an_ambiguous_crid_rejects_the_patient_and_its_resources_and_the_run_goes_on() {
    let sb = start(SandboxConfig::default());
    let uris = FhirUris::default();
    let (mut p, o) = synthetic::generate(3, 2, CCN, &uris);
    // Patients 0 and 1 share a birth date and gender and carry SSNs.
    let d1 = p[1].crid_demographics.as_mut().unwrap();
    d1.insert("birthDate".into(), json!("1960-01-01"));
    d1.insert("gender".into(), json!("M"));
    d1.insert("ssn".into(), json!("111-11-1111"));
    let d0 = p[0].crid_demographics.as_mut().unwrap();
    d0.insert("birthDate".into(), json!("1960-01-01"));
    d0.insert("ssn".into(), json!("000-00-0000"));
    let (first, _) = load(config_for(&sb), None, p[..2].to_vec(), o[..4].to_vec()).unwrap();
    assert!(
        first.iter().all(|o| o.status == OutcomeStatus::Created),
        "{first:#?}"
    );

    // Patient 2 claims patient 1's SSN with patient 0's name: two perfect matches.
    let mut confused = p[2].clone();
    let d = confused.crid_demographics.as_mut().unwrap();
    for k in ["firstName", "lastName", "birthDate", "gender"] {
        d.insert(
            k.into(),
            p[0].crid_demographics.as_ref().unwrap()[k].clone(),
        );
    }
    d.insert("ssn".into(), json!("111-11-1111"));
    // And a patient with no last name: refused by the CRID service.
    let (mut extra, extra_obs) = synthetic::generate(5, 2, CCN, &uris);
    let mut incomplete = extra.remove(4);
    incomplete
        .crid_demographics
        .as_mut()
        .unwrap()
        .remove("lastName");
    let mut resources = o[4..].to_vec();
    resources.extend(extra_obs[8..].iter().cloned());
    let (out, summary) =
        load(config_for(&sb), None, vec![confused, incomplete], resources).unwrap();
    assert_eq!(summary.rejected, 6, "{out:#?}");
    assert!(
        out[0]
            .message
            .as_deref()
            .unwrap()
            .contains("2 perfect matches"),
        "{:?}",
        out[0]
    );
    assert!(
        out[2].message.as_deref().unwrap().contains("rejected"),
        "{:?}",
        out[2]
    );
    assert_eq!(out[1].http_status, Some(400));
    assert!(
        out[1].message.as_deref().unwrap().contains("lastName"),
        "{:?}",
        out[1]
    );
    assert_eq!(sb.stats().resources("Patient"), 2);
}

#[test]
fn bad_credentials_abort_before_anything_is_sent() {
    let sb = start(SandboxConfig::default());
    let mut c = config_for(&sb);
    c.auth = Auth::OAuth {
        grant: GrantType::Password,
        credentials: Credentials {
            client_id: Secret::new("fhirlift-sandbox"),
            client_secret: Secret::new("wrong-secret-value"),
            username: Some(Secret::new("sandbox-user")),
            password: Some(Secret::new("sandbox-password")),
        },
        scope: None,
    };
    let (p, o) = synthetic::generate(2, 2, CCN, &FhirUris::default());
    let e = load(c, None, p, o).unwrap_err();
    assert!(matches!(e, SinkError::Auth(_)), "{e}");
    assert!(!e.to_string().contains("wrong-secret-value"), "{e}");
    assert_eq!(sb.stats().requests_total("crid"), 0);
}

#[test]
fn production_needs_confirmation_and_says_what_it_would_send() {
    // Loopback URLs under the production kind: even a bug could not reach the real service.
    let sb = start(SandboxConfig::default());
    let mut c = config_for(&sb);
    c.endpoints.kind = TargetKind::Production;
    let (p, o) = synthetic::generate(2, 3, CCN, &FhirUris::default());
    let e = load(c, None, p, o).unwrap_err().to_string();
    assert!(
        e.contains("8 resources") && e.contains("12001") && e.contains("--confirm-production"),
        "{e}"
    );
    assert_eq!(sb.stats().requests_total("token"), 0);
}

/// `run --target production` without confirmation maps the sources to say how much it would
/// send, and sends nothing: the refusal comes before any network use.
#[test]
fn an_unconfirmed_production_run_counts_what_it_would_send() {
    let state = tempfile::tempdir().unwrap();
    let out = common::fhirlift()
        .arg("run")
        .arg(common::repo().join("samples/pipeline.toml"))
        .args(["--target", "production", "--no-progress", "--state"])
        .arg(state.path())
        .env("FHIRLIFT_CLIENT_ID", "id")
        .env("FHIRLIFT_CLIENT_SECRET", "secret")
        .env("FHIRLIFT_USERNAME", "user")
        .env("FHIRLIFT_PASSWORD", "password")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // The samples map to 46 Patients and 1,866 Observations (their bad rows excluded).
    assert!(
        err.contains("refusing to send 1912 resources for center 12001 to production"),
        "{err}"
    );
    assert!(err.contains("--confirm-production"), "{err}");
    assert!(
        !state.path().join("ledger.sqlite").exists(),
        "nothing is recorded for a refused run"
    );
}

#[test]
fn short_lived_tokens_are_refreshed_and_a_refused_token_is_retried_once() {
    // 1-second tokens, 20 ms per request, one request at a time: at least 70 requests take well
    // over a second, so the token must be refreshed along the way.
    let sb = start(SandboxConfig {
        token_ttl_secs: 1,
        faults: Faults {
            latency_ms: 20,
            include_token_endpoint: false,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    });
    let (p, o) = synthetic::generate(10, 5, CCN, &FhirUris::default());
    let mut c = config_for(&sb);
    c.concurrency = 1;
    let (out, summary) = load(c, None, p, o).unwrap();
    assert_settled(&out);
    assert_eq!(summary.created, 60);
    assert!(summary.token_requests >= 2, "{summary:?}");
    assert_eq!(sb.stats().requests("crid", "401"), 0);

    // Tokens that are expired when issued: the first 401 gets one refresh and one retry, the
    // second stops the run as an authentication failure.
    let dead = start(SandboxConfig {
        token_ttl_secs: 0,
        ..SandboxConfig::default()
    });
    let (p, o) = synthetic::generate(1, 1, CCN, &FhirUris::default());
    let e = load(config_for(&dead), None, p, o).unwrap_err();
    assert!(matches!(e, SinkError::Auth(_)), "{e}");
    assert_eq!(dead.stats().requests_total("token"), 2);
    assert_eq!(dead.stats().requests_total("crid"), 2);
}

#[test]
fn a_target_that_fails_every_request_stops_the_run_instead_of_rejecting_every_record() {
    let sb = start(SandboxConfig {
        faults: Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
        ..SandboxConfig::default()
    });
    let (p, o) = synthetic::generate(40, 2, CCN, &FhirUris::default());
    let e = load(config_for(&sb), None, p, o).unwrap_err();
    let text = e.to_string();
    assert!(matches!(e, SinkError::Target(_)), "{text}");
    assert!(text.contains("in a row failed after every retry"), "{text}");
    // It stopped after the streak, well before trying all 40 patients' CRIDs to the end.
    let crid_calls = sb.stats().requests_total("crid");
    assert!(crid_calls < 40 * 10, "{crid_calls}");
}

fn write_config(dir: &std::path::Path, target: &str) -> std::path::PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(
        &p,
        format!("[center]\nccn = \"12001\"\n[sources.a]\npath = \"a.csv\"\n{target}"),
    )
    .unwrap();
    p
}

#[test]
fn check_reads_the_capability_statement_and_never_logs_secrets() {
    let sb = start(SandboxConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[target]\nkind = \"custom\"\nbase_url = \"{}\"\ntoken_url = \"{}\"\n",
            sb.base_url(),
            sb.token_url()
        ),
    );
    let out = common::fhirlift()
        .args(["-vvv", "check"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .env("FHIRLIFT_CLIENT_ID", "fhirlift-sandbox")
        .env("FHIRLIFT_CLIENT_SECRET", "sandbox-secret")
        .env("FHIRLIFT_USERNAME", "sandbox-user")
        .env("FHIRLIFT_PASSWORD", "sandbox-password")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("can work against this target"), "{stdout}");
    assert!(
        stderr.len() > 100,
        "trace logging produced output: {stderr}"
    );
    for secret in [
        "sandbox-secret",
        "sandbox-password",
        "Bearer ",
        "access_token",
    ] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} leaked"
        );
    }
    // Nothing was sent: no CRID request, no resource.
    let stats = sb.stats();
    assert_eq!(stats.requests_total("crid"), 0);
    assert_eq!(stats.resources("Patient"), 0);

    // Wrong secret: exit 3, and the secret is not in the message.
    let out = common::fhirlift()
        .arg("check")
        .arg(&config)
        .env("FHIRLIFT_CLIENT_ID", "fhirlift-sandbox")
        .env("FHIRLIFT_CLIENT_SECRET", "not-the-secret")
        .env("FHIRLIFT_USERNAME", "sandbox-user")
        .env("FHIRLIFT_PASSWORD", "sandbox-password")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3), "{all}");
    assert!(!all.contains("not-the-secret"), "{all}");
}

#[test]
fn check_refuses_plain_http_to_remote_hosts_and_missing_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[target]\nkind = \"custom\"\nbase_url = \"http://example.org/v1\"\ntoken_url = \"https://example.org/token\"\n",
    );
    let out = common::fhirlift()
        .arg("check")
        .arg(&config)
        .env("FHIRLIFT_CLIENT_ID", "x")
        .env("FHIRLIFT_CLIENT_SECRET", "y")
        .env("FHIRLIFT_USERNAME", "u")
        .env("FHIRLIFT_PASSWORD", "p")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("plain http://"), "{err}");

    let config = write_config(dir.path(), "[target]\nkind = \"test\"\n");
    let out = common::fhirlift()
        .arg("check")
        .arg(&config)
        .env_remove("FHIRLIFT_CLIENT_ID")
        .env_remove("FHIRLIFT_CLIENT_SECRET")
        .env_remove("FHIRLIFT_USERNAME")
        .env_remove("FHIRLIFT_PASSWORD")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("FHIRLIFT_CLIENT_SECRET"), "{err}");
}

#[test]
fn new_patients_travel_in_bundles_with_their_resources_and_a_bad_one_is_isolated() {
    let sb = start(SandboxConfig::default());
    let (p, mut o) = synthetic::generate(6, 4, CCN, &FhirUris::default());
    let mut c = config_for(&sb);
    c.bundle_size = 50;
    let (out, summary) = load(c.clone(), None, p.clone(), o.clone()).unwrap();
    assert_eq!(summary.created, 30, "{out:#?}");
    assert_exactly_once(&sb, &out, &o);
    // 6 CRID requests, one Bundle: no single creates, and no Patient search, since a CRID the
    // service has just made cannot be on any Patient yet.
    assert_eq!(sb.stats().requests_total("transaction"), 1);
    assert_eq!(sb.stats().requests_total("create:Patient"), 0);
    assert_eq!(sb.stats().requests_total("search:Patient"), 0);
    assert_eq!(summary.requests, 6 + 1);

    // The same load again finds everything; nothing is created.
    let (again, _) = load(c.clone(), None, p, o.clone()).unwrap();
    assert!(
        again.iter().all(|o| o.status == OutcomeStatus::Unchanged),
        "{again:#?}"
    );
    assert_eq!(sb.stats().resources("Observation"), 24);

    // A fresh server and one invalid Observation: the Bundle is refused, every group goes the
    // single way, and only the bad row is rejected.
    let sb = start(SandboxConfig::default());
    let (p, _) = synthetic::generate(6, 4, CCN, &FhirUris::default());
    o[5].body.edit(|b| {
        b.as_object_mut().unwrap().remove("status");
    });
    let base = url::Url::parse(&sb.base_url()).unwrap();
    c.endpoints = Endpoints::cibmtr(
        TargetKind::Custom,
        &base,
        Some(url::Url::parse(&sb.token_url()).unwrap()),
    );
    let (out, summary) = load(c, None, p, o.clone()).unwrap();
    assert_eq!((summary.created, summary.rejected), (29, 1), "{out:#?}");
    assert_eq!(out[6 + 5].status, OutcomeStatus::Rejected);
    assert_eq!(sb.stats().resources("Observation"), 23);
    assert_eq!(sb.stats().resources("Patient"), 6);
}

#[test]
fn one_person_under_two_record_keys_gets_one_patient() {
    for bundle in [0, 50] {
        let sb = start(SandboxConfig::default());
        let (mut p, o) = synthetic::generate(4, 3, CCN, &FhirUris::default());
        // Rows 0 and 3 describe the same person: the CRID service answers the same CRID.
        p[3].crid_demographics = p[0].crid_demographics.clone();
        let mut c = config_for(&sb);
        c.bundle_size = bundle;
        let (out, summary) = load(c, None, p, o.clone()).unwrap();
        assert_settled(&out);
        assert_eq!(summary.rejected, 0, "{out:#?}");
        assert_eq!(sb.stats().resources("Patient"), 3, "bundle size {bundle}");
        assert_eq!(out[0].server_id, out[3].server_id);
        // Whichever came first created the Patient; the other reused it.
        let mut both = [out[0].status, out[3].status];
        both.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(both, [OutcomeStatus::Created, OutcomeStatus::Unchanged]);
        assert_exactly_once(&sb, &out[4..], &o);
    }
}

#[test]
fn a_generic_fhir_target_takes_the_crid_from_a_column_and_never_calls_the_crid_service() {
    let sb = start(SandboxConfig::default());
    let mut c = config_for(&sb);
    // `kind = "fhir"`: the FHIR base is given directly, no `PUT /CRID`.
    c.endpoints = Endpoints {
        kind: TargetKind::Fhir,
        crid_url: None,
        fhir_base: url::Url::parse(&format!("{}/r4/", sb.base_url())).unwrap(),
        token_url: c.endpoints.token_url.clone(),
    };
    c.crid = fhirlift::config::CridMode::Column {
        column: "crid".into(),
    };
    let (mut p, o) = synthetic::generate(3, 2, CCN, &FhirUris::default());
    p[0].known_crid = Some("1982897480019337".into());
    p[1].known_crid = Some("77".into());
    p[2].known_crid = Some("not a number".into());
    let (out, summary) = load(c, None, p, o).unwrap();
    assert_eq!((summary.created, summary.rejected), (6, 3), "{out:#?}");
    assert!(
        out[2].message.as_deref().unwrap().contains("CRID column"),
        "{:?}",
        out[2]
    );
    assert_eq!(sb.stats().requests_total("crid"), 0);
    assert_eq!(sb.stats().resources("Patient"), 2);
}

/// The README's main command: the samples into the embedded sandbox, twice.
#[test]
fn the_samples_load_into_the_embedded_sandbox_and_a_second_run_creates_nothing() {
    let state = tempfile::tempdir().unwrap();
    let run = || {
        common::fhirlift()
            .arg("run")
            .arg(common::repo().join("samples/pipeline.toml"))
            .arg("--state")
            .arg(state.path())
            .args(["--no-progress", "--concurrency", "16"])
            .output()
            .unwrap()
    };
    let first = run();
    let err = String::from_utf8_lossy(&first.stderr);
    // The samples hold deliberately bad rows: exit 1, and the summary says where things are.
    assert_eq!(first.status.code(), Some(1), "{err}");
    assert!(err.contains("the embedded sandbox"), "{err}");
    assert!(err.contains("sandbox.sqlite"), "{err}");
    assert!(err.contains("rejects"), "{err}");
    let created = |text: &str| -> u64 {
        let at = text.find(" created,").expect("a created count");
        text[..at].rsplit(' ').next().unwrap().parse().unwrap()
    };
    let made = created(&err[err.find("finished:").unwrap()..]);
    // Every good row: 46 Patients and 1,866 Observations (samples/README.md lists the bad ones).
    assert_eq!(made, 46 + 1866, "{err}");
    assert!(err.contains("; 138 rows rejected before sending;"), "{err}");
    // The ledger and the store hold patient data: the owner's alone.
    #[cfg(unix)]
    for db in ["ledger.sqlite", "sandbox.sqlite"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path().join(db))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{db}");
    }

    let second = run();
    let err2 = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err2}");
    assert_eq!(
        created(&err2[err2.find("finished:").unwrap()..]),
        0,
        "{err2}"
    );

    // The store holds each created resource once.
    let sb = SandboxHandle::start(
        SandboxConfig {
            db: Some(state.path().join("sandbox.sqlite")),
            ..SandboxConfig::default()
        },
        "127.0.0.1:0",
    )
    .unwrap();
    let stats = sb.stats();
    assert_eq!(
        stats.resources("Patient") + stats.resources("Observation"),
        made
    );
}

#[test]
fn a_refused_login_ends_the_run_with_exit_3_before_any_data_is_sent() {
    let sb = start(SandboxConfig::default());
    let state = tempfile::tempdir().unwrap();
    let out = common::fhirlift()
        .arg("run")
        .arg(common::repo().join("samples/pipeline.toml"))
        .arg("--state")
        .arg(state.path())
        .args(["--no-progress", "--target", "custom", "--base-url"])
        .arg(sb.base_url())
        .arg("--token-url")
        .arg(sb.token_url())
        .env("FHIRLIFT_CLIENT_ID", "fhirlift-sandbox")
        .env("FHIRLIFT_CLIENT_SECRET", "a-wrong-secret")
        .env("FHIRLIFT_USERNAME", "sandbox-user")
        .env("FHIRLIFT_PASSWORD", "sandbox-password")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("refused the credentials"), "{err}");
    assert!(!err.contains("a-wrong-secret"), "{err}");
    assert_eq!(sb.stats().requests_total("crid"), 0);
}
