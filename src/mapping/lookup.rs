//! Lookup tables: small CSV files that translate local codes (lab codes, sex, race, ethnicity)
//! into the codes FHIR and CIBMTR expect.
//!
//! The first column is the key; every other column is a field of the entry the `lookup` filter
//! returns. Empty cells become `none`. Tables are read once, before any row, and are immutable
//! afterwards so that rayon workers share them without locks. This module must not know any
//! particular table's meaning: the templates give the columns their meaning.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::Value as JValue;

use super::MappingError;

/// One loaded table.
#[derive(Debug)]
pub struct LookupTable {
    pub name: String,
    pub file: PathBuf,
    /// The header, key column first.
    pub columns: Vec<String>,
    /// Key → the entry as a template value (a map of the other columns).
    entries: HashMap<String, JValue>,
}

impl LookupTable {
    /// Reads a table. Keys are compared exactly after trimming surrounding spaces; a key listed
    /// twice is an error (one of the two would silently win otherwise).
    pub fn load(name: &str, path: &Path) -> Result<LookupTable, MappingError> {
        let bad = |line: Option<u64>, message: String| MappingError::Lookup {
            path: path.to_path_buf(),
            line,
            message,
        };
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .from_path(path)
            .map_err(|e| bad(None, e.to_string()))?;
        let columns: Vec<String> = reader
            .headers()
            .map_err(|e| bad(Some(1), e.to_string()))?
            .iter()
            .map(str::to_string)
            .collect();
        if columns.len() < 2 {
            return Err(bad(
                Some(1),
                "a lookup table needs a key column and at least one value column".into(),
            ));
        }
        let mut entries = HashMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| bad(e.position().map(|p| p.line()), e.to_string()))?;
            let line = record.position().map(|p| p.line());
            let key = record.get(0).unwrap_or_default().to_string();
            if key.is_empty() {
                return Err(bad(line, "empty key".into()));
            }
            let entry: Vec<(String, JValue)> = columns
                .iter()
                .zip(record.iter())
                .skip(1)
                .map(|(c, v)| {
                    let v = if v.is_empty() {
                        JValue::from(())
                    } else {
                        JValue::from(v)
                    };
                    (c.clone(), v)
                })
                .collect();
            let value = super::json::JsonMap::value(entry);
            if entries.insert(key.clone(), value).is_some() {
                return Err(bad(line, format!("key {key:?} is listed twice")));
            }
        }
        Ok(LookupTable {
            name: name.to_string(),
            file: path.to_path_buf(),
            columns,
            entries,
        })
    }

    /// The entry for a key, if any.
    pub fn get(&self, key: &str) -> Option<&JValue> {
        self.entries.get(key.trim())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// All tables of a mapping set, by name.
#[derive(Debug, Default)]
pub struct Lookups {
    tables: HashMap<String, Arc<LookupTable>>,
}

impl Lookups {
    /// Adds a table unless one of that name is already loaded from the same file. The same name
    /// bound to two different files is an error: templates name tables, not files.
    pub fn add(&mut self, name: &str, path: &Path) -> Result<(), MappingError> {
        if let Some(existing) = self.tables.get(name) {
            if same_file(&existing.file, path) {
                return Ok(());
            }
            return Err(MappingError::Lookup {
                path: path.to_path_buf(),
                line: None,
                message: format!(
                    "table name {name:?} is already bound to {}",
                    existing.file.display()
                ),
            });
        }
        let table = LookupTable::load(name, path)?;
        self.tables.insert(name.to_string(), Arc::new(table));
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Arc<LookupTable>> {
        self.tables.get(name)
    }

    /// Table names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tables.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_maps_of_the_other_columns() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("sex.csv");
        std::fs::write(&p, "code,fhir_gender,crid_gender\nM,male,M\n U ,unknown,\n").expect("w");
        let t = LookupTable::load("sex", &p).expect("table");
        assert_eq!(t.len(), 2);
        let m = t.get("M").expect("M");
        assert_eq!(
            m.get_attr("fhir_gender").expect("attr").as_str(),
            Some("male")
        );
        let u = t.get("U").expect("U trimmed");
        assert!(u.get_attr("crid_gender").expect("attr").is_none());
        assert!(t.get("X").is_none());
    }

    #[test]
    fn duplicate_keys_name_the_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.csv");
        std::fs::write(&p, "code,v\nA,1\nB,2\nA,3\n").expect("w");
        let e = LookupTable::load("t", &p).expect_err("duplicate");
        assert!(e.to_string().contains("t.csv:4"), "{e}");
    }
}
