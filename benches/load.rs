//! Loader benchmark: synthetic patients and lab Observations into the sandbox (in memory) with
//! added latency per request, at several concurrencies, with single requests and with
//! transaction Bundles. Prints resources/s and, for single requests, the share of the ideal
//! (concurrency ÷ latency requests per second).
//!
//! `cargo bench --bench load -- [--patients N] [--per-patient M] [--latency-ms L] [--runs C:B,…]`
//! where each run is `concurrency:bundle size` (bundle size 0 = single requests).

use std::time::{Duration, Instant};

use fhirlift::config::{FhirUris, GrantType, TargetKind};
use fhirlift::sandbox::{Faults, SandboxConfig, SandboxHandle};
use fhirlift::sink::Sink;
use fhirlift::sink::load::credentials::{Credentials, Secret};
use fhirlift::sink::load::synthetic;
use fhirlift::sink::load::target::Endpoints;
use fhirlift::sink::load::{Auth, Loader, LoaderConfig};

struct Args {
    patients: usize,
    per_patient: usize,
    latency_ms: u64,
    runs: Vec<(usize, usize)>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        patients: 2000,
        per_patient: 25,
        latency_ms: 20,
        runs: vec![(1, 0), (8, 0), (32, 0), (1, 50), (8, 50), (32, 50)],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--patients" => a.patients = value()?.parse().map_err(|e| format!("{e}"))?,
            "--per-patient" => a.per_patient = value()?.parse().map_err(|e| format!("{e}"))?,
            "--latency-ms" => a.latency_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            "--runs" => {
                a.runs = value()?
                    .split(',')
                    .map(|r| {
                        let (c, b) = r.split_once(':').ok_or(format!("bad run {r:?}"))?;
                        Ok((
                            c.parse().map_err(|e| format!("{e}"))?,
                            b.parse().map_err(|e| format!("{e}"))?,
                        ))
                    })
                    .collect::<Result<_, String>>()?
            }
            // `cargo bench` passes `--bench`; ignore it and anything else libtest would take.
            _ => {}
        }
    }
    Ok(a)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let uris = FhirUris::default();
    let (patients, resources) =
        synthetic::generate(args.patients, args.per_patient, "12001", &uris);
    let total = patients.len() + resources.len();
    println!(
        "{} patients, {} Observations ({} resources), {} ms added latency per request",
        patients.len(),
        resources.len(),
        total,
        args.latency_ms
    );
    println!(
        "{:>11} {:>7} {:>9} {:>9} {:>12} {:>12} {:>9}",
        "concurrency", "bundle", "seconds", "requests", "resources/s", "ideal/s", "of ideal"
    );
    for &(concurrency, bundle) in &args.runs {
        let sb = SandboxHandle::start(
            SandboxConfig {
                faults: Faults {
                    latency_ms: args.latency_ms,
                    ..Faults::default()
                },
                ..SandboxConfig::default()
            },
            "127.0.0.1:0",
        )
        .expect("sandbox starts");
        let base = url::Url::parse(&sb.base_url()).expect("url");
        let token = url::Url::parse(&sb.token_url()).expect("url");
        let mut config = LoaderConfig::new(
            Endpoints::cibmtr(TargetKind::Custom, &base, Some(token)),
            Auth::OAuth {
                grant: GrantType::Password,
                credentials: Credentials {
                    client_id: Secret::new("fhirlift-sandbox"),
                    client_secret: Secret::new("sandbox-secret"),
                    username: Some(Secret::new("sandbox-user")),
                    password: Some(Secret::new("sandbox-password")),
                },
                scope: None,
            },
            "12001",
        );
        config.concurrency = concurrency;
        config.bundle_size = bundle;
        let mut loader = Loader::new(config, None, None).expect("loader");
        let summary = loader.summary_handle();
        loader.patients(patients.clone()).expect("patients");
        loader.resources(resources.clone()).expect("resources");
        let started = Instant::now();
        let outcomes = Box::new(loader).finish().expect("load");
        let secs = started.elapsed().as_secs_f64();
        let s = summary
            .lock()
            .ok()
            .and_then(|s| s.clone())
            .expect("summary");
        assert_eq!(s.created as usize, total, "every resource created once");
        assert_eq!(outcomes.len(), total);
        let rate = total as f64 / secs;
        let ideal = concurrency as f64 / Duration::from_millis(args.latency_ms).as_secs_f64();
        println!(
            "{:>11} {:>7} {:>9.1} {:>9} {:>12.0} {:>12.0} {:>8.0}%",
            concurrency,
            if bundle > 1 {
                bundle.to_string()
            } else {
                "single".into()
            },
            secs,
            s.requests,
            rate,
            ideal,
            100.0 * rate / ideal
        );
        sb.shutdown();
    }
}
