//! Source readers: CSV, Excel workbooks and Parquet files in, typed [`Row`]s out.
//!
//! Each format has its own file ([`csv`], [`excel`], [`parquet`]); all of them hand raw cells to the
//! typed ingestion layer ([`schema`]) so that a column's declared type means the same thing whatever
//! the file format. Readers stream: CSV and Parquet never hold a whole file's rows in memory (a
//! workbook sheet is held as one grid, which is how the spreadsheet libraries read them).
//!
//! What this module must not do: decide what a row means (that is mapping), drop or coerce a value
//! that does not fit its type (that is a [`CellError`] kept in the row), or log cell values above
//! TRACE.

pub mod csv;
pub mod excel;
pub mod parquet;
pub mod row;
pub mod schema;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use row::{
    CellError, CellErrorKind, CellLocation, ColumnType, Header, Row, RowLocation, Value,
};
pub use schema::{Schema, localize};

use crate::config::{Defaults, SheetRef, SourceConfig, SourceFormat};

/// A problem that stops reading a source: it cannot be opened, is corrupt, or its header is
/// unusable. Every variant names the file (and the sheet or line when known).
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{}: cannot open: {source}", .path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: read failed{}: {source}", .path.display(), line_suffix(*.line))]
    Io {
        path: PathBuf,
        /// The line (CSV) where reading failed, when known.
        line: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}: cannot tell the file format from its name; set format = \"csv\", \"xlsx\", \"parquet\", …",
        .path.display()
    )]
    UnknownFormat { path: PathBuf },
    /// A source option (delimiter, encoding, time zone, header row) that cannot be used.
    #[error("{}: {option}: {message}", .path.display())]
    Option {
        path: PathBuf,
        option: &'static str,
        message: String,
    },
    #[error("{file}: the file is empty (no header row)")]
    Empty { file: Arc<str> },
    #[error("{location}: no header row here (the source ends before it)")]
    NoHeader { location: RowLocation },
    #[error("{location}: column {position} has a blank header; every column needs a name")]
    BlankHeader {
        location: RowLocation,
        /// 1-based column position (A = 1 in a spreadsheet).
        position: usize,
    },
    #[error("{location}: header {name:?} appears twice (columns {first} and {second})")]
    DuplicateHeader {
        location: RowLocation,
        name: String,
        first: usize,
        second: usize,
    },
    #[error(
        "{location}: header {name:?} is not valid text in the file's encoding; set the source's encoding (e.g. \"windows-1252\")"
    )]
    UndecodableHeader { location: RowLocation, name: String },
    #[error("{file}: declared column(s) {} not in the header (columns: {}); if the header is on a later row, set the source's header_row", quoted(.missing), quoted(.available))]
    MissingColumns {
        file: String,
        missing: Vec<String>,
        available: Vec<String>,
    },
    #[error("{}: not a readable {kind} workbook: {source}", .path.display())]
    Workbook {
        path: PathBuf,
        kind: &'static str,
        #[source]
        source: calamine::Error,
    },
    /// A workbook that would take unbounded memory to read: a compressed part that inflates past
    /// the limit (a zip bomb), or a sheet whose cells span a grid too large to hold.
    #[error("{location}: refused: {reason}")]
    TooLarge { location: String, reason: String },
    #[error("{}: no sheet {sheet} (sheets: {})", .path.display(), quoted(.available))]
    SheetNotFound {
        path: PathBuf,
        sheet: SheetRef,
        available: Vec<String>,
    },
    #[error("{}: not a readable Parquet file: {source}", .path.display())]
    Parquet {
        path: PathBuf,
        #[source]
        source: polars::error::PolarsError,
    },
}

fn line_suffix(line: Option<u64>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A problem with one record that does not stop reading: the record goes to the rejects file with
/// its raw cells, and the reader moves on to the next one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{location}: {kind}")]
pub struct RowError {
    pub location: RowLocation,
    /// The record's cells as read (lossily decoded when the bytes were not valid text).
    pub raw: Vec<String>,
    pub kind: RowErrorKind,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum RowErrorKind {
    /// The record has a different number of fields than the header.
    #[error("{found} fields, but the header has {expected}")]
    Ragged { expected: usize, found: usize },
    /// A field is not valid text in the source's encoding.
    #[error(
        "field {field} is not valid UTF-8 (byte {byte_offset} of the field); set the source's encoding, e.g. encoding = \"windows-1252\""
    )]
    Undecodable {
        /// 1-based field position.
        field: usize,
        byte_offset: usize,
    },
    /// A spreadsheet cell holds a value in a column that has no header.
    #[error(
        "column {position} holds a value but has no header (if the header is on a later row, set the source's header_row)"
    )]
    OutsideHeader { position: usize },
}

/// What reading one record can produce besides a [`Row`]. The two cases are kept apart in the
/// type because callers must treat them differently: a row error is recorded and reading goes on;
/// a fatal error ends the source.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Row(#[from] RowError),
    #[error(transparent)]
    Fatal(#[from] SourceError),
}

impl ReadError {
    pub fn is_fatal(&self) -> bool {
        matches!(self, ReadError::Fatal(_))
    }
}

/// A cell as a format reader hands it to the ingestion layer, before the column schema applies.
#[derive(Clone, Debug, PartialEq)]
pub enum RawCell {
    Empty,
    Text(String),
    Int(i64),
    /// A spreadsheet number (binary floating point). The ingestion layer reads it to 15
    /// significant digits, as a spreadsheet shows it (so `0.1 + 0.2` reads `0.3`).
    Float(f64),
    Bool(bool),
    Decimal(rust_decimal::Decimal),
    Date(chrono::NaiveDate),
    DateTime(chrono::NaiveDateTime),
    DateTimeTz(chrono::DateTime<chrono::FixedOffset>),
    /// A spreadsheet error value (`#N/A`) or a value the format reader could not represent; the
    /// text is shown as the raw value and the kind says why.
    Invalid(String, CellErrorKind),
}

/// One record as a format reader produced it.
#[derive(Debug)]
pub(crate) struct RawRow {
    pub row: u64,
    pub cells: Vec<RawCell>,
}

/// The format-specific part of a reader.
enum Inner {
    Csv(csv::CsvRows),
    Excel(excel::ExcelRows),
    Parquet(parquet::ParquetRows),
}

impl Inner {
    fn next_raw(&mut self) -> Option<Result<RawRow, ReadError>> {
        match self {
            Inner::Csv(r) => r.next_raw(),
            Inner::Excel(r) => r.next_raw(),
            Inner::Parquet(r) => r.next_raw(),
        }
    }
}

/// A streaming reader over one source: yields typed rows in source order.
///
/// After a fatal error the reader is finished and yields nothing more.
pub struct SourceReader {
    name: String,
    header: Arc<Header>,
    file: Arc<str>,
    sheet: Option<Arc<str>>,
    schema: Schema,
    inner: Inner,
    finished: bool,
}

impl std::fmt::Debug for SourceReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceReader")
            .field("name", &self.name)
            .field("file", &self.file)
            .field("sheet", &self.sheet)
            .field("columns", &self.header.len())
            .finish()
    }
}

impl SourceReader {
    /// The source's name in the config (or the file name for `inspect`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn header(&self) -> &Arc<Header> {
        &self.header
    }

    /// The file name as rows' locations print it.
    pub fn file(&self) -> &Arc<str> {
        &self.file
    }

    /// The sheet read, for workbooks.
    pub fn sheet(&self) -> Option<&Arc<str>> {
        self.sheet.as_ref()
    }

    /// The typing rules in force (declared columns, null tokens, time zone).
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// The zone naive date-times of this source are in.
    pub fn timezone(&self) -> chrono_tz::Tz {
        self.schema.timezone()
    }

    /// Up to `n` results, in order. Fewer means the source is finished; a fatal error, if any, is
    /// the last element.
    pub fn next_batch(&mut self, n: usize) -> Vec<Result<Row, ReadError>> {
        let mut out = Vec::with_capacity(n.min(4096));
        for item in self.by_ref().take(n) {
            out.push(item);
        }
        out
    }

    fn location(&self, row: u64) -> RowLocation {
        RowLocation {
            file: self.file.clone(),
            sheet: self.sheet.clone(),
            row,
        }
    }
}

impl Iterator for SourceReader {
    type Item = Result<Row, ReadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finished {
            return None;
        }
        match self.inner.next_raw() {
            None => {
                self.finished = true;
                None
            }
            Some(Err(e)) => {
                if e.is_fatal() {
                    self.finished = true;
                }
                Some(Err(e))
            }
            Some(Ok(raw)) => {
                let location = self.location(raw.row);
                Some(Ok(self.schema.apply(location, &self.header, raw.cells)))
            }
        }
    }
}

/// The options a format reader needs, resolved from a source's config and the defaults.
#[derive(Clone, Debug)]
pub(crate) struct OpenOptions<'a> {
    pub path: &'a Path,
    pub file: Arc<str>,
    pub sheet: Option<&'a SheetRef>,
    pub header_row: Option<u64>,
    pub delimiter: Option<u8>,
    pub encoding: Option<&'static encoding_rs::Encoding>,
}

/// Opens a configured source: checks its options, reads its header, checks that every declared
/// column exists, and returns a reader positioned at the first record.
pub fn open(
    name: &str,
    cfg: &SourceConfig,
    defaults: &Defaults,
) -> Result<SourceReader, SourceError> {
    let path = cfg.path.as_path();
    let format = cfg
        .resolved_format()
        .ok_or_else(|| SourceError::UnknownFormat {
            path: path.to_path_buf(),
        })?;
    let option_error = |option: &'static str, message: String| SourceError::Option {
        path: path.to_path_buf(),
        option,
        message,
    };
    let delimiter = match &cfg.delimiter {
        Some(d) => Some(crate::config::parse_delimiter(d).ok_or_else(|| {
            option_error(
                "delimiter",
                format!("{d:?} is not one ASCII character (or \"tab\")"),
            )
        })?),
        None => None,
    };
    let encoding = match &cfg.encoding {
        Some(label) => Some(
            encoding_rs::Encoding::for_label(label.as_bytes()).ok_or_else(|| {
                option_error(
                    "encoding",
                    format!("unknown encoding label {label:?} (use a WHATWG label such as \"windows-1252\")"),
                )
            })?,
        ),
        None => None,
    };
    if cfg.header_row == Some(0) {
        return Err(option_error(
            "header_row",
            "rows are numbered from 1".into(),
        ));
    }
    let zone_name = cfg
        .timezone
        .as_deref()
        .or(defaults.timezone.as_deref())
        .unwrap_or("UTC");
    let timezone: chrono_tz::Tz = zone_name
        .parse()
        .map_err(|_| option_error("timezone", format!("unknown IANA time zone {zone_name:?}")))?;
    let null_tokens = cfg
        .null_tokens
        .clone()
        .or_else(|| defaults.null_tokens.clone())
        .unwrap_or_else(|| {
            crate::config::DEFAULT_NULL_TOKENS
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
    let file: Arc<str> = display_name(path).into();
    let opts = OpenOptions {
        path,
        file: file.clone(),
        sheet: cfg.sheet.as_ref(),
        header_row: cfg.header_row,
        delimiter,
        encoding,
    };
    let (header, sheet, inner) = match format {
        SourceFormat::Csv => {
            let (header, rows) = csv::CsvRows::open(&opts)?;
            (header, None, Inner::Csv(rows))
        }
        SourceFormat::Parquet => {
            let (header, rows) = parquet::ParquetRows::open(&opts)?;
            (header, None, Inner::Parquet(rows))
        }
        SourceFormat::Xlsx
        | SourceFormat::Xlsm
        | SourceFormat::Xls
        | SourceFormat::Xlsb
        | SourceFormat::Ods => {
            let (header, sheet, rows) = excel::ExcelRows::open(&opts, format)?;
            (header, Some(sheet), Inner::Excel(rows))
        }
    };
    let header = Arc::new(header);
    let schema = Schema::new(&header, &cfg.columns, null_tokens, timezone);
    let missing: Vec<String> = cfg
        .columns
        .keys()
        .filter(|c| header.index_of(c).is_none())
        .cloned()
        .collect();
    if !missing.is_empty() {
        let file = match &sheet {
            Some(s) => format!("{file}[{s}]"),
            None => file.to_string(),
        };
        return Err(SourceError::MissingColumns {
            file,
            missing,
            available: header.columns.iter().map(|c| c.to_string()).collect(),
        });
    }
    tracing::debug!(source = name, file = %file, columns = header.len(), "Source opened");
    Ok(SourceReader {
        name: name.to_string(),
        header,
        file,
        sheet,
        schema,
        inner,
        finished: false,
    })
}

/// Opens every source of a pipeline (reading headers only) and records each one that cannot be
/// opened or lacks a declared column. Touches no network and writes nothing. A source whose
/// options the config check already faulted is not opened, so one mistake is reported once.
pub fn check_sources(
    config: &crate::config::PipelineConfig,
    problems: &mut crate::config::Problems,
) {
    let faulted: Vec<String> = config
        .problems()
        .into_iter()
        .filter_map(|e| match e {
            crate::config::ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        })
        .collect();
    let defaults_faulted = faulted.iter().any(|k| k.starts_with("defaults."));
    for (name, cfg) in &config.sources {
        let prefix = format!("sources.{name}.");
        if defaults_faulted || faulted.iter().any(|k| k.starts_with(&prefix)) {
            continue;
        }
        if let Err(e) = open(name, cfg, &config.defaults) {
            problems.push(format!("sources.{name}"), &e);
        }
    }
}

/// Opens a file from its path alone (format from the extension, everything else detected or
/// default), as `inspect` does. `cfg` may carry the flags' overrides.
pub fn open_path(path: &Path) -> Result<SourceReader, SourceError> {
    open(
        &display_name(path),
        &SourceConfig::for_path(path),
        &Defaults::default(),
    )
}

/// The name rows' locations print: the file's own name, without its folders.
pub fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Builds a header from the names a format read: surrounding spaces trimmed, none blank, none
/// repeated. `first_column` is the 1-based position of the first name (a sheet may start at
/// column C).
pub(crate) fn build_header(
    location: &RowLocation,
    names: Vec<String>,
    first_column: usize,
) -> Result<Header, SourceError> {
    let names: Vec<String> = names.into_iter().map(|n| n.trim().to_string()).collect();
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for (i, name) in names.iter().enumerate() {
        let position = first_column + i;
        if name.is_empty() {
            return Err(SourceError::BlankHeader {
                location: location.clone(),
                position,
            });
        }
        if let Some(first) = seen.insert(name.as_str(), position) {
            return Err(SourceError::DuplicateHeader {
                location: location.clone(),
                name: name.clone(),
                first,
                second: position,
            });
        }
    }
    Ok(Header::new(names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readers_can_move_to_another_thread() {
        fn send<T: Send>() {}
        send::<SourceReader>();
        send::<Row>();
        send::<ReadError>();
    }

    #[test]
    fn configured_null_tokens_and_zone_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.csv");
        std::fs::write(
            &path,
            "a,when\n-,2024-03-10 02:30:00\nNA,2024-03-10 03:30:00\n",
        )
        .expect("write");
        let mut cfg = SourceConfig::for_path(&path);
        cfg.null_tokens = Some(vec!["-".into()]);
        cfg.columns.insert(
            "when".into(),
            crate::config::ColumnSpec {
                kind: ColumnType::Datetime,
                formats: vec![],
                decimal_comma: false,
                pad_zeros: None,
            },
        );
        let defaults = Defaults {
            timezone: Some("America/New_York".into()),
            null_tokens: None,
        };
        let rows: Vec<Row> = open("t", &cfg, &defaults)
            .expect("open")
            .map(|r| r.expect("row"))
            .collect();
        assert_eq!(rows[0].values[0], Value::Null);
        // Only the configured tokens count: "NA" is text here.
        assert_eq!(rows[1].values[0], Value::Text("NA".into()));
        // 02:30 on 10 March 2024 was skipped in New York.
        assert_eq!(rows[0].errors.len(), 1);
        assert_eq!(rows[0].errors[0].location.to_string(), "t.csv:2:when");
        assert!(rows[1].errors.is_empty());
    }

    #[test]
    fn missing_declared_columns_are_listed_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a,b\n1,2\n").expect("write");
        let mut cfg = SourceConfig::for_path(&path);
        for c in ["x", "y"] {
            cfg.columns.insert(
                c.into(),
                crate::config::ColumnSpec {
                    kind: ColumnType::String,
                    formats: vec![],
                    decimal_comma: false,
                    pad_zeros: None,
                },
            );
        }
        let err = open("t", &cfg, &Defaults::default()).expect_err("missing columns");
        assert_eq!(
            err.to_string(),
            "t.csv: declared column(s) \"x\", \"y\" not in the header (columns: \"a\", \"b\"); if the header is on a later row, set the source's header_row"
        );
    }
}
