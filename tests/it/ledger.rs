//! Integration tests: the state ledger, the run lock across processes, and `fhirlift status`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use fhirlift::ledger::lock::{LOCK_FILE, current_holder};
use fhirlift::ledger::{Ledger, LockError, RunCounts, RunInfo, RunLock, RunMode, RunReport, Scope};
use fhirlift::sink::OutcomeStatus;

use super::common::{Reap, StandaloneSandbox as Sandbox, fhirlift};

const HOLDER_ENV: &str = "FHIRLIFT_TEST_LOCK_HOLDER_DIR";

/// Not a test on its own: the child process of `a_killed_holder_leaves_a_lock_the_next_run_takes`.
/// It takes the lock of the directory named in the environment, says so, and waits to be killed.
#[test]
#[ignore = "helper process for the lock tests"]
fn lock_holder_child() {
    let Ok(dir) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let _lock = RunLock::acquire(Path::new(&dir)).expect("child takes the lock");
    println!("locked {}", std::process::id());
    std::thread::sleep(std::time::Duration::from_secs(120));
}

fn spawn_holder(dir: &Path) -> (Reap, u32) {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "it::ledger::lock_holder_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HOLDER_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the lock holder");
    let stdout = child.stdout.take().expect("piped stdout");
    let child = Reap(child);
    let mut lines = BufReader::new(stdout).lines();
    let pid = loop {
        let line = lines
            .next()
            .expect("the holder says it locked")
            .expect("read the holder's output");
        // libtest prints its own "test … ... " prefix on the same line.
        if let Some((_, pid)) = line.split_once("locked ") {
            break pid.trim().parse::<u32>().expect("a pid");
        }
    };
    (child, pid)
}

#[test]
fn a_killed_holder_leaves_a_lock_the_next_run_takes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, pid) = spawn_holder(dir.path());
    assert_eq!(pid, child.0.id());

    // While it lives, a second run is refused, and told who holds the lock.
    let err = RunLock::acquire(dir.path()).expect_err("the lock is held");
    match &err {
        LockError::Held { holder, .. } => {
            assert_eq!(holder.as_ref().expect("holder named").pid, pid)
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert!(err.to_string().contains(&format!("pid {pid}")), "{err}");
    assert_eq!(
        current_holder(dir.path())
            .expect("read the lock")
            .expect("held")
            .pid,
        pid
    );

    // SIGKILL: no chance to clean up. The text stays; the lock does not.
    child.0.kill().expect("kill the holder");
    child.0.wait().expect("reap the holder");
    let text = std::fs::read_to_string(dir.path().join(LOCK_FILE)).expect("lock file");
    assert!(text.contains(&pid.to_string()), "stale text stays: {text}");
    assert!(
        current_holder(dir.path()).expect("read the lock").is_none(),
        "a dead holder is not shown as running"
    );
    let lock = RunLock::acquire(dir.path()).expect("the dead holder's lock is taken over");
    assert_eq!(lock.took_over().map(|h| h.pid), Some(pid));
    assert_eq!(lock.holder().pid, std::process::id());
}

fn write_config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, "[center]\nccn = \"12001\"\n\n[sources]\n").expect("write config");
    path
}

#[test]
fn status_shows_runs_rejects_and_unconfirmed_records() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let state = dir.path().join(".fhirlift");

    // Nothing yet: status works and says so, without creating a ledger.
    let out = fhirlift()
        .args(["status"])
        .arg(&config)
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("No runs recorded"));
    assert!(!state.join("ledger.sqlite").exists());

    let scope = Scope::new("http://127.0.0.1:8080/cibmtr", "12001");
    {
        let ledger = Ledger::open(&state).expect("open ledger");
        let info = RunInfo {
            scope: scope.clone(),
            mode: RunMode::Incremental,
            version: env!("CARGO_PKG_VERSION").into(),
            config_hash: "0123456789abcdef".into(),
        };
        let r1 = ledger.begin_run(&info).expect("begin");
        ledger
            .record_sent(&scope, "Patient", "P1", "h", "1", OutcomeStatus::Created)
            .expect("sent");
        ledger
            .record_reject(&scope, "Observation", "L7", "labs.csv:9", "HTTP 422: unit")
            .expect("reject");
        ledger
            .record_pending(&scope, "Observation", "L8", "h8")
            .expect("pending");
        let mut counts = RunCounts::default();
        counts.add(OutcomeStatus::Created);
        counts.add(OutcomeStatus::Rejected);
        ledger.end_run(r1, &counts, 1).expect("end");
        let record = ledger.run(r1).expect("read run").expect("run exists");
        RunReport::new(&record, &config, counts, 1, Vec::new())
            .write(&state)
            .expect("write report");
        // A second run that never ended: killed.
        ledger.begin_run(&info).expect("begin");
    }

    let out = fhirlift()
        .args(["status"])
        .arg(&config)
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("did not finish"), "{text}");
    assert!(text.contains("exit 1"), "{text}");
    assert!(
        text.contains("labs.csv:9 Observation L7: HTTP 422: unit"),
        "{text}"
    );
    assert!(text.contains("pending Observation L8"), "{text}");
    assert!(
        text.contains("1 confirmed, 1 pending, 0 unknown, 1 rejected"),
        "{text}"
    );

    let out = fhirlift()
        .args(["status", "--format", "json", "--state"])
        .arg(&state)
        .arg(&config)
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let runs = json["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["state"], "did-not-finish");
    assert_eq!(runs[1]["state"], "finished");
    assert_eq!(runs[1]["exit_code"], 1);
    assert_eq!(runs[1]["counts"]["created"], 1);
    assert!(
        runs[1]["report"]
            .as_str()
            .expect("report path")
            .ends_with(".json")
    );
    assert_eq!(json["targets"][0]["rejects"][0]["reason"], "HTTP 422: unit");
    assert_eq!(json["targets"][0]["pending"], 1);
    assert!(json["running"].is_null());
}

#[test]
fn status_names_the_running_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path());
    let state = dir.path().join(".fhirlift");
    let lock = RunLock::acquire(&state).expect("lock");
    let out = fhirlift()
        .args(["status", "--format", "json"])
        .arg(&config)
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(json["running"]["pid"], std::process::id());
    drop(lock);
}

// ---- nightly loads against a standalone sandbox ---------------------------------------------

/// Requests per interaction and status that happened between two stats snapshots, token
/// requests (authentication is not a FHIR or CRID request) and the stats requests themselves
/// left out.
fn requests_between(
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    let Some(after) = after["requests"].as_object() else {
        return out;
    };
    for (interaction, statuses) in after {
        if interaction == "token" || interaction == "stats" {
            continue;
        }
        for (status, n) in statuses.as_object().into_iter().flatten() {
            let was = before["requests"][interaction][status]
                .as_u64()
                .unwrap_or(0);
            let delta = n.as_u64().unwrap_or(0) - was;
            if delta > 0 {
                out.insert(format!("{interaction} {status}"), delta);
            }
        }
    }
    out
}

/// A synthetic registry: patients and their lab results, written as the CSV files the shipped
/// mapping pack reads.
#[derive(Clone)]
struct Registry {
    /// mrn → (birth date, sex)
    patients: Vec<(String, String, &'static str)>,
    /// (lab_id, mrn, test, value)
    labs: Vec<(String, String, &'static str, String)>,
}

const TESTS: &[(&str, &str)] = &[("HGB", "g/dL"), ("WBC", "K/uL"), ("PLT", "K/uL")];

impl Registry {
    fn generate(patients: usize, labs_per_patient: usize) -> Registry {
        let mut r = Registry {
            patients: Vec::new(),
            labs: Vec::new(),
        };
        for p in 0..patients {
            r.add_patient(p, labs_per_patient);
        }
        r
    }

    fn add_patient(&mut self, p: usize, labs: usize) {
        let mrn = format!("{p:06}");
        let birth = format!("19{:02}-{:02}-{:02}", 40 + p % 60, 1 + p % 12, 1 + p % 28);
        self.patients.push((
            mrn.clone(),
            birth,
            if p.is_multiple_of(2) { "F" } else { "M" },
        ));
        for j in 0..labs {
            self.add_lab(&mrn, j);
        }
    }

    fn add_lab(&mut self, mrn: &str, j: usize) {
        let (test, _) = TESTS[j % TESTS.len()];
        self.labs.push((
            format!("A{mrn}{j:03}"),
            mrn.to_string(),
            test,
            format!("{}.{}", 5 + j % 9, j % 10),
        ));
    }

    fn write(&self, dir: &Path) {
        let mut p = String::from("mrn,first_name,last_name,birth_date,sex,race,ethnicity,ssn\n");
        for (mrn, birth, sex) in &self.patients {
            p.push_str(&format!(
                "{mrn},Given{mrn},Family{mrn},{birth},{sex},W,N,\n"
            ));
        }
        std::fs::write(dir.join("patients.csv"), p).expect("write patients");
        let mut l = String::from(
            "lab_id,mrn,test_code,value,unit,collected_at,ref_low,ref_high,comparator\n",
        );
        for (id, mrn, test, value) in &self.labs {
            let unit = TESTS
                .iter()
                .find(|(t, _)| t == test)
                .map_or("", |(_, u)| *u);
            l.push_str(&format!(
                "{id},{mrn},{test},{value},{unit},2024-03-01 08:30:00,,,\n"
            ));
        }
        std::fs::write(dir.join("labs.csv"), l).expect("write labs");
    }
}

/// A pipeline config over the registry's files, sending to the sandbox as a custom target.
fn nightly_config(dir: &Path, sb: &Sandbox) -> std::path::PathBuf {
    let repo = super::common::repo();
    let config = format!(
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

[target]
kind = "custom"
base_url = {:?}
token_url = "{}/oauth2/token"
"#,
        repo.join("mappings/cibmtr-patient.toml")
            .display()
            .to_string(),
        repo.join("mappings/cibmtr-lab.toml").display().to_string(),
        sb.base_url,
        sb.base_url.trim_end_matches('/'),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// `fhirlift run CONFIG` with the sandbox's credentials in the environment.
fn run_cmd(config: &Path, extra: &[&str]) -> Command {
    let mut c = fhirlift();
    c.arg("run")
        .arg(config)
        .args(["--no-progress"])
        .args(extra)
        .env("FHIRLIFT_CLIENT_ID", "fhirlift-sandbox")
        .env("FHIRLIFT_CLIENT_SECRET", "sandbox-secret")
        .env("FHIRLIFT_USERNAME", "sandbox-user")
        .env("FHIRLIFT_PASSWORD", "sandbox-password")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run_ok(config: &Path, extra: &[&str]) -> std::process::Output {
    let o = run_cmd(config, extra).output().expect("run fhirlift");
    assert_eq!(
        o.status.code(),
        Some(0),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// The newest run report in the state directory.
fn last_report(state: &Path) -> serde_json::Value {
    let ledger = Ledger::open(state).expect("open ledger");
    let run = ledger.runs(1).expect("runs").pop().expect("a run");
    let path = RunReport::path_for(state, &run.uuid);
    serde_json::from_slice(&std::fs::read(&path).expect("run report")).expect("report JSON")
}

/// Rows settled by earlier runs (not rendered again), per mapping, from the last run's pipeline
/// report.
fn rows_settled(state: &Path) -> Vec<(String, u64)> {
    let ledger = Ledger::open(state).expect("open ledger");
    let run = ledger.runs(1).expect("runs").pop().expect("a run");
    let path = state
        .join("reports")
        .join(format!("run-{}", run.id.0))
        .join("report.json");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("pipeline report")).expect("JSON");
    report["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| {
            (
                m["mapping"].as_str().unwrap_or_default().to_string(),
                m["rows_settled"].as_u64().unwrap_or(u64::MAX),
            )
        })
        .collect()
}

fn map(pairs: &[(&str, u64)]) -> std::collections::BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

#[test]
fn nightly_loads_send_exactly_what_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sb = Sandbox::start(dir.path(), &[]);
    let config = nightly_config(dir.path(), &sb);
    let state = dir.path().join(".fhirlift");
    let mut reg = Registry::generate(200, 5);
    reg.write(dir.path());

    // Night 1: everything is new.
    let s0 = sb.stats();
    run_ok(&config, &[]);
    let s1 = sb.stats();
    assert_eq!(s1["resources"]["Patient"], 200);
    assert_eq!(s1["resources"]["Observation"], 1000);
    let first = requests_between(&s0, &s1);
    assert_eq!(first.get("create:Patient 201"), Some(&200), "{first:?}");
    assert_eq!(
        first.get("create:Observation 201"),
        Some(&1000),
        "{first:?}"
    );
    assert_eq!(first.get("crid 200"), Some(&200), "{first:?}");
    assert_eq!(
        rows_settled(&state),
        [("patients".to_string(), 0), ("labs".to_string(), 0)]
    );

    // Night 2: 1% of the labs change, 1% are added (on two new patients and on old ones), a
    // few disappear.
    for i in 0..10 {
        reg.labs[i * 97].3 = format!("{}.5", 20 + i);
    }
    reg.add_patient(900_001, 3);
    reg.add_patient(900_002, 3);
    for p in [5usize, 50, 150, 199] {
        let mrn = format!("{p:06}");
        reg.add_lab(&mrn, 10);
    }
    let removed: Vec<String> = [3usize, 333, 666]
        .iter()
        .map(|&i| reg.labs[i].0.clone())
        .collect();
    reg.labs.retain(|l| !removed.contains(&l.0));
    reg.write(dir.path());
    run_ok(&config, &[]);
    let s2 = sb.stats();
    assert_eq!(
        requests_between(&s1, &s2),
        map(&[
            ("crid 200", 2),
            ("create:Patient 201", 2),
            ("search:Observation 200", 4),
            ("create:Observation 201", 10),
            ("update:Observation 200", 10),
        ]),
        "night 2 sends exactly the changes"
    );
    let report = last_report(&state);
    assert_eq!(report["exit_code"], 0);
    assert_eq!(report["counts"]["created"], 12);
    assert_eq!(report["counts"]["updated"], 10);
    assert_eq!(report["counts"]["unchanged"], 200 + 1000 - 3 - 10);
    // The unchanged lab rows were not even rendered; patient rows always are.
    assert_eq!(
        rows_settled(&state),
        [
            ("patients".to_string(), 0),
            ("labs".to_string(), 1000 - 3 - 10)
        ]
    );
    let mut missing: Vec<String> = report["missing"]
        .as_array()
        .expect("missing list")
        .iter()
        .map(|m| m["record_key"].as_str().expect("key").to_string())
        .collect();
    missing.sort();
    assert_eq!(missing, removed, "records gone from the source are listed");

    // Night 3: nothing changed, nothing is sent.
    run_ok(&config, &[]);
    let s3 = sb.stats();
    assert_eq!(
        requests_between(&s2, &s3),
        map(&[]),
        "an unchanged night sends nothing"
    );
    assert_eq!(
        rows_settled(&state),
        [
            ("patients".to_string(), 0),
            ("labs".to_string(), 1000 - 3 + 6 + 4)
        ]
    );

    // --full re-checks everything against the server and finds nothing to change.
    run_ok(&config, &["--full"]);
    let s4 = sb.stats();
    let full = requests_between(&s3, &s4);
    assert!(
        !full
            .keys()
            .any(|k| k.starts_with("create:") || k.starts_with("update:")),
        "{full:?}"
    );
    assert_eq!(full.get("crid 200"), Some(&202), "{full:?}");
    assert_eq!(s4["resources"], s2["resources"]);
    assert_eq!(
        rows_settled(&state),
        [("patients".to_string(), 0), ("labs".to_string(), 0)],
        "--full renders every row"
    );

    // status tells the story.
    let out = fhirlift()
        .args(["status", "--format", "json"])
        .arg(&config)
        .output()
        .expect("status");
    assert!(out.status.success());
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let runs = status["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 4);
    assert!(
        runs.iter()
            .all(|r| r["exit_code"] == 0 && r["state"] == "finished")
    );
    assert_eq!(runs[0]["mode"], "full");
    assert_eq!(runs[1]["counts"]["created"], 0);
    assert_eq!(runs[1]["counts"]["updated"], 0);
}

#[test]
fn killed_runs_leave_no_duplicate_and_no_gap() {
    use rand::{Rng, SeedableRng};
    let seed: u64 = std::env::var("FHIRLIFT_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("kill test seed {seed} (FHIRLIFT_KILL_SEED to repeat)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let sb = Sandbox::start(dir.path(), &[]);
    let config = nightly_config(dir.path(), &sb);
    let reg = Registry::generate(300, 10);
    reg.write(dir.path());
    let stored = |sb: &Sandbox| {
        let s = sb.stats();
        s["resources"]["Patient"].as_u64().unwrap_or(0)
            + s["resources"]["Observation"].as_u64().unwrap_or(0)
    };

    // The first kill comes at a random moment of the start (reading, mapping, CRIDs); the
    // others once the server holds a random number more resources than before the run, so
    // every kill lands in the middle of sending.
    let mut kills = Vec::new();
    for round in 0..6 {
        let mut child = run_cmd(&config, &[])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a run");
        let before = stored(&sb);
        if round == 0 {
            std::thread::sleep(std::time::Duration::from_millis(rng.random_range(50..400)));
        } else {
            let target = before + rng.random_range(1..500);
            while stored(&sb) < target && child.try_wait().expect("poll the run").is_none() {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        if child.try_wait().expect("poll the run").is_none() {
            child.kill().expect("SIGKILL the run");
            kills.push(stored(&sb));
        }
        child.wait().expect("reap the run");
    }
    eprintln!("killed runs with the server holding {kills:?} resources");
    assert!(
        kills.len() >= 4,
        "most runs were killed mid-load: {kills:?}"
    );
    let last = run_cmd(&config, &[]).output().expect("final run");
    assert_eq!(
        last.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&last.stderr)
    );

    let patients = sb.dump(dir.path(), "Patient");
    let observations = sb.dump(dir.path(), "Observation");
    assert_eq!(patients.len(), 300, "each patient exactly once");
    assert_eq!(observations.len(), 3000, "each lab exactly once");
    let crids: std::collections::HashSet<&str> = patients
        .iter()
        .filter_map(|p| p["identifier"][0]["value"].as_str())
        .collect();
    assert_eq!(crids.len(), 300, "no two Patients share a CRID");
    let ids: std::collections::HashSet<&str> = observations
        .iter()
        .filter_map(|o| o["identifier"][0]["value"].as_str())
        .collect();
    let expected: std::collections::HashSet<&str> = reg.labs.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(ids, expected, "every lab is on the server, once");

    // And the ledger agrees: nothing left unconfirmed after the last run.
    let out = fhirlift()
        .args(["status", "--format", "json"])
        .arg(&config)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    assert_eq!(status["targets"][0]["pending"], 0);
    assert_eq!(status["targets"][0]["unknown"], 0);
    assert_eq!(status["targets"][0]["sent"], 3300);
}

/// Patients whose CRID request is ambiguous: `C` shares its SSN with `A` and its name with `B`
/// (same birth date and sex), so the service finds two different people and the loader rejects
/// `C` and its labs. `fixed` gives `C` a name of its own and no SSN, as a data manager would.
fn write_ambiguous_registry(dir: &Path, triples: usize, with_c: bool, fixed: bool) {
    let mut p = String::from("mrn,first_name,last_name,birth_date,sex,race,ethnicity,ssn\n");
    let mut l =
        String::from("lab_id,mrn,test_code,value,unit,collected_at,ref_low,ref_high,comparator\n");
    for i in 0..triples {
        let birth = format!("1960-01-{:02}", 1 + i % 28);
        let ssn = format!("555-{:02}-{:04}", i % 100, 1000 + i);
        let a = format!("A{i:05}");
        let b = format!("B{i:05}");
        let c = format!("C{i:05}");
        p.push_str(&format!("{a},Ann{i},Alpha{i},{birth},F,W,N,{ssn}\n"));
        p.push_str(&format!("{b},Bea{i},Beta{i},{birth},F,W,N,\n"));
        l.push_str(&format!("L{a}0,{a},HGB,12.5,g/dL,2024-03-01 08:30:00,,,\n"));
        l.push_str(&format!("L{b}0,{b},HGB,11.5,g/dL,2024-03-01 08:30:00,,,\n"));
        if with_c {
            if fixed {
                p.push_str(&format!("{c},Cat{i},Gamma{i},{birth},F,W,N,\n"));
            } else {
                p.push_str(&format!("{c},Bea{i},Beta{i},{birth},F,W,N,{ssn}\n"));
            }
            for j in 0..2 {
                l.push_str(&format!(
                    "L{c}{j},{c},WBC,{}.5,K/uL,2024-03-01 08:30:00,,,\n",
                    4 + j
                ));
            }
        }
    }
    std::fs::write(dir.join("patients.csv"), p).expect("write patients");
    std::fs::write(dir.join("labs.csv"), l).expect("write labs");
}

#[test]
fn max_rejects_stops_a_failing_run_and_retry_rejected_sends_only_the_fixed_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sb = Sandbox::start(dir.path(), &[]);
    let config = nightly_config(dir.path(), &sb);
    let state = dir.path().join(".fhirlift");

    write_ambiguous_registry(dir.path(), 30, false, false);
    run_ok(&config, &[]);
    let s1 = sb.stats();
    assert_eq!(s1["resources"]["Patient"], 60);

    // Every new patient is ambiguous: the guard stops the run long before all 30 are tried.
    write_ambiguous_registry(dir.path(), 30, true, false);
    let o = run_cmd(&config, &["--max-rejects", "5", "--concurrency", "2"])
        .output()
        .expect("run");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--max-rejects"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s2 = sb.stats();
    let crids = requests_between(&s1, &s2)
        .get("crid 200")
        .copied()
        .unwrap_or(0);
    assert!(
        (6..30).contains(&crids),
        "stopped after {crids} CRID requests"
    );
    let report = last_report(&state);
    assert!(
        report["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("max-rejects")),
        "{report}"
    );
    assert_eq!(s2["resources"], s1["resources"], "nothing was stored");

    // Without the guard every C patient and its labs are rejected, with the reason.
    let o = run_cmd(&config, &[]).output().expect("run");
    assert_eq!(o.status.code(), Some(1));
    let ledger = Ledger::open(&state).expect("ledger");
    let scope = ledger.scopes().expect("scopes").remove(0);
    let rejects = ledger.rejects(&scope).expect("rejects");
    assert_eq!(rejects.len(), 90, "30 patients and their 60 labs");
    assert!(
        rejects.iter().all(|r| r.record.record_key.contains('C')),
        "only the C patients' records"
    );
    drop(ledger);

    // The data manager fixes the rows; --retry-rejected sends exactly those.
    write_ambiguous_registry(dir.path(), 30, true, true);
    let s3 = sb.stats();
    run_ok(&config, &["--retry-rejected"]);
    let s4 = sb.stats();
    assert_eq!(
        requests_between(&s3, &s4),
        map(&[
            ("crid 200", 30),
            ("create:Patient 201", 30),
            ("create:Observation 201", 60),
        ]),
    );
    let ledger = Ledger::open(&state).expect("ledger");
    assert!(ledger.rejects(&scope).expect("rejects").is_empty());

    // And a normal run afterwards has nothing left to do.
    run_ok(&config, &[]);
    assert_eq!(requests_between(&s4, &sb.stats()), map(&[]));
}

#[test]
fn a_second_run_on_the_same_state_is_refused_with_exit_4() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sb = Sandbox::start(dir.path(), &[]);
    let config = nightly_config(dir.path(), &sb);
    Registry::generate(3, 1).write(dir.path());
    let state = dir.path().join(".fhirlift");
    let lock = RunLock::acquire(&state).expect("hold the lock");
    let before = sb.stats();
    let o = run_cmd(&config, &[]).output().expect("run");
    assert_eq!(o.status.code(), Some(4));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!("pid {}", std::process::id())),
        "{stderr}"
    );
    assert_eq!(
        requests_between(&before, &sb.stats()),
        map(&[]),
        "nothing sent"
    );
    drop(lock);
    run_ok(&config, &[]);
}

#[test]
fn sigterm_stops_gracefully_and_the_next_run_finishes_the_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sb = Sandbox::start(dir.path(), &["--latency-ms", "5"]);
    let config = nightly_config(dir.path(), &sb);
    let state = dir.path().join(".fhirlift");
    let reg = Registry::generate(100, 5);
    reg.write(dir.path());
    let mut child = run_cmd(&config, &[]).spawn().expect("start a run");
    let stored = || {
        let s = sb.stats();
        s["resources"]["Patient"].as_u64().unwrap_or(0)
            + s["resources"]["Observation"].as_u64().unwrap_or(0)
    };
    while stored() < 50 && child.try_wait().expect("poll").is_none() {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("send SIGTERM");
    assert!(status.success());
    let out = child.wait_with_output().expect("wait for the run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let report = last_report(&state);
    assert_eq!(report["exit_code"], 130);
    assert!(
        report["stopped"]
            .as_str()
            .is_some_and(|s| s.contains("signal")),
        "{report}"
    );
    let partial = stored();
    assert!(partial < 600, "stopped before the end ({partial} stored)");
    assert!(
        report["missing"].as_array().is_some_and(Vec::is_empty),
        "an interrupted run reports nothing missing"
    );

    run_ok(&config, &[]);
    let s = sb.stats();
    assert_eq!(s["resources"]["Patient"], 100);
    assert_eq!(s["resources"]["Observation"], 500);
    let status = fhirlift()
        .args(["status", "--format", "json"])
        .arg(&config)
        .output()
        .expect("status");
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("status JSON");
    assert_eq!(status["runs"][1]["exit_code"], 130);
    assert_eq!(status["targets"][0]["unknown"], 0);
    assert_eq!(status["targets"][0]["pending"], 0);
}
