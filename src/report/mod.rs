//! Run reports: per-mapping counts, rejected rows (the rejects file), unmapped codes, validation
//! warnings and sink outcomes, as `report.json` and as a short human summary.
//!
//! The report only counts and keeps the first few row locations of each group, so its size does
//! not grow with the input. It holds no patient values: locations, record keys and local codes
//! only; the rejects file, which does hold the original cells, is written with mode 0600.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::mapping::RowError;
use crate::sink::{OutcomeStatus, RowOutcome};
use crate::source::{Header, RowLocation};
use crate::validate::Issue;

/// How many row locations a group (an unmapped code, a warning) keeps as examples.
pub const FIRST_ROWS: usize = 5;

/// Counts for one mapping. `rows_read = rows_mapped + rows_rejected` always holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MappingCounts {
    pub mapping: String,
    pub source: String,
    pub resource_type: String,
    pub rows_read: u64,
    pub rows_mapped: u64,
    pub rows_rejected: u64,
    /// Mapped rows an earlier run had settled: identical to the row whose resources the server
    /// confirmed, so neither rendered nor sent again (counted in `rows_mapped` too).
    pub rows_settled: u64,
    /// Resources produced (a wide row may give several, or none).
    pub resources: u64,
}

/// One distinct code that had no lookup entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnmappedCode {
    pub table: String,
    pub code: String,
    pub column: Option<String>,
    pub count: u64,
    pub first_rows: Vec<String>,
}

/// One distinct validation warning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WarningGroup {
    pub resource_type: String,
    pub path: String,
    pub message: String,
    pub count: u64,
    pub first_rows: Vec<String>,
}

/// The whole run's report (`report.json`). Deterministic: no times, no host names, so that two
/// runs over the same input give the same file.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunReport {
    pub fhirlift_version: String,
    pub config_sha256: String,
    pub dry_run: bool,
    pub mappings: Vec<MappingCounts>,
    /// Resources handed to the sink, per resource type.
    pub resources: BTreeMap<String, u64>,
    pub rows_read: u64,
    pub rows_rejected: u64,
    /// Rejected rows per error kind (`cell`, `unmapped_code`, `invalid_resource`, …).
    pub rejects_by_kind: BTreeMap<String, u64>,
    pub unmapped_codes: Vec<UnmappedCode>,
    pub warnings: Vec<WarningGroup>,
    /// Sink outcomes per status (`written`, `created`, `rejected`, …).
    pub sink: BTreeMap<String, u64>,
    /// Resources the sink refused (they are in the rejects file too).
    pub sink_rejected: u64,
}

/// Collects a run's report as rows go by.
#[derive(Debug, Default)]
pub struct ReportBuilder {
    report: RunReport,
    unmapped: BTreeMap<(String, String), UnmappedCode>,
    warnings: BTreeMap<(String, String, String), WarningGroup>,
}

impl ReportBuilder {
    pub fn new(config_sha256: &str, dry_run: bool) -> ReportBuilder {
        ReportBuilder {
            report: RunReport {
                fhirlift_version: env!("CARGO_PKG_VERSION").to_string(),
                config_sha256: config_sha256.to_string(),
                dry_run,
                ..RunReport::default()
            },
            ..ReportBuilder::default()
        }
    }

    /// Starts counting a mapping; returns its index for the other calls.
    pub fn add_mapping(&mut self, mapping: &str, source: &str, resource_type: &str) -> usize {
        self.report.mappings.push(MappingCounts {
            mapping: mapping.to_string(),
            source: source.to_string(),
            resource_type: resource_type.to_string(),
            ..MappingCounts::default()
        });
        self.report.mappings.len() - 1
    }

    /// A row that mapped, with the resource types it produced and its warnings.
    pub fn mapped(
        &mut self,
        mapping: usize,
        location: &RowLocation,
        resource_types: &[&str],
        warnings: &[(String, Issue)],
    ) {
        let m = &mut self.report.mappings[mapping];
        m.rows_read += 1;
        m.rows_mapped += 1;
        m.resources += resource_types.len() as u64;
        self.report.rows_read += 1;
        for t in resource_types {
            *self.report.resources.entry(t.to_string()).or_default() += 1;
        }
        for (rt, issue) in warnings {
            let key = (rt.clone(), issue.path.clone(), issue.message.clone());
            let g = self.warnings.entry(key).or_insert_with(|| WarningGroup {
                resource_type: rt.clone(),
                path: issue.path.clone(),
                message: issue.message.clone(),
                count: 0,
                first_rows: Vec::new(),
            });
            g.count += 1;
            if g.first_rows.len() < FIRST_ROWS {
                g.first_rows.push(location.to_string());
            }
        }
    }

    /// A row the mapping stage rejected.
    /// A row an earlier run settled (see [`MappingCounts::rows_settled`]).
    pub fn settled(&mut self, mapping: usize, location: &RowLocation, resource_types: &[&str]) {
        self.mapped(mapping, location, resource_types, &[]);
        self.report.mappings[mapping].rows_settled += 1;
    }

    pub fn rejected(&mut self, mapping: usize, error: &RowError) {
        let m = &mut self.report.mappings[mapping];
        m.rows_read += 1;
        m.rows_rejected += 1;
        self.report.rows_read += 1;
        self.report.rows_rejected += 1;
        *self
            .report
            .rejects_by_kind
            .entry(error.kind().to_string())
            .or_default() += 1;
        if let RowError::Unmapped {
            location,
            column,
            table,
            code,
        } = error
        {
            let u = self
                .unmapped
                .entry((table.clone(), code.clone()))
                .or_insert_with(|| UnmappedCode {
                    table: table.clone(),
                    code: code.clone(),
                    column: column.clone(),
                    count: 0,
                    first_rows: Vec::new(),
                });
            u.count += 1;
            if u.first_rows.len() < FIRST_ROWS {
                u.first_rows.push(location.to_string());
            }
        }
    }

    /// A sink outcome.
    pub fn outcome(&mut self, outcome: &RowOutcome) {
        let status = serde_json::to_value(outcome.status)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        *self.report.sink.entry(status).or_default() += 1;
        if outcome.status == OutcomeStatus::Rejected {
            self.report.sink_rejected += 1;
        }
    }

    pub fn finish(mut self) -> RunReport {
        self.report.unmapped_codes = self.unmapped.into_values().collect();
        self.report.warnings = self.warnings.into_values().collect();
        self.report
    }
}

impl RunReport {
    /// True when any row, or any resource in the sink, was rejected.
    pub fn has_rejects(&self) -> bool {
        self.rows_rejected > 0 || self.sink_rejected > 0
    }

    /// Writes `report.json` (pretty, trailing newline).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let mut f = create_private(path)?;
        serde_json::to_writer_pretty(&mut f, self)?;
        f.write_all(b"\n")?;
        f.flush()
    }

    /// The few lines printed on stderr at the end of a run.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} rows read, {} rejected",
            self.rows_read, self.rows_rejected
        );
        if !self.rejects_by_kind.is_empty() {
            let parts: Vec<String> = self
                .rejects_by_kind
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "rejected rows by reason: {}", parts.join(", "));
        }
        for m in &self.mappings {
            let _ = writeln!(
                s,
                "  {:<20} {:>8} read {:>8} mapped {:>6} rejected {:>8} {}",
                m.mapping,
                m.rows_read,
                m.rows_mapped,
                m.rows_rejected,
                m.resources,
                m.resource_type
            );
            if m.rows_settled > 0 {
                let _ = writeln!(
                    s,
                    "  {:<20} {:>8} of them unchanged since the last run (not rendered again)",
                    "", m.rows_settled
                );
            }
        }
        if !self.sink.is_empty() {
            let parts: Vec<String> = self.sink.iter().map(|(k, v)| format!("{v} {k}")).collect();
            let _ = writeln!(s, "sink: {}", parts.join(", "));
        }
        if !self.unmapped_codes.is_empty() {
            let _ = writeln!(s, "unmapped codes:");
            for u in &self.unmapped_codes {
                let _ = writeln!(
                    s,
                    "  {} {:?} ×{} (first: {})",
                    u.table,
                    u.code,
                    u.count,
                    u.first_rows.join(", ")
                );
            }
        }
        if !self.warnings.is_empty() {
            let total: u64 = self.warnings.iter().map(|w| w.count).sum();
            let _ = writeln!(
                s,
                "{total} validation warnings in {} groups (see report.json)",
                self.warnings.len()
            );
        }
        s
    }
}

/// Options that create files readable by their owner only (mode 0600 on Unix).
fn private_options() -> std::fs::OpenOptions {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts
}

/// Creates (truncating) a file readable by its owner only: outputs hold patient data.
pub fn create_private(path: &Path) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
    let file = private_options().create(true).truncate(true).open(path)?;
    // An existing file keeps its old mode through `open`; tighten it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(std::io::BufWriter::new(file))
}

/// Creates `path` empty and readable by its owner only (mode 0600) if it does not exist yet, for
/// a database that SQLite then opens: SQLite gives its WAL and shared-memory files the mode of the
/// database file. An existing file is left as it is.
pub fn create_private_if_absent(path: &Path) -> std::io::Result<()> {
    match private_options().create_new(true).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// The rejects file: one CSV line per rejected row or resource, in processing order, with the
/// columns `location`, `mapping`, `column`, `error` and `columns` — the original cells exactly as
/// read, as a JSON object (header → raw text) so that rows of different sources fit one file.
/// It holds patient data and is created with mode 0600.
pub struct RejectsWriter {
    path: PathBuf,
    writer: csv::Writer<std::io::BufWriter<std::fs::File>>,
    count: u64,
}

impl RejectsWriter {
    pub const HEADER: [&'static str; 5] = ["location", "mapping", "column", "error", "columns"];

    pub fn create(path: &Path) -> std::io::Result<RejectsWriter> {
        let mut writer = csv::Writer::from_writer(create_private(path)?);
        writer.write_record(Self::HEADER)?;
        Ok(RejectsWriter {
            path: path.to_path_buf(),
            writer,
            count: 0,
        })
    }

    /// One rejected row: its error and its raw cells under `header`.
    pub fn write(
        &mut self,
        mapping: &str,
        error: &RowError,
        header: Option<&Header>,
        raw: &[String],
    ) -> std::io::Result<()> {
        let mut cells = serde_json::Map::new();
        if let Some(h) = header {
            for (i, c) in h.columns.iter().enumerate() {
                cells.insert(
                    c.to_string(),
                    serde_json::Value::String(raw.get(i).cloned().unwrap_or_default()),
                );
            }
        }
        let columns = if cells.is_empty() {
            String::new()
        } else {
            serde_json::Value::Object(cells).to_string()
        };
        self.writer.write_record([
            error.location().to_string().as_str(),
            mapping,
            error.column().unwrap_or_default(),
            error.reason().as_str(),
            columns.as_str(),
        ])?;
        self.count += 1;
        Ok(())
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn finish(mut self) -> std::io::Result<()> {
        self.writer.flush()?;
        self.writer
            .into_inner()
            .map_err(|e| std::io::Error::other(e.to_string()))?
            .flush()
    }
}

/// The sha256 of a file's bytes, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::Severity;

    fn loc(row: u64) -> RowLocation {
        RowLocation {
            file: "labs.csv".into(),
            sheet: None,
            row,
        }
    }

    #[test]
    fn counts_add_up_and_groups_keep_few_rows() {
        let mut b = ReportBuilder::new("abc", true);
        let m = b.add_mapping("labs", "labs", "Observation");
        let warn = vec![(
            "Observation".to_string(),
            Issue {
                severity: Severity::Warning,
                path: "Observation.code".into(),
                message: "not in the priority set".into(),
            },
        )];
        for r in 2..10 {
            b.mapped(m, &loc(r), &["Observation"], &warn);
        }
        for r in 10..17 {
            b.rejected(
                m,
                &RowError::Unmapped {
                    location: loc(r),
                    column: Some("test_code".into()),
                    table: "lab_codes".into(),
                    code: "XYZ9".into(),
                },
            );
        }
        let r = b.finish();
        assert_eq!(r.rows_read, 15);
        assert_eq!(r.rows_rejected, 7);
        assert_eq!(r.mappings[0].rows_mapped + r.mappings[0].rows_rejected, 15);
        assert_eq!(r.resources["Observation"], 8);
        assert_eq!(r.unmapped_codes.len(), 1);
        assert_eq!(r.unmapped_codes[0].count, 7);
        assert_eq!(r.unmapped_codes[0].first_rows.len(), FIRST_ROWS);
        assert_eq!(r.unmapped_codes[0].first_rows[0], "labs.csv:10");
        assert_eq!(r.warnings[0].count, 8);
        assert!(r.summary().contains("XYZ9"));
    }

    #[cfg(unix)]
    #[test]
    fn rejects_are_private_and_keep_raw_cells() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rejects.csv");
        let mut w = RejectsWriter::create(&p).expect("create");
        let header = Header::new(["mrn", "value"]);
        let e = RowError::Required {
            location: loc(3),
            column: "value".into(),
        };
        w.write("labs", &e, Some(&header), &["000123".into(), "".into()])
            .expect("write");
        w.finish().expect("finish");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&p).expect("read");
        assert_eq!(
            text,
            "location,mapping,column,error,columns\nlabs.csv:3,labs,value,value: a required value is empty,\"{\"\"mrn\"\":\"\"000123\"\",\"\"value\"\":\"\"\"\"}\"\n"
        );
    }
}
