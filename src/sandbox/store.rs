//! The sandbox's SQLite store: current resource versions, search side tables and CRIDs.
//!
//! One connection, used by one writer at a time (the caller holds a mutex), with prepared
//! statements cached. Searches go through the side tables (`res_token`, `res_ref`), never a scan
//! of resource bodies. CRIDs are stored as salted hashes of the normalized matching keys: the
//! store keeps no names, SSNs or birth dates.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params, params_from_iter};

/// A storage failure; carries the store's location, never resource content.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open SQLite store {path}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("SQLite error")]
    Sql(#[from] rusqlite::Error),
    #[error("cannot write dump file {path}")]
    Dump {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Locks a mutex, recovering from poisoning: a panic while holding one of the sandbox's locks
/// leaves data that is still consistent (counters, tokens, a store whose SQLite transaction was
/// rolled back), so the server keeps serving.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One token-index row: a search parameter's `system|value` for one resource.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub param: &'static str,
    /// `""` when the element has no system.
    pub system: String,
    pub value: String,
}

/// One reference-index row: `param` points at `target_type/target_id`.
#[derive(Debug, Clone)]
pub struct RefEntry {
    pub param: &'static str,
    pub target_type: String,
    pub target_id: i64,
}

/// What a search's index lookups produce.
#[derive(Debug, Default)]
pub struct Index {
    pub tokens: Vec<TokenEntry>,
    pub refs: Vec<RefEntry>,
}

/// A stored resource's current version.
#[derive(Debug)]
pub struct Stored {
    pub ccn: String,
    pub version: i64,
    pub body: String,
}

/// One condition of a search (AND-ed with the others); alternatives inside are OR-ed.
#[derive(Debug)]
pub enum Condition {
    /// Token alternatives: (system constraint, value constraint).
    Token {
        param: &'static str,
        alternatives: Vec<TokenMatch>,
    },
    /// Reference alternatives: (target type, target id).
    Ref {
        param: &'static str,
        alternatives: Vec<(String, i64)>,
    },
    /// `patient.identifier`: the subject Patient carries one of these identifiers.
    ChainedIdentifier {
        ref_param: &'static str,
        alternatives: Vec<TokenMatch>,
    },
    /// A condition that can never match (e.g. a non-numeric id).
    Nothing,
}

/// A token search value: `system|value`, `|value`, `value` or `system|`.
#[derive(Debug, Clone)]
pub struct TokenMatch {
    /// `None`: any system; `Some("")`: no system.
    pub system: Option<String>,
    /// `None`: any value (the `system|` form).
    pub value: Option<String>,
}

pub struct Store {
    conn: Connection,
    next_rid: i64,
    salt: [u8; 32],
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS resources (
    rid INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    ccn TEXT NOT NULL,
    version INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_type ON resources(type, rid);
CREATE TABLE IF NOT EXISTS res_token (
    rid INTEGER NOT NULL,
    param TEXT NOT NULL,
    system TEXT NOT NULL,
    value TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS res_token_value ON res_token(param, value, system);
CREATE INDEX IF NOT EXISTS res_token_rid ON res_token(rid);
CREATE TABLE IF NOT EXISTS res_ref (
    rid INTEGER NOT NULL,
    param TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_rid INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS res_ref_target ON res_ref(target_rid, param);
CREATE INDEX IF NOT EXISTS res_ref_rid ON res_ref(rid);
CREATE TABLE IF NOT EXISTS crids (crid INTEGER PRIMARY KEY, ccn TEXT NOT NULL, created TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS crid_keys (key BLOB PRIMARY KEY, crid INTEGER NOT NULL) WITHOUT ROWID;
";

/// CRIDs start here so that they never look like small server ids.
const FIRST_CRID: i64 = 4_000_001;

impl Store {
    /// Opens the SQLite file (WAL, `synchronous=NORMAL`) or an in-memory store.
    pub fn open(path: Option<&Path>) -> Result<Store, StoreError> {
        let label = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| ":memory:".into());
        let open_err = |source| StoreError::Open {
            path: label.clone(),
            source,
        };
        let conn = match path {
            Some(p) => {
                // Resources are patient data: a new store is the owner's alone. A failure here
                // shows again, with SQLite's words, when the store is opened.
                let _ = crate::report::create_private_if_absent(p);
                Connection::open(p).map_err(open_err)?
            }
            None => Connection::open_in_memory().map_err(open_err)?,
        };
        if path.is_some() {
            // WAL + NORMAL: a crash may lose the last commits but never corrupts the store, and
            // creates do not wait for an fsync each.
            conn.pragma_update(None, "journal_mode", "WAL")
                .map_err(open_err)?;
            conn.pragma_update(None, "synchronous", "NORMAL")
                .map_err(open_err)?;
        }
        // A store of a few hundred thousand resources keeps its indexes in memory (64 MiB of page
        // cache instead of SQLite's 2 MiB), so a create does not read index pages back from disk.
        conn.pragma_update(None, "cache_size", -65536)
            .map_err(open_err)?;
        conn.execute_batch(SCHEMA).map_err(open_err)?;
        conn.set_prepared_statement_cache_capacity(64);
        let salt = match conn
            .query_row("SELECT value FROM meta WHERE key = 'salt'", [], |r| {
                r.get::<_, Vec<u8>>(0)
            })
            .optional()?
        {
            Some(v) if v.len() == 32 => {
                let mut s = [0u8; 32];
                s.copy_from_slice(&v);
                s
            }
            _ => {
                let s: [u8; 32] = rand::random();
                conn.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('salt', ?1)",
                    params![s.to_vec()],
                )?;
                s
            }
        };
        let next_rid: i64 =
            conn.query_row("SELECT COALESCE(MAX(rid), 0) + 1 FROM resources", [], |r| {
                r.get(0)
            })?;
        Ok(Store {
            conn,
            next_rid,
            salt,
        })
    }

    /// Runs `f` in one SQLite transaction: committed if it returns `Ok`, rolled back otherwise.
    pub fn transaction<T, E: From<StoreError>>(
        &mut self,
        f: impl FnOnce(&mut Store) -> Result<T, E>,
    ) -> Result<T, E> {
        self.exec_cached("BEGIN IMMEDIATE")
            .map_err(|e| E::from(StoreError::Sql(e)))?;
        match f(self) {
            Ok(v) => {
                self.exec_cached("COMMIT")
                    .map_err(|e| E::from(StoreError::Sql(e)))?;
                Ok(v)
            }
            Err(e) => {
                // The original error matters more than a failed rollback.
                let _ = self.exec_cached("ROLLBACK");
                Err(e)
            }
        }
    }

    fn exec_cached(&self, sql: &str) -> Result<(), rusqlite::Error> {
        self.conn.prepare_cached(sql)?.execute([])?;
        Ok(())
    }

    /// Reserves a new server id (ids are shared by all types, like HAPI's).
    pub fn allocate_id(&mut self) -> i64 {
        let id = self.next_rid;
        self.next_rid += 1;
        id
    }

    pub fn insert(
        &mut self,
        rid: i64,
        rtype: &str,
        ccn: &str,
        last_updated: &str,
        body: &str,
        index: &Index,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "INSERT INTO resources(rid, type, ccn, version, last_updated, body) VALUES (?1, ?2, ?3, 1, ?4, ?5)",
            )?
            .execute(params![rid, rtype, ccn, last_updated, body])?;
        self.write_index(rid, index)
    }

    pub fn update(
        &mut self,
        rid: i64,
        ccn: &str,
        version: i64,
        last_updated: &str,
        body: &str,
        index: &Index,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(
                "UPDATE resources SET ccn = ?2, version = ?3, last_updated = ?4, body = ?5 WHERE rid = ?1",
            )?
            .execute(params![rid, ccn, version, last_updated, body])?;
        self.conn
            .prepare_cached("DELETE FROM res_token WHERE rid = ?1")?
            .execute(params![rid])?;
        self.conn
            .prepare_cached("DELETE FROM res_ref WHERE rid = ?1")?
            .execute(params![rid])?;
        self.write_index(rid, index)
    }

    fn write_index(&mut self, rid: i64, index: &Index) -> Result<(), StoreError> {
        if !index.tokens.is_empty() {
            let mut st = self.conn.prepare_cached(
                "INSERT INTO res_token(rid, param, system, value) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for t in &index.tokens {
                st.execute(params![rid, t.param, t.system, t.value])?;
            }
        }
        if !index.refs.is_empty() {
            let mut st = self.conn.prepare_cached(
                "INSERT INTO res_ref(rid, param, target_type, target_rid) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for r in &index.refs {
                st.execute(params![rid, r.param, r.target_type, r.target_id])?;
            }
        }
        Ok(())
    }

    /// The current version of `rtype/rid`, if it exists.
    pub fn get(&self, rtype: &str, rid: i64) -> Result<Option<Stored>, StoreError> {
        Ok(self
            .conn
            .prepare_cached(
                "SELECT ccn, version, body FROM resources WHERE rid = ?1 AND type = ?2",
            )?
            .query_row(params![rid, rtype], |r| {
                Ok(Stored {
                    ccn: r.get(0)?,
                    version: r.get(1)?,
                    body: r.get(2)?,
                })
            })
            .optional()?)
    }

    /// The center a stored resource belongs to, if it exists.
    pub fn ccn_of(&self, rtype: &str, rid: i64) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT ccn FROM resources WHERE rid = ?1 AND type = ?2")?
            .query_row(params![rid, rtype], |r| r.get(0))
            .optional()?)
    }

    /// Runs a search: the total and one page of bodies, in server-id order. Only resources of the
    /// given centers are visible.
    pub fn search(
        &self,
        rtype: &str,
        ccns: &[String],
        conditions: &[Condition],
        limit: usize,
        offset: usize,
        with_bodies: bool,
    ) -> Result<(u64, Vec<String>), StoreError> {
        use rusqlite::types::Value as Sql;
        let mut sql = String::from(" FROM resources r WHERE r.type = ?");
        let mut args: Vec<Sql> = vec![Sql::Text(rtype.to_string())];
        sql.push_str(" AND r.ccn IN (");
        for (i, c) in ccns.iter().enumerate() {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
            args.push(Sql::Text(c.clone()));
        }
        if ccns.is_empty() {
            sql.push_str("NULL");
        }
        sql.push(')');
        for cond in conditions {
            match cond {
                Condition::Nothing => sql.push_str(" AND 0"),
                Condition::Token {
                    param,
                    alternatives,
                } => {
                    // A broad token (the security label every resource of a center carries, or
                    // a system without a value) is checked per candidate; a narrow one drives the
                    // search through the token index. Materialising a broad one for every
                    // search made a load of n resources cost O(n²).
                    let broad =
                        *param == "_security" || alternatives.iter().any(|a| a.value.is_none());
                    sql.push_str(if broad {
                        " AND EXISTS (SELECT 1 FROM res_token t WHERE t.rid = r.rid AND t.param = ? AND ("
                    } else {
                        " AND r.rid IN (SELECT t.rid FROM res_token t WHERE t.param = ? AND ("
                    });
                    args.push(Sql::Text((*param).to_string()));
                    push_token_alternatives(&mut sql, &mut args, alternatives);
                    sql.push_str("))");
                }
                Condition::Ref {
                    param,
                    alternatives,
                } => {
                    sql.push_str(
                        " AND r.rid IN (SELECT f.rid FROM res_ref f WHERE f.param = ? AND (",
                    );
                    args.push(Sql::Text((*param).to_string()));
                    for (i, (ty, id)) in alternatives.iter().enumerate() {
                        if i > 0 {
                            sql.push_str(" OR ");
                        }
                        sql.push_str("(f.target_rid = ? AND f.target_type = ?)");
                        args.push(Sql::Integer(*id));
                        args.push(Sql::Text(ty.clone()));
                    }
                    if alternatives.is_empty() {
                        sql.push('0');
                    }
                    sql.push_str("))");
                }
                Condition::ChainedIdentifier {
                    ref_param,
                    alternatives,
                } => {
                    sql.push_str(
                        " AND r.rid IN (SELECT f.rid FROM res_token t JOIN res_ref f ON f.target_rid = t.rid \
                         WHERE f.param = ? AND f.target_type = 'Patient' AND t.param = 'identifier' AND (",
                    );
                    args.push(Sql::Text((*ref_param).to_string()));
                    push_token_alternatives(&mut sql, &mut args, alternatives);
                    sql.push_str("))");
                }
            }
        }
        let total: i64 = self
            .conn
            .prepare_cached(&format!("SELECT COUNT(*){sql}"))?
            .query_row(params_from_iter(args.iter()), |r| r.get(0))?;
        let mut bodies = Vec::new();
        if with_bodies && limit > 0 {
            let mut st = self.conn.prepare_cached(&format!(
                "SELECT r.body{sql} ORDER BY r.rid LIMIT ? OFFSET ?"
            ))?;
            args.push(Sql::Integer(i64::try_from(limit).unwrap_or(i64::MAX)));
            args.push(Sql::Integer(i64::try_from(offset).unwrap_or(i64::MAX)));
            let rows = st.query_map(params_from_iter(args.iter()), |r| r.get::<_, String>(0))?;
            for b in rows {
                bodies.push(b?);
            }
        }
        Ok((u64::try_from(total).unwrap_or(0), bodies))
    }

    /// Resources per type.
    pub fn counts(&self) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut st = self
            .conn
            .prepare_cached("SELECT type, COUNT(*) FROM resources GROUP BY type")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (t, n) = row?;
            out.insert(t, u64::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }

    pub fn crid_count(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT COUNT(*) FROM crids")?
            .query_row([], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The salted hash of a normalized matching key.
    pub fn hash_key(&self, key: &str) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(key.as_bytes());
        h.finalize().to_vec()
    }

    /// The CRID a hashed key belongs to.
    pub fn crid_for_key(&self, key: &[u8]) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT crid FROM crid_keys WHERE key = ?1")?
            .query_row(params![key], |r| r.get(0))
            .optional()?)
    }

    /// Assigns a new CRID.
    pub fn new_crid(&mut self, ccn: &str, now: &str) -> Result<i64, StoreError> {
        let next: i64 = self
            .conn
            .prepare_cached("SELECT COALESCE(MAX(crid) + 1, ?1) FROM crids")?
            .query_row(params![FIRST_CRID], |r| r.get(0))?;
        self.conn
            .prepare_cached("INSERT INTO crids(crid, ccn, created) VALUES (?1, ?2, ?3)")?
            .execute(params![next, ccn, now])?;
        Ok(next)
    }

    /// Remembers that `key` identifies `crid` (kept if the key is already known).
    pub fn add_crid_key(&mut self, key: &[u8], crid: i64) -> Result<(), StoreError> {
        self.conn
            .prepare_cached("INSERT OR IGNORE INTO crid_keys(key, crid) VALUES (?1, ?2)")?
            .execute(params![key, crid])?;
        Ok(())
    }

    /// Writes every resource as NDJSON, one file per type (`Patient.ndjson`, …), in server-id
    /// order. Returns the number written per type.
    pub fn dump(&self, dir: &Path) -> Result<BTreeMap<String, u64>, StoreError> {
        let dump_err = |path: PathBuf| move |source| StoreError::Dump { path, source };
        std::fs::create_dir_all(dir).map_err(dump_err(dir.to_path_buf()))?;
        let mut files: BTreeMap<String, (std::io::BufWriter<std::fs::File>, u64)> = BTreeMap::new();
        let mut st = self
            .conn
            .prepare("SELECT type, body FROM resources ORDER BY rid")?;
        let mut rows = st.query([])?;
        while let Some(row) = rows.next()? {
            let rtype: String = row.get(0)?;
            let body: String = row.get(1)?;
            // Type names come from the store, which only accepts known resource types.
            let path = dir.join(format!("{rtype}.ndjson"));
            if !files.contains_key(&rtype) {
                let f = std::fs::File::create(&path).map_err(dump_err(path.clone()))?;
                files.insert(rtype.clone(), (std::io::BufWriter::new(f), 0));
            }
            if let Some((w, n)) = files.get_mut(&rtype) {
                w.write_all(body.as_bytes())
                    .and_then(|_| w.write_all(b"\n"))
                    .map_err(dump_err(path))?;
                *n += 1;
            }
        }
        let mut out = BTreeMap::new();
        for (t, (mut w, n)) in files {
            w.flush()
                .map_err(dump_err(dir.join(format!("{t}.ndjson"))))?;
            out.insert(t, n);
        }
        Ok(out)
    }
}

fn push_token_alternatives(
    sql: &mut String,
    args: &mut Vec<rusqlite::types::Value>,
    alternatives: &[TokenMatch],
) {
    use rusqlite::types::Value as Sql;
    if alternatives.is_empty() {
        sql.push('0');
    }
    for (i, m) in alternatives.iter().enumerate() {
        if i > 0 {
            sql.push_str(" OR ");
        }
        match (&m.system, &m.value) {
            (Some(s), Some(v)) => {
                sql.push_str("(t.value = ? AND t.system = ?)");
                args.push(Sql::Text(v.clone()));
                args.push(Sql::Text(s.clone()));
            }
            (None, Some(v)) => {
                sql.push_str("t.value = ?");
                args.push(Sql::Text(v.clone()));
            }
            (Some(s), None) => {
                sql.push_str("t.system = ?");
                args.push(Sql::Text(s.clone()));
            }
            (None, None) => sql.push('1'),
        }
    }
}

/// Opens the store at `db` and writes it as NDJSON into `dir` (`fhirlift sandbox --dump`).
pub fn dump_store(db: &Path, dir: &Path) -> Result<BTreeMap<String, u64>, StoreError> {
    let store = Store::open(Some(db))?;
    store.dump(dir)
}
