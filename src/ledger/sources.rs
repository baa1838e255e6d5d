//! The ledger's memory of source rows: which row (by [`source hash`](crate::mapping::MappingSet::source_hash))
//! rendered which content, for each record. A nightly run asks it, before rendering a row,
//! whether every record of that row was confirmed by the server with the content that same row
//! rendered last time; such a row is neither rendered nor sent, and its records count as
//! unchanged.
//!
//! Must not: decide anything about a row whose record has an unconfirmed request (pending or
//! unknown), or one the server holds with other content; those take the ordinary way.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::params;

use super::{Ledger, LedgerError, RecordRef, Scope};
use crate::pipeline::{KnownRows, RenderedRecord};

impl Ledger {
    /// Records whose last confirmed content is the content their source row rendered, with that
    /// row's hash and the server id: record → (server id, source hash).
    pub fn confirmed_sources(
        &self,
        scope: &Scope,
    ) -> Result<HashMap<RecordRef, (String, String)>, LedgerError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT s.resource_type, s.record_key, s.server_id, r.source_hash
                 FROM submissions s JOIN source_rows r
                   ON r.target = s.target AND r.ccn = s.ccn
                  AND r.resource_type = s.resource_type AND r.record_key = s.record_key
                 WHERE s.target = ?1 AND s.ccn = ?2 AND s.status = 'sent'
                   AND s.server_id IS NOT NULL AND s.content_hash = r.content_hash",
            )
            .map_err(self.err("read source rows"))?;
        let rows = st
            .query_map(params![scope.target, scope.ccn], |r| {
                Ok((
                    RecordRef::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?),
                    (r.get::<_, String>(2)?, r.get::<_, String>(3)?),
                ))
            })
            .map_err(self.err("read source rows"))?;
        rows.collect::<Result<HashMap<_, _>, _>>()
            .map_err(self.err("read source rows"))
    }

    /// Notes the content each record's source row rendered, in one transaction.
    pub fn record_sources(
        &self,
        scope: &Scope,
        rows: &[RenderedRecord],
    ) -> Result<(), LedgerError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(self.err("record source rows"))?;
        {
            let mut st = tx
                .prepare_cached(
                    "INSERT INTO source_rows
                       (target, ccn, resource_type, record_key, source_hash, content_hash)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (target, ccn, resource_type, record_key) DO UPDATE SET
                       source_hash = excluded.source_hash,
                       content_hash = excluded.content_hash",
                )
                .map_err(self.err("record source rows"))?;
            for r in rows {
                st.execute(params![
                    scope.target,
                    scope.ccn,
                    r.record.resource_type,
                    r.record.record_key,
                    r.source_hash,
                    r.content_hash
                ])
                .map_err(self.err("record source rows"))?;
            }
        }
        tx.commit().map_err(self.err("record source rows"))
    }
}

/// [`KnownRows`] from the ledger, read once when the run starts.
pub struct SourceRows {
    ledger: Arc<Ledger>,
    scope: Scope,
    known: HashMap<RecordRef, (String, String)>,
}

impl std::fmt::Debug for SourceRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceRows")
            .field("scope", &self.scope)
            .field("records", &self.known.len())
            .finish()
    }
}

impl SourceRows {
    pub fn load(ledger: Arc<Ledger>, scope: Scope) -> Result<SourceRows, LedgerError> {
        let known = ledger.confirmed_sources(&scope)?;
        Ok(SourceRows {
            ledger,
            scope,
            known,
        })
    }
}

impl KnownRows for SourceRows {
    fn unchanged(&self, records: &[RecordRef], source_hash: &str) -> Option<Vec<String>> {
        records
            .iter()
            .map(|r| match self.known.get(r) {
                Some((server_id, hash)) if hash == source_hash => Some(server_id.clone()),
                _ => None,
            })
            .collect()
    }

    fn rendered(&self, rows: &[RenderedRecord]) -> Result<(), String> {
        self.ledger
            .record_sources(&self.scope, rows)
            .map_err(|e| e.to_string())
    }
}
