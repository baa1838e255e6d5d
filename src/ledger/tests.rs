//! Unit tests for the ledger's API.

use super::*;

fn scope() -> Scope {
    Scope::new("http://127.0.0.1:9/cibmtr", "12001")
}

fn info(mode: RunMode) -> RunInfo {
    RunInfo {
        scope: scope(),
        mode,
        version: "0.1.0".into(),
        config_hash: "abc".into(),
    }
}

#[test]
fn a_record_is_unchanged_only_once_confirmed_with_the_same_hash() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let s = scope();
    assert!(l.known(&s, "Observation", "k1").unwrap().is_none());

    l.record_pending(&s, "Observation", "k1", "h1").unwrap();
    let k = l.known(&s, "Observation", "k1").unwrap().unwrap();
    assert_eq!(k.status, SubmissionStatus::Pending);
    assert!(!k.is_unchanged("h1"), "pending is not confirmed");
    assert_eq!(k.server_id, None);

    l.record_sent(&s, "Observation", "k1", "h1", "42", OutcomeStatus::Created)
        .unwrap();
    let k = l.known(&s, "Observation", "k1").unwrap().unwrap();
    assert!(k.is_unchanged("h1"));
    assert!(!k.is_unchanged("h2"));
    assert_eq!(k.last_outcome, Some(OutcomeStatus::Created));

    // A new attempt keeps the confirmed id and hash, but is no longer "unchanged".
    l.record_pending(&s, "Observation", "k1", "h2").unwrap();
    let k = l.known(&s, "Observation", "k1").unwrap().unwrap();
    assert_eq!(k.confirmed_server_id(), Some("42"));
    assert_eq!(k.content_hash.as_deref(), Some("h1"));
    assert!(!k.is_unchanged("h1"));

    l.record_unknown(&s, "Observation", "k1").unwrap();
    let un = l.unconfirmed(&s).unwrap();
    assert_eq!(un.len(), 1);
    assert_eq!(un[0].status, SubmissionStatus::Unknown);
    assert_eq!(un[0].server_id.as_deref(), Some("42"));

    // Scopes are separate.
    let other = Scope::new("https://elsewhere/v1", "12001");
    assert!(l.known(&other, "Observation", "k1").unwrap().is_none());
    assert!(l.known(&s, "Patient", "k1").unwrap().is_none());
}

#[test]
fn survives_reopen_and_keeps_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    {
        let l = Ledger::open(dir.path()).unwrap();
        l.record_sent(&scope(), "Patient", "p1", "h", "7", OutcomeStatus::Created)
            .unwrap();
        l.record_crid(&scope(), "p1", "1982897480019337", "dh")
            .unwrap();
    }
    let l = Ledger::open(dir.path()).unwrap();
    assert!(
        l.known(&scope(), "Patient", "p1")
            .unwrap()
            .unwrap()
            .is_unchanged("h")
    );
    let c = l.known_crid(&scope(), "p1").unwrap().unwrap();
    assert_eq!(c.crid, "1982897480019337");
    assert!(c.matches("dh"));
    assert!(!c.matches("other"));
    let conn = Connection::open(dir.path().join(LEDGER_FILE)).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, schema::CURRENT_VERSION);
    let mode: String = conn
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = Connection::open(dir.path().join(LEDGER_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let err = Ledger::open(dir.path()).unwrap_err();
    assert!(
        matches!(err, LedgerError::NewerSchema { found: 99, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn rejects_are_outstanding_until_sent() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let s = scope();
    let run = l.begin_run(&info(RunMode::Incremental)).unwrap();
    l.record_reject(&s, "Observation", "a", "labs.csv:3", "HTTP 422: bad unit")
        .unwrap();
    l.record_reject(&s, "Observation", "b", "labs.csv:4", "HTTP 422: bad code")
        .unwrap();
    let rejects = l.rejects(&s).unwrap();
    assert_eq!(rejects.len(), 2);
    assert_eq!(rejects[0].run_id, Some(run));
    assert_eq!(rejects[0].location, "labs.csv:3");
    assert_eq!(
        l.rejected_keys(&s).unwrap().into_iter().collect::<Vec<_>>(),
        vec![
            RecordRef::new("Observation", "a"),
            RecordRef::new("Observation", "b")
        ]
    );
    l.record_sent(&s, "Observation", "a", "h", "1", OutcomeStatus::Created)
        .unwrap();
    assert_eq!(
        l.rejected_keys(&s).unwrap().into_iter().collect::<Vec<_>>(),
        vec![RecordRef::new("Observation", "b")]
    );
    // Rejecting again replaces the reason.
    l.record_reject(&s, "Observation", "b", "labs.csv:4", "HTTP 422: still bad")
        .unwrap();
    assert_eq!(l.rejects(&s).unwrap()[0].reason, "HTTP 422: still bad");
}

#[test]
fn runs_are_recorded_with_counts_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let r1 = l.begin_run(&info(RunMode::Incremental)).unwrap();
    let mut counts = RunCounts::default();
    counts.add(OutcomeStatus::Created);
    counts.add(OutcomeStatus::Rejected);
    l.end_run(r1, &counts, 1).unwrap();
    let r2 = l.begin_run(&info(RunMode::Full)).unwrap();
    assert!(r2 > r1);

    let runs = l.runs(10).unwrap();
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].id, r2, "newest first");
    assert_eq!(runs[0].ended_at, None);
    assert_eq!(runs[0].mode, RunMode::Full);
    assert_eq!(runs[1].exit_code, Some(1));
    assert_eq!(runs[1].counts.as_ref().unwrap().created, 1);
    assert_eq!(runs[1].counts.as_ref().unwrap().rejected, 1);
    assert_eq!(runs[1].pid, std::process::id());
    assert_ne!(runs[0].uuid, runs[1].uuid);
    assert_eq!(l.last_finished_run(&scope()).unwrap().unwrap().id, r1);
    assert_eq!(l.scopes().unwrap(), vec![scope()]);
}

#[test]
fn missing_records_are_those_not_seen_by_a_later_run() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let s = scope();
    let r1 = l.begin_run(&info(RunMode::Incremental)).unwrap();
    for k in ["a", "b", "c"] {
        l.record_sent(&s, "Observation", k, "h", k, OutcomeStatus::Created)
            .unwrap();
    }
    l.mark_seen(
        &s,
        [
            ("Observation", "a"),
            ("Observation", "b"),
            ("Observation", "c"),
        ],
    )
    .unwrap();
    assert!(l.missing_since(&s, r1).unwrap().is_empty());

    let r2 = l.begin_run(&info(RunMode::Incremental)).unwrap();
    // "b" is unchanged (seen, no request); "c" disappeared; "d" is new.
    l.record_sent(&s, "Observation", "d", "h", "d", OutcomeStatus::Created)
        .unwrap();
    l.mark_seen(
        &s,
        [
            ("Observation", "a"),
            ("Observation", "b"),
            ("Observation", "d"),
        ],
    )
    .unwrap();
    assert_eq!(
        l.missing_since(&s, r2).unwrap(),
        vec![RecordRef::new("Observation", "c")]
    );
}

#[test]
fn shared_between_threads() {
    let dir = tempfile::tempdir().unwrap();
    let l = std::sync::Arc::new(Ledger::open(dir.path()).unwrap());
    let handles: Vec<_> = (0..4)
        .map(|t| {
            let l = l.clone();
            std::thread::spawn(move || {
                for i in 0..50 {
                    let key = format!("{t}-{i}");
                    l.record_pending(&scope(), "Observation", &key, "h")
                        .unwrap();
                    l.record_sent(
                        &scope(),
                        "Observation",
                        &key,
                        "h",
                        &key,
                        OutcomeStatus::Created,
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let all = l.known_all(&scope()).unwrap();
    assert_eq!(all.len(), 200);
    assert!(all.values().all(|k| k.is_unchanged("h")));
    assert!(l.unconfirmed(&scope()).unwrap().is_empty());
}

#[test]
fn a_second_process_sees_committed_records() {
    // Two handles on one file stand for a run and a concurrent `status`.
    let dir = tempfile::tempdir().unwrap();
    let writer = Ledger::open(dir.path()).unwrap();
    let reader = Ledger::open(dir.path()).unwrap();
    writer
        .record_sent(&scope(), "Patient", "p", "h", "1", OutcomeStatus::Created)
        .unwrap();
    assert!(reader.known(&scope(), "Patient", "p").unwrap().is_some());
}
