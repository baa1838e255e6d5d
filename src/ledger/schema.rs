//! The ledger's schema and its migrations, versioned with SQLite's `user_version`.
//!
//! Each migration runs once, in order, inside one transaction with the version bump, so a crash
//! mid-migration leaves the previous version intact. Never edit a released migration: append one.

use rusqlite::Connection;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: submissions per record, CRIDs per patient, runs, outstanding rejects.
    r#"
    CREATE TABLE submissions (
        target          TEXT    NOT NULL,
        ccn             TEXT    NOT NULL,
        resource_type   TEXT    NOT NULL,
        record_key      TEXT    NOT NULL,
        -- The last submission the server confirmed (NULL until one was).
        content_hash    TEXT,
        server_id       TEXT,
        last_outcome    TEXT,
        -- sent | pending | unknown
        status          TEXT    NOT NULL,
        -- The hash an unconfirmed request carried (pending/unknown only).
        pending_hash    TEXT,
        updated_at      TEXT    NOT NULL,
        run_id          INTEGER,
        last_seen_run   INTEGER,
        PRIMARY KEY (target, ccn, resource_type, record_key)
    ) WITHOUT ROWID;

    CREATE TABLE crids (
        target            TEXT NOT NULL,
        ccn               TEXT NOT NULL,
        patient_key       TEXT NOT NULL,
        crid              TEXT NOT NULL,
        demographics_hash TEXT NOT NULL,
        updated_at        TEXT NOT NULL,
        run_id            INTEGER,
        PRIMARY KEY (target, ccn, patient_key)
    ) WITHOUT ROWID;

    CREATE TABLE runs (
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        uuid        TEXT    NOT NULL UNIQUE,
        started_at  TEXT    NOT NULL,
        ended_at    TEXT,
        target      TEXT    NOT NULL,
        ccn         TEXT    NOT NULL,
        mode        TEXT    NOT NULL,
        version     TEXT    NOT NULL,
        config_hash TEXT    NOT NULL,
        pid         INTEGER NOT NULL,
        host        TEXT    NOT NULL,
        counts      TEXT,
        exit_code   INTEGER
    );

    CREATE TABLE rejects (
        target        TEXT    NOT NULL,
        ccn           TEXT    NOT NULL,
        resource_type TEXT    NOT NULL,
        record_key    TEXT    NOT NULL,
        run_id        INTEGER,
        location      TEXT    NOT NULL,
        reason        TEXT    NOT NULL,
        at            TEXT    NOT NULL,
        PRIMARY KEY (target, ccn, resource_type, record_key)
    ) WITHOUT ROWID;

    CREATE INDEX submissions_by_status ON submissions (target, ccn, status);
    CREATE INDEX rejects_by_run ON rejects (run_id);
    "#,
    // 2: which source row (by hash) rendered which content, so that an unchanged row of a
    // nightly run need not be rendered again.
    r#"
    CREATE TABLE source_rows (
        target        TEXT NOT NULL,
        ccn           TEXT NOT NULL,
        resource_type TEXT NOT NULL,
        record_key    TEXT NOT NULL,
        source_hash   TEXT NOT NULL,
        content_hash  TEXT NOT NULL,
        PRIMARY KEY (target, ccn, resource_type, record_key)
    ) WITHOUT ROWID;
    "#,
];

/// The schema version this build writes.
pub const CURRENT_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings `conn` up to [`CURRENT_VERSION`]. Returns the version found before migrating, or an
/// error carrying the version when the file was written by a newer fhirlift.
pub(crate) fn migrate(conn: &mut Connection) -> Result<i64, MigrateError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > CURRENT_VERSION {
        return Err(MigrateError::Newer(found));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(found)
}

#[derive(Debug)]
pub(crate) enum MigrateError {
    Newer(i64),
    Sqlite(rusqlite::Error),
}

impl From<rusqlite::Error> for MigrateError {
    fn from(e: rusqlite::Error) -> Self {
        MigrateError::Sqlite(e)
    }
}
