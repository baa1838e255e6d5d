//! Integration tests: the state ledger, the run lock across processes, and `fhirlift status`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use fhirlift::ledger::lock::{LOCK_FILE, current_holder};
use fhirlift::ledger::{Ledger, LockError, RunCounts, RunInfo, RunLock, RunMode, RunReport, Scope};
use fhirlift::sink::OutcomeStatus;

use super::common::fhirlift;

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

/// Kills the helper process if a test fails before it does.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
