//! Sandbox throughput: simple creates per second over loopback HTTP, no faults, at a few client
//! concurrency levels, with the store in memory and in a WAL file.
//!
//! Run: `cargo bench --bench sandbox` (optionally `-- N` for the creates per level, default 4000).
//! The client runs in this process too, so both share the machine's cores, as they do when the
//! loader is measured against the embedded sandbox.
#![allow(clippy::unwrap_used, reason = "a benchmark fails loudly")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use fhirlift::sandbox::{SandboxConfig, SandboxHandle};
use serde_json::{Value, json};

const SEC: &str = "http://cibmtr.org/codesystem/transplant-center";

fn patient(i: usize) -> String {
    json!({
        "resourceType": "Patient",
        "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
        "text": {"status": "empty"},
        "identifier": [{"use": "official", "system": "http://cibmtr.org/identifier/CRID", "value": i.to_string()}],
        "gender": "female",
        "birthDate": "1975-04-09",
    })
    .to_string()
}

fn observation(i: usize, patient_ref: &str) -> String {
    json!({
        "resourceType": "Observation",
        "meta": {"security": [{"system": SEC, "code": "rc_12001"}]},
        "identifier": [{"system": "urn:fhirlift:bench", "value": i.to_string()}],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": "2024-01-02T10:00:00-05:00",
        "valueQuantity": {"value": 12.5, "unit": "g/dL", "system": "http://unitsofmeasure.org", "code": "g/dL"},
    })
    .to_string()
}

async fn token(c: &reqwest::Client, sb: &SandboxHandle) -> String {
    let v: Value = c
        .post(sb.token_url())
        .basic_auth("fhirlift-sandbox", Some("sandbox-secret"))
        .form(&[
            ("grant_type", "password"),
            ("username", "sandbox-user"),
            ("password", "sandbox-password"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["access_token"].as_str().unwrap().to_string()
}

/// CPU seconds this process (server and client) has used so far, from `/proc/self/stat`
/// (Linux; clock ticks of 1/100 s). `None` elsewhere.
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Sends `n` creates from `workers` concurrent clients; returns creates per second.
async fn run_level(
    c: &reqwest::Client,
    sb: &SandboxHandle,
    tok: &str,
    kind: &'static str,
    subject: &str,
    workers: usize,
    n: usize,
) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}/r4/{kind}", sb.base_url());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (c, tok, url, next, subject) = (
            c.clone(),
            tok.to_string(),
            url.clone(),
            next.clone(),
            subject.to_string(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let body = if kind == "Patient" {
                    patient(i)
                } else {
                    observation(i, &subject)
                };
                let r = c
                    .post(&url)
                    .bearer_auth(&tok)
                    .header("Content-Type", "application/fhir+json")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 201);
                r.bytes().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(4000);
    let dir = std::env::temp_dir().join(format!("fhirlift-sandbox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("sandbox bench: {n} creates per level, loopback HTTP/1.1 keep-alive, no faults");
    // Wall-clock rates depend on what else runs on the machine; creates per CPU-second (client
    // and server together) do not, as long as the process gets CPU at all.
    println!(
        "{:<8} {:<12} {:>7} {:>12} {:>18}",
        "store", "type", "clients", "creates/s", "creates/CPU-second"
    );
    for (store, db) in [("memory", None), ("wal-file", Some(dir.join("bench.db")))] {
        let sb = SandboxHandle::start(
            SandboxConfig {
                db: db.clone(),
                ..SandboxConfig::default()
            },
            "127.0.0.1:0",
        )
        .unwrap();
        rt.block_on(async {
            let c = reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .unwrap();
            let tok = token(&c, &sb).await;
            // Warm-up, and the Patient the Observations refer to.
            run_level(&c, &sb, &tok, "Patient", "", 4, 200).await;
            let subject = "Patient/1";
            for kind in ["Patient", "Observation"] {
                for workers in [1, 4, 16, 64] {
                    let cpu_before = cpu_seconds();
                    let rate = run_level(&c, &sb, &tok, kind, subject, workers, n).await;
                    let per_cpu = match (cpu_before, cpu_seconds()) {
                        (Some(a), Some(b)) if b > a => format!("{:.0}", n as f64 / (b - a)),
                        _ => "-".to_string(),
                    };
                    println!("{store:<8} {kind:<12} {workers:>7} {rate:>12.0} {per_cpu:>18}");
                }
            }
        });
        sb.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
