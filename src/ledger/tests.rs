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

mod session {
    use super::*;
    use crate::cli::Outcome;
    use crate::resource::BusinessIdentifier;
    use crate::sink::RowOutcome;
    use crate::source::RowLocation;

    fn config(dir: &Path) -> crate::config::PipelineConfig {
        let p = dir.join("pipeline.toml");
        std::fs::write(&p, "[center]\nccn = \"12001\"\n[sources]\n").unwrap();
        crate::config::PipelineConfig::load(&p).unwrap()
    }

    fn outcome(row: u64, key: &str, status: OutcomeStatus) -> RowOutcome {
        RowOutcome {
            location: RowLocation {
                file: "labs.csv".into(),
                sheet: None,
                row,
            },
            resource_type: "Observation".into(),
            identifier: Some(BusinessIdentifier {
                system: "urn:lab".into(),
                value: key.into(),
            }),
            status,
            server_id: None,
            http_status: Some(422),
            attempts: 1,
            message: Some("HTTP 422: bad unit".into()),
        }
    }

    #[test]
    fn a_session_locks_records_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let state = cfg.state_dir();
        // "gone" was confirmed before this run and is no longer in the source.
        Ledger::open(&state)
            .unwrap()
            .record_sent(
                &scope(),
                "Observation",
                "gone",
                "h",
                "2",
                OutcomeStatus::Created,
            )
            .unwrap();
        let s = RunSession::start(&cfg, &state, scope(), SessionOptions::default()).unwrap();
        let again = RunSession::start(&cfg, &state, scope(), SessionOptions::default())
            .expect_err("a second run is refused");
        assert_eq!(again.outcome(), Outcome::Locked);
        assert!(
            again.to_string().contains("another fhirlift run"),
            "{again}"
        );

        s.ledger()
            .record_sent(
                &scope(),
                "Observation",
                "ok",
                "h",
                "1",
                OutcomeStatus::Created,
            )
            .unwrap();
        let end = RunEnd {
            outcomes: vec![
                outcome(2, "ok", OutcomeStatus::Created),
                outcome(3, "bad", OutcomeStatus::Rejected),
            ],
            seen: Some(vec![
                RecordRef::new("Observation", "ok"),
                RecordRef::new("Observation", "bad"),
            ]),
            ..RunEnd::default()
        };
        let f = s.finish(end).unwrap();
        assert_eq!(f.outcome, Outcome::RowsRejected);
        assert_eq!(f.counts.created, 1);
        assert_eq!(f.counts.rejected, 1);
        assert_eq!(f.missing, vec![RecordRef::new("Observation", "gone")]);
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&f.report).unwrap()).unwrap();
        assert_eq!(report["exit_code"], 1);
        assert_eq!(report["missing"][0]["record_key"], "gone");
        assert_eq!(report["outcomes"][1]["location"], "labs.csv:3");

        // The lock is released; the reject is outstanding for --retry-rejected.
        let s2 = RunSession::start(
            &cfg,
            &state,
            scope(),
            SessionOptions {
                mode: RunMode::RetryRejected,
                ..SessionOptions::default()
            },
        )
        .unwrap();
        assert_eq!(
            s2.rejected_keys().unwrap().into_iter().collect::<Vec<_>>(),
            vec![RecordRef::new("Observation", "bad")]
        );
        let runs = s2.ledger().runs(5).unwrap();
        assert_eq!(runs[1].exit_code, Some(1));
    }

    #[test]
    fn stop_reasons_decide_the_exit_code() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let state = cfg.state_dir();
        let opts = SessionOptions {
            max_rejects: Some(1),
            ..SessionOptions::default()
        };
        let s = RunSession::start(&cfg, &state, scope(), opts.clone()).unwrap();
        s.reject_guard().note_reject();
        s.reject_guard().note_reject();
        assert!(s.stop().is_stopped());
        let f = s.finish(RunEnd::default()).unwrap();
        assert_eq!(f.outcome, Outcome::RowsRejected);
        assert!(f.stopped.unwrap().contains("max-rejects"));

        let s = RunSession::start(&cfg, &state, scope(), opts.clone()).unwrap();
        s.stop().trigger();
        let f = s
            .finish(RunEnd {
                outcomes: vec![RowOutcome {
                    attempts: 1,
                    ..outcome(2, "x", OutcomeStatus::Unknown)
                }],
                seen: Some(Vec::new()),
                ..RunEnd::default()
            })
            .unwrap();
        assert_eq!(f.outcome, Outcome::Interrupted);
        assert!(
            f.missing.is_empty(),
            "an interrupted run reports nothing missing"
        );
        let ledger = Ledger::open(&state).unwrap();
        assert_eq!(ledger.unconfirmed(&scope()).unwrap().len(), 1);

        let s = RunSession::start(&cfg, &state, scope(), opts).unwrap();
        let f = s
            .finish(RunEnd {
                fatal: Some("authentication: 401".into()),
                ..RunEnd::default()
            })
            .unwrap();
        assert_eq!(f.outcome, Outcome::TargetError);
    }
}

#[test]
fn full_runs_forget_what_is_known_but_still_record() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let s = scope();
    l.record_sent(&s, "Patient", "p", "h", "1", OutcomeStatus::Created)
        .unwrap();
    l.record_crid(&s, "p", "123", "dh").unwrap();
    l.set_forget_known(true);
    assert!(l.known(&s, "Patient", "p").unwrap().is_none());
    assert!(l.known_crid(&s, "p").unwrap().is_none());
    assert!(l.known_all(&s).unwrap().is_empty());
    l.record_sent(&s, "Patient", "q", "h", "2", OutcomeStatus::Created)
        .unwrap();
    l.set_forget_known(false);
    assert!(l.known(&s, "Patient", "q").unwrap().is_some());
    assert!(l.known_crid(&s, "p").unwrap().is_some());
}

#[test]
fn recorded_rejects_count_against_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let l = Ledger::open(dir.path()).unwrap();
    let stop = StopSignal::new();
    l.set_reject_guard(Some(std::sync::Arc::new(RejectGuard::new(
        Some(2),
        stop.clone(),
    ))));
    for k in ["a", "b"] {
        l.record_reject(&scope(), "Observation", k, "x.csv:2", "no")
            .unwrap();
    }
    assert!(!stop.is_stopped());
    l.record_reject(&scope(), "Observation", "c", "x.csv:3", "no")
        .unwrap();
    assert_eq!(stop.reason(), Some(StopReason::TooManyRejects));
}

mod wrapped_sink {
    use super::*;
    use crate::resource::{BusinessIdentifier, MappedPatient, MappedResource};
    use crate::sink::{RowOutcome, Sink, SinkError};
    use crate::source::RowLocation;
    use std::sync::{Arc, Mutex};

    /// A sink that writes down what reached it, as a file sink would.
    struct Recording(Arc<Mutex<Vec<String>>>);

    impl Sink for Recording {
        fn patients(&mut self, batch: Vec<MappedPatient>) -> Result<Vec<RowOutcome>, SinkError> {
            let mut seen = self.0.lock().unwrap();
            Ok(batch
                .into_iter()
                .map(|p| {
                    seen.push(format!("Patient {}", p.resource.identifier.value));
                    RowOutcome::written(&p.resource)
                })
                .collect())
        }
        fn resources(&mut self, batch: Vec<MappedResource>) -> Result<Vec<RowOutcome>, SinkError> {
            let mut seen = self.0.lock().unwrap();
            Ok(batch
                .into_iter()
                .map(|r| {
                    seen.push(format!("{} {}", r.resource_type, r.identifier.value));
                    RowOutcome::written(&r)
                })
                .collect())
        }
        fn finish(self: Box<Self>) -> Result<Vec<RowOutcome>, SinkError> {
            Ok(Vec::new())
        }
    }

    fn resource(rt: &str, patient: &str, key: &str, row: u64) -> MappedResource {
        MappedResource {
            location: RowLocation {
                file: "f.csv".into(),
                sheet: None,
                row,
            },
            mapping: "m".into(),
            resource_type: rt.into(),
            patient_key: patient.into(),
            identifier: BusinessIdentifier {
                system: "urn:x".into(),
                value: key.into(),
            },
            body: crate::resource::Body::from_value(&serde_json::json!({"resourceType": rt})),
        }
    }

    fn patient(key: &str, row: u64) -> MappedPatient {
        MappedPatient {
            resource: resource("Patient", key, key, row),
            crid_demographics: None,
            known_crid: None,
        }
    }

    fn feed(sink: &mut Box<dyn Sink>) {
        sink.patients(vec![patient("P1", 2), patient("P2", 3), patient("P3", 4)])
            .unwrap();
        sink.resources(vec![
            resource("Observation", "P1", "O1", 2),
            resource("Observation", "P2", "O2", 3),
            resource("Observation", "P2", "O3", 4),
        ])
        .unwrap();
    }

    fn cfg(dir: &Path) -> crate::config::PipelineConfig {
        let p = dir.join("pipeline.toml");
        std::fs::write(&p, "[center]\nccn = \"12001\"\n[sources]\n").unwrap();
        crate::config::PipelineConfig::load(&p).unwrap()
    }

    #[test]
    fn retry_rejected_passes_only_rejected_records_and_their_patients() {
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(dir.path());
        let state = config.state_dir();
        {
            let l = Ledger::open(&state).unwrap();
            l.record_reject(&scope(), "Observation", "O3", "f.csv:4", "bad")
                .unwrap();
            l.record_reject(&scope(), "Patient", "P3", "f.csv:4", "ambiguous CRID")
                .unwrap();
        }
        let session = RunSession::start(
            &config,
            &state,
            scope(),
            SessionOptions {
                mode: RunMode::RetryRejected,
                ..SessionOptions::default()
            },
        )
        .unwrap();
        let reached = Arc::new(Mutex::new(Vec::new()));
        let mut sink = session.wrap(Box::new(Recording(reached.clone()))).unwrap();
        feed(&mut sink);
        sink.finish().unwrap();
        assert_eq!(
            *reached.lock().unwrap(),
            vec!["Patient P2", "Patient P3", "Observation O3"]
        );
        let f = session.finish(RunEnd::default()).unwrap();
        assert_eq!(f.counts.resources, 3);
        assert!(f.missing.is_empty(), "a retry run reports nothing missing");
    }

    #[test]
    fn an_incremental_run_sees_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(dir.path());
        let state = config.state_dir();
        {
            let l = Ledger::open(&state).unwrap();
            l.record_sent(
                &scope(),
                "Observation",
                "O9",
                "h",
                "9",
                OutcomeStatus::Created,
            )
            .unwrap();
            l.record_sent(
                &scope(),
                "Observation",
                "O1",
                "h",
                "1",
                OutcomeStatus::Created,
            )
            .unwrap();
        }
        let session =
            RunSession::start(&config, &state, scope(), SessionOptions::default()).unwrap();
        let reached = Arc::new(Mutex::new(Vec::new()));
        let mut sink = session.wrap(Box::new(Recording(reached.clone()))).unwrap();
        feed(&mut sink);
        sink.finish().unwrap();
        assert_eq!(reached.lock().unwrap().len(), 6);
        let f = session.finish(RunEnd::default()).unwrap();
        assert_eq!(f.counts.resources, 6);
        assert_eq!(f.missing, vec![RecordRef::new("Observation", "O9")]);
    }

    #[test]
    fn a_stop_during_reading_ends_the_run_before_anything_is_sent() {
        let dir = tempfile::tempdir().unwrap();
        let config = cfg(dir.path());
        let state = config.state_dir();
        let session =
            RunSession::start(&config, &state, scope(), SessionOptions::default()).unwrap();
        let reached = Arc::new(Mutex::new(Vec::new()));
        let mut sink = session.wrap(Box::new(Recording(reached.clone()))).unwrap();
        session.stop().trigger();
        assert!(matches!(
            sink.patients(vec![patient("P1", 2)]),
            Err(SinkError::Interrupted)
        ));
        assert!(reached.lock().unwrap().is_empty());
        let f = session.finish(RunEnd::default()).unwrap();
        assert_eq!(f.outcome, crate::cli::Outcome::Interrupted);
    }
}

#[test]
fn a_row_is_settled_only_when_the_server_confirmed_what_it_rendered() {
    use crate::pipeline::{KnownRows, RenderedRecord};
    let dir = tempfile::tempdir().unwrap();
    let l = std::sync::Arc::new(Ledger::open(dir.path()).unwrap());
    let s = scope();
    let rendered = |key: &str, source: &str, content: &str| RenderedRecord {
        record: RecordRef::new("Observation", key),
        source_hash: source.into(),
        content_hash: content.into(),
    };
    l.record_sources(
        &s,
        &[
            rendered("k1", "row1", "c1"),
            rendered("k2", "row2", "c2"),
            rendered("k3", "row3", "c3"),
        ],
    )
    .unwrap();
    // k1 confirmed with what its row rendered; k2 confirmed with other content (an older
    // version); k3 only attempted.
    l.record_sent(&s, "Observation", "k1", "c1", "41", OutcomeStatus::Created)
        .unwrap();
    l.record_sent(&s, "Observation", "k2", "old", "42", OutcomeStatus::Created)
        .unwrap();
    l.record_pending(&s, "Observation", "k3", "c3").unwrap();

    let rows = SourceRows::load(l.clone(), s.clone()).unwrap();
    let k = |key: &str| vec![RecordRef::new("Observation", key)];
    assert_eq!(
        rows.unchanged(&k("k1"), "row1"),
        Some(vec!["41".to_string()])
    );
    assert_eq!(rows.unchanged(&k("k1"), "row1-edited"), None);
    assert_eq!(rows.unchanged(&k("k2"), "row2"), None);
    assert_eq!(rows.unchanged(&k("k3"), "row3"), None);
    assert_eq!(rows.unchanged(&k("k4"), "row1"), None);
    // A wide row is settled only when every one of its records is.
    let both = vec![
        RecordRef::new("Observation", "k1"),
        RecordRef::new("Observation", "k2"),
    ];
    assert_eq!(rows.unchanged(&both, "row1"), None);

    // A later attempt at k1 unsettles it.
    l.record_pending(&s, "Observation", "k1", "c1b").unwrap();
    let rows = SourceRows::load(l.clone(), s.clone()).unwrap();
    assert_eq!(rows.unchanged(&k("k1"), "row1"), None);
    // Another target knows nothing of these rows.
    let other = SourceRows::load(l, Scope::new("https://elsewhere/v1", "12001")).unwrap();
    assert_eq!(other.unchanged(&k("k1"), "row1"), None);
}
