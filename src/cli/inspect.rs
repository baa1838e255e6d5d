//! `fhirlift inspect`: shows a file's rows exactly as the pipeline will see them.
//!
//! Exit codes: 0 when every row shown read cleanly; 1 when some rows had row errors or cell
//! errors (they are printed, marked, and counted); 2 when the file cannot be read at all (cannot
//! be opened, corrupt, unusable header, no data rows). This command only displays: it writes no
//! file and maps nothing.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use serde_json::{Map, Value as Json};

use super::{CommandResult, Outcome};
use crate::config::{Defaults, SheetRef, SourceConfig};
use crate::source::{self, ReadError, Row, RowError, SourceReader};

/// Rows the table format shows when no `--limit` is given.
const TABLE_ROWS: usize = 20;
/// Widest a table cell is printed before it is cut with `…`.
const TABLE_CELL: usize = 40;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InspectFormat {
    /// Aligned columns for reading (the first rows only unless --limit says otherwise).
    #[default]
    Table,
    /// One JSON object per row, keyed by header, with `_location` (and `_errors` when a cell failed).
    Ndjson,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The file: .csv/.tsv/.txt, .xlsx/.xlsm/.xls/.xlsb/.ods, or .parquet.
    pub file: PathBuf,
    /// Workbook sheet by name, or `#N` for the N-th sheet counting from 0. Default: the first.
    #[arg(long, value_name = "NAME")]
    pub sheet: Option<String>,
    /// CSV delimiter: one character, or `tab`. Default: detected (comma, semicolon, tab, pipe).
    #[arg(long, value_name = "C")]
    pub delimiter: Option<String>,
    /// CSV text encoding as the WHATWG Encoding Standard labels it (e.g. `windows-1252`).
    #[arg(long, value_name = "LABEL")]
    pub encoding: Option<String>,
    /// The row (workbook) or line (CSV) holding the header, from 1.
    #[arg(long, value_name = "N")]
    pub header_row: Option<u64>,
    /// IANA zone that naive date-times are checked against. Default: UTC.
    #[arg(long, value_name = "ZONE")]
    pub timezone: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub format: InspectFormat,
    /// Stop after N rows (table default: 20; ndjson default: all).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

impl InspectArgs {
    fn source_config(&self) -> SourceConfig {
        let mut cfg = SourceConfig::for_path(&self.file);
        cfg.sheet = self.sheet.as_deref().map(parse_sheet);
        cfg.delimiter = self.delimiter.clone();
        cfg.encoding = self.encoding.clone();
        cfg.header_row = self.header_row;
        cfg.timezone = self.timezone.clone();
        cfg
    }
}

/// `#2` is the third sheet; anything else is a name.
fn parse_sheet(s: &str) -> SheetRef {
    match s.strip_prefix('#').and_then(|n| n.parse().ok()) {
        Some(i) => SheetRef::Index(i),
        None => SheetRef::Name(s.to_string()),
    }
}

/// What was read, for the summary line and the exit code.
#[derive(Default)]
struct Tally {
    rows: u64,
    row_errors: u64,
    rows_with_cell_errors: u64,
}

impl Tally {
    fn count(&mut self, item: &Result<Row, ReadError>) {
        match item {
            Ok(row) => {
                self.rows += 1;
                if row.has_errors() {
                    self.rows_with_cell_errors += 1;
                }
            }
            Err(ReadError::Row(_)) => self.row_errors += 1,
            Err(ReadError::Fatal(_)) => {}
        }
    }

    fn outcome(&self) -> Outcome {
        if self.row_errors + self.rows_with_cell_errors > 0 {
            Outcome::RowsRejected
        } else {
            Outcome::Success
        }
    }
}

pub fn run(args: InspectArgs) -> CommandResult {
    let name = source::display_name(&args.file);
    let mut reader = source::open(&name, &args.source_config(), &Defaults::default())?;
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(64 * 1024, stdout.lock());
    let result = match args.format {
        InspectFormat::Ndjson => ndjson(&mut reader, args.limit, &mut out),
        InspectFormat::Table => table(&mut reader, args.limit.unwrap_or(TABLE_ROWS), &mut out),
    };
    let tally = match result.and_then(|t| out.flush().map(|()| t).map_err(Shown::Io)) {
        Ok(t) => t,
        // A closed pipe (`| head`) is the reader of our output being done, not a failure.
        Err(Shown::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(Outcome::Success),
        Err(Shown::Io(e)) => return Err(e.into()),
        Err(Shown::Fatal(e)) => {
            out.flush().ok();
            return Err(e.into());
        }
    };
    let location = match reader.sheet() {
        Some(s) => format!("{}[{}]", reader.file(), s),
        None => reader.file().to_string(),
    };
    if tally.rows + tally.row_errors == 0 && args.limit != Some(0) {
        return Err(format!("{location}: header only, no data rows").into());
    }
    eprintln!(
        "{location}: {} rows shown, {} with cell errors, {} row errors",
        tally.rows + tally.row_errors,
        tally.rows_with_cell_errors,
        tally.row_errors
    );
    Ok(tally.outcome())
}

/// Why showing stopped early.
enum Shown {
    Io(io::Error),
    Fatal(source::SourceError),
}

impl From<io::Error> for Shown {
    fn from(e: io::Error) -> Self {
        Shown::Io(e)
    }
}

fn take(
    reader: &mut SourceReader,
    limit: Option<usize>,
) -> impl Iterator<Item = Result<Row, ReadError>> + '_ {
    reader.take(limit.unwrap_or(usize::MAX))
}

fn ndjson(
    reader: &mut SourceReader,
    limit: Option<usize>,
    out: &mut impl Write,
) -> Result<Tally, Shown> {
    let mut tally = Tally::default();
    for item in take(reader, limit) {
        tally.count(&item);
        let object = match item {
            Ok(row) => row_object(&row),
            Err(ReadError::Row(e)) => row_error_object(&e),
            Err(ReadError::Fatal(e)) => return Err(Shown::Fatal(e)),
        };
        serde_json::to_writer(&mut *out, &Json::Object(object)).map_err(io::Error::from)?;
        out.write_all(b"\n")?;
    }
    Ok(tally)
}

/// A row as `inspect --format ndjson` prints it: `_location` first, then the columns, then
/// `_errors` when cells failed (each with the column, the raw text and the reason).
pub fn row_object(row: &Row) -> Map<String, Json> {
    let mut object = Map::with_capacity(row.values.len() + 2);
    object.insert("_location".into(), Json::String(row.location.to_string()));
    for (k, v) in row.header.columns.iter().zip(&row.values) {
        object.insert(k.to_string(), v.to_json());
    }
    if row.has_errors() {
        let errors = row
            .errors
            .iter()
            .map(|e| {
                let mut m = Map::new();
                m.insert("column".into(), Json::String(e.location.column.to_string()));
                m.insert("raw".into(), Json::String(e.raw.clone()));
                m.insert("error".into(), Json::String(e.reason.to_string()));
                Json::Object(m)
            })
            .collect();
        object.insert("_errors".into(), Json::Array(errors));
    }
    object
}

/// A record that could not be split into the header's columns.
fn row_error_object(e: &RowError) -> Map<String, Json> {
    let mut object = Map::new();
    object.insert("_location".into(), Json::String(e.location.to_string()));
    object.insert("_row_error".into(), Json::String(e.kind.to_string()));
    object.insert(
        "_raw".into(),
        Json::Array(e.raw.iter().cloned().map(Json::String).collect()),
    );
    object
}

fn table(reader: &mut SourceReader, limit: usize, out: &mut impl Write) -> Result<Tally, Shown> {
    let header = reader.header().clone();
    let mut tally = Tally::default();
    let mut lines: Vec<Vec<String>> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut fatal = None;
    for item in take(reader, Some(limit)) {
        tally.count(&item);
        match item {
            Ok(row) => {
                let mut cells = vec![row.location.row.to_string()];
                for (i, v) in row.values.iter().enumerate() {
                    let failed = row
                        .errors
                        .iter()
                        .find(|e| *e.location.column == *header.columns[i]);
                    cells.push(match failed {
                        Some(e) => format!("!{}", e.raw),
                        None if v.is_null() => "·".into(),
                        None => v.to_string(),
                    });
                }
                notes.extend(row.errors.iter().map(ToString::to_string));
                lines.push(cells);
            }
            Err(ReadError::Row(e)) => notes.push(e.to_string()),
            Err(ReadError::Fatal(e)) => {
                fatal = Some(e);
                break;
            }
        }
    }
    let mut titles = vec!["row".to_string()];
    titles.extend(header.columns.iter().map(|c| c.to_string()));
    let cut = |s: &str| -> String {
        let one_line = s.replace(['\r', '\n'], "⏎");
        if one_line.chars().count() > TABLE_CELL {
            let mut t: String = one_line.chars().take(TABLE_CELL - 1).collect();
            t.push('…');
            t
        } else {
            one_line
        }
    };
    let titles: Vec<String> = titles.iter().map(|t| cut(t)).collect();
    let lines: Vec<Vec<String>> = lines
        .iter()
        .map(|l| l.iter().map(|c| cut(c)).collect())
        .collect();
    let mut widths: Vec<usize> = titles.iter().map(|t| t.chars().count()).collect();
    for line in &lines {
        for (w, c) in widths.iter_mut().zip(line) {
            *w = (*w).max(c.chars().count());
        }
    }
    let print = |out: &mut dyn Write, cells: &[String]| -> io::Result<()> {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c}{}", " ".repeat(w - c.chars().count())))
            .collect();
        writeln!(out, "{}", padded.join("  ").trim_end())
    };
    print(out, &titles)?;
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    print(out, &rule)?;
    for line in &lines {
        print(out, line)?;
    }
    if !notes.is_empty() {
        writeln!(out)?;
        for n in &notes {
            writeln!(out, "! {n}")?;
        }
    }
    if let Some(e) = fatal {
        return Err(Shown::Fatal(e));
    }
    Ok(tally)
}
