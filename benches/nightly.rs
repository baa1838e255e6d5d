//! Nightly re-run benchmark: a first load of a synthetic registry, then the same run again with
//! nothing changed, then once more with 1% of the lab rows changed. Every run is the real
//! `fhirlift run` binary, timed from start to exit. Two targets: the embedded sandbox (no network
//! latency: the hardest case for the ratio), and a standalone `fhirlift sandbox` on 127.0.0.1
//! adding 20 ms per request, closer to a real service.
//!
//! Run: `cargo bench --bench nightly` (50,000 resources: 2,000 patients × 24 labs + the patients).
//! `FHIRLIFT_BENCH_PATIENTS`, `FHIRLIFT_BENCH_LABS` change the size; `FHIRLIFT_BENCH_LATENCY_MS`
//! the standalone sandbox's latency (0 skips that part).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const TESTS: &[(&str, &str)] = &[("HGB", "g/dL"), ("WBC", "K/uL"), ("PLT", "K/uL")];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Writes the registry; `changed_every` > 0 alters every n-th lab value.
fn write_registry(dir: &Path, patients: usize, labs: usize, changed_every: usize) {
    let mut p = String::from("mrn,first_name,last_name,birth_date,sex,race,ethnicity,ssn\n");
    let mut l =
        String::from("lab_id,mrn,test_code,value,unit,collected_at,ref_low,ref_high,comparator\n");
    let mut n = 0usize;
    for i in 0..patients {
        let mrn = format!("{i:06}");
        p.push_str(&format!(
            "{mrn},Given{mrn},Family{mrn},19{:02}-{:02}-{:02},{},W,N,\n",
            40 + i % 60,
            1 + i % 12,
            1 + i % 28,
            if i.is_multiple_of(2) { "F" } else { "M" }
        ));
        for j in 0..labs {
            let (test, unit) = TESTS[j % TESTS.len()];
            let changed = changed_every > 0 && n.is_multiple_of(changed_every);
            let value = if changed {
                format!("{}.25", 30 + j % 9)
            } else {
                format!("{}.{}", 5 + j % 9, j % 10)
            };
            l.push_str(&format!(
                "A{mrn}{j:03},{mrn},{test},{value},{unit},2024-03-01 08:30:00,,,\n"
            ));
            n += 1;
        }
    }
    std::fs::write(dir.join("patients.csv"), p).expect("write patients");
    std::fs::write(dir.join("labs.csv"), l).expect("write labs");
}

fn write_config(dir: &Path, base_url: Option<&str>) -> std::path::PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"mappings = [{:?}, {:?}]

[center]
ccn = "12001"

[defaults]
timezone = "America/Chicago"

[sources.patients]
path = "patients.csv"

[sources.labs]
path = "labs.csv"
[sources.labs.columns]
value = {{ type = "decimal" }}
ref_low = {{ type = "decimal" }}
ref_high = {{ type = "decimal" }}
collected_at = {{ type = "datetime" }}
{}"#,
        repo.join("mappings/cibmtr-patient.toml")
            .display()
            .to_string(),
        repo.join("mappings/cibmtr-lab.toml").display().to_string(),
        match base_url {
            Some(b) => format!(
                "\n[target]\nkind = \"custom\"\nbase_url = {b:?}\ntoken_url = \"{b}/oauth2/token\"\n"
            ),
            None => String::new(),
        }
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `fhirlift run` once; returns its wall time and the run report's counts.
fn timed_run(config: &Path) -> (Duration, serde_json::Value) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_fhirlift"))
        .arg("run")
        .arg(config)
        .arg("--no-progress")
        .env("FHIRLIFT_CLIENT_ID", "fhirlift-sandbox")
        .env("FHIRLIFT_CLIENT_SECRET", "sandbox-secret")
        .env("FHIRLIFT_USERNAME", "sandbox-user")
        .env("FHIRLIFT_PASSWORD", "sandbox-password")
        .output()
        .expect("run fhirlift");
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    // The last line names the run report.
    let report = stderr
        .lines()
        .rev()
        .find_map(|l| l.split("report ").nth(1))
        .and_then(|r| r.split(';').next())
        .expect("the run names its report");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.trim()).expect("read report"))
            .expect("report JSON");
    (elapsed, report["counts"].clone())
}

/// A standalone sandbox on 127.0.0.1 with added latency; killed on drop.
struct Standalone(std::process::Child, String);

impl Standalone {
    fn start(dir: &Path, latency_ms: usize) -> Standalone {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_fhirlift"))
            .args(["sandbox", "--addr", "127.0.0.1:0", "--latency-ms"])
            .arg(latency_ms.to_string())
            .arg("--db")
            .arg(dir.join("standalone.sqlite"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start the sandbox");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = std::io::BufReader::new(stdout).lines();
        let base = loop {
            let line = lines.next().expect("base URL line").expect("read");
            if let Some(u) = line.trim().strip_prefix("base URL:") {
                break u.trim().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Standalone(child, base)
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn scenario(label: &str, patients: usize, labs: usize, latency_ms: Option<usize>) {
    let total = patients * (labs + 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let standalone = latency_ms.map(|ms| Standalone::start(dir.path(), ms));
    let config = write_config(dir.path(), standalone.as_ref().map(|s| s.1.as_str()));
    write_registry(dir.path(), patients, labs, 0);

    let (first, c1) = timed_run(&config);
    assert_eq!(c1["created"].as_u64(), Some(total as u64), "{c1}");
    let (again, c2) = timed_run(&config);
    assert_eq!(c2["unchanged"].as_u64(), Some(total as u64), "{c2}");
    write_registry(dir.path(), patients, labs, 100);
    let (changed, c3) = timed_run(&config);

    let pct = |d: Duration| 100.0 * d.as_secs_f64() / first.as_secs_f64();
    println!(
        "{label}: {patients} patients, {} labs, {total} resources",
        patients * labs
    );
    println!(
        "  first load            {:>8.2} s  ({:.0} resources/s)",
        first.as_secs_f64(),
        total as f64 / first.as_secs_f64()
    );
    println!(
        "  no-change re-run      {:>8.2} s  ({:.1}% of the first load)",
        again.as_secs_f64(),
        pct(again)
    );
    println!(
        "  1% of labs changed    {:>8.2} s  ({:.1}% of the first load; {} updated, {} unchanged)",
        changed.as_secs_f64(),
        pct(changed),
        c3["updated"],
        c3["unchanged"]
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let patients = env_usize("FHIRLIFT_BENCH_PATIENTS", 2000);
    let labs = env_usize("FHIRLIFT_BENCH_LABS", 24);
    let latency = env_usize("FHIRLIFT_BENCH_LATENCY_MS", 20);
    scenario("embedded sandbox", patients, labs, None);
    if latency > 0 {
        scenario(
            &format!("standalone sandbox, {latency} ms per request"),
            patients,
            labs,
            Some(latency),
        );
    }
}
