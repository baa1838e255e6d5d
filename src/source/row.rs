//! The typed row model every reader produces and every later stage consumes.
//!
//! A [`Row`] is one record of a source, already passed through the typed ingestion layer: each cell
//! is a [`Value`] of the column's declared type, or a [`CellError`] that keeps the raw text so the
//! rejects file can show the value exactly as it was read.

use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime};
use rust_decimal::Decimal;

/// Where a row came from, as the user sees it.
///
/// Row numbers start at 1 and are the numbers a person sees: a spreadsheet's row number (header
/// rows included), or a CSV file's line number of the record's first line (header line included).
/// Printed as `registry.xlsx[Patients]:42`, or `labs.csv:17` when there is no sheet.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowLocation {
    /// The file's name as the user gave it (not an absolute path unless they gave one).
    pub file: Arc<str>,
    /// The sheet name, for workbooks.
    pub sheet: Option<Arc<str>>,
    /// 1-based row or line number, as described above.
    pub row: u64,
}

impl RowLocation {
    /// The location of one cell of this row.
    pub fn cell(&self, column: &str) -> CellLocation {
        CellLocation {
            row: self.clone(),
            column: column.into(),
        }
    }
}

impl fmt::Display for RowLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.sheet {
            Some(sheet) => write!(f, "{}[{}]:{}", self.file, sheet, self.row),
            None => write!(f, "{}:{}", self.file, self.row),
        }
    }
}

/// Where a cell came from: a [`RowLocation`] plus the column header.
/// Printed as `registry.xlsx[Patients]:42:birth_date`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CellLocation {
    pub row: RowLocation,
    pub column: Arc<str>,
}

impl fmt::Display for CellLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.row, self.column)
    }
}

/// One typed cell value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// An empty cell or a configured null token.
    Null,
    /// Text, kept exactly (leading zeros included).
    Text(String),
    Integer(i64),
    /// A decimal number; its scale is kept (`12.50` stays `12.50`).
    Decimal(Decimal),
    Boolean(bool),
    Date(NaiveDate),
    /// A date-time without an offset in the source; the mapping stage applies the configured zone.
    DateTime(NaiveDateTime),
    /// A date-time whose source carried an offset or a zone.
    DateTimeTz(DateTime<FixedOffset>),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    /// The JSON form `inspect --format ndjson` prints and templates see.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value as J;
        match self {
            Value::Null => J::Null,
            Value::Text(s) => J::String(s.clone()),
            Value::Integer(i) => J::from(*i),
            Value::Decimal(d) => decimal_to_json(d),
            Value::Boolean(b) => J::Bool(*b),
            Value::Date(d) => J::String(d.format("%Y-%m-%d").to_string()),
            Value::DateTime(dt) => J::String(format_naive_datetime(dt)),
            Value::DateTimeTz(dt) => {
                J::String(dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false))
            }
        }
    }
}

/// A naive date-time in RFC 3339 layout without an offset (`2024-03-01T08:30:00`).
pub fn format_naive_datetime(dt: &NaiveDateTime) -> String {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (dt.year(), dt.nanosecond());
    // Written by hand (it runs once per date-time cell); chrono's `%.f` layout for the
    // fraction and years outside 0..=9999 go through chrono.
    if !(0..=9999).contains(&year) || nanos != 0 {
        return dt.format("%Y-%m-%dT%H:%M:%S%.f").to_string();
    }
    let mut out = String::with_capacity(25);
    push_iso_seconds(&mut out, dt);
    out
}

/// Appends `YYYY-MM-DDTHH:MM:SS` (the fraction of a second left out). The year must be within
/// 0..=9999.
pub(crate) fn push_iso_seconds(out: &mut String, dt: &NaiveDateTime) {
    use chrono::{Datelike, Timelike};
    let year = dt.year().clamp(0, 9999) as u32;
    let parts = [
        (year / 100, None),
        (year % 100, Some('-')),
        (dt.month(), Some('-')),
        (dt.day(), Some('T')),
        (dt.hour(), Some(':')),
        (dt.minute(), Some(':')),
        (dt.second(), None),
    ];
    for (n, sep) in parts {
        push_two_digits(out, n);
        if let Some(c) = sep {
            out.push(c);
        }
    }
}

/// Appends `n % 100` as two digits.
pub(crate) fn push_two_digits(out: &mut String, n: u32) {
    out.push(char::from(b'0' + (n / 10 % 10) as u8));
    out.push(char::from(b'0' + (n % 10) as u8));
}

/// Decimals become JSON numbers with their written scale (serde_json's `arbitrary_precision`).
fn decimal_to_json(d: &Decimal) -> serde_json::Value {
    let text = d.to_string();
    serde_json::from_str::<serde_json::Number>(&text)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::String(text))
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => Ok(()),
            Value::Text(s) => f.write_str(s),
            Value::Integer(i) => write!(f, "{i}"),
            Value::Decimal(d) => write!(f, "{d}"),
            Value::Boolean(b) => write!(f, "{b}"),
            Value::Date(d) => write!(f, "{}", d.format("%Y-%m-%d")),
            Value::DateTime(dt) => f.write_str(&format_naive_datetime(dt)),
            Value::DateTimeTz(dt) => {
                f.write_str(&dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false))
            }
        }
    }
}

/// The column types a schema may declare.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    String,
    Integer,
    Decimal,
    Boolean,
    Date,
    Datetime,
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ColumnType::String => "string",
            ColumnType::Integer => "integer",
            ColumnType::Decimal => "decimal",
            ColumnType::Boolean => "boolean",
            ColumnType::Date => "date",
            ColumnType::Datetime => "datetime",
        })
    }
}

/// A cell whose value could not be read as its column's type, or that the source marked as an
/// error (an Excel `#N/A`). The raw text is kept for the rejects file.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{location}: {reason}")]
pub struct CellError {
    pub location: CellLocation,
    /// The value as it stood in the source, rendered as text.
    pub raw: String,
    pub reason: CellErrorKind,
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum CellErrorKind {
    /// The value does not fit the declared type.
    #[error("expected {expected}{}", format_hint(.hint))]
    Type {
        expected: ColumnType,
        hint: Option<String>,
    },
    /// The spreadsheet holds an error value such as `#N/A` or `#DIV/0!`.
    #[error("spreadsheet error cell {0}")]
    Spreadsheet(String),
}

fn format_hint(hint: &Option<String>) -> String {
    match hint {
        Some(h) => format!(" ({h})"),
        None => String::new(),
    }
}

/// The header of a source: column names in source order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub columns: Vec<Arc<str>>,
}

impl Header {
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Arc<str>>,
    {
        Header {
            columns: names.into_iter().map(Into::into).collect(),
        }
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| &**c == name)
    }

    pub fn len(&self) -> usize {
        self.columns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }
}

/// One record, typed.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub location: RowLocation,
    pub header: Arc<Header>,
    /// One value per header column; a cell in `errors` is `Value::Null` here.
    pub values: Vec<Value>,
    /// The cells exactly as read, before typing, for the rejects file.
    pub raw: Vec<String>,
    /// Cells that failed typing. A row with errors is rejected by the mapping stage.
    pub errors: Vec<CellError>,
}

impl Row {
    /// The value of a column by name.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.header
            .index_of(column)
            .and_then(|i| self.values.get(i))
    }

    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The row as a JSON object keyed by header, in column order.
    pub fn to_json_object(&self) -> serde_json::Map<String, serde_json::Value> {
        self.header
            .columns
            .iter()
            .zip(&self.values)
            .map(|(k, v)| (k.to_string(), v.to_json()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_times_are_written_as_chrono_writes_them() {
        let cases = [
            (2024, 3, 1, 8, 5, 9, 0),
            (812, 12, 31, 23, 59, 59, 0),
            (2024, 1, 2, 0, 0, 0, 250_000_000),
            (10_000, 1, 1, 0, 0, 0, 0),
        ];
        for (y, mo, d, h, mi, s, ns) in cases {
            let dt = chrono::NaiveDate::from_ymd_opt(y, mo, d)
                .and_then(|d| d.and_hms_nano_opt(h, mi, s, ns))
                .expect("valid date-time");
            assert_eq!(
                format_naive_datetime(&dt),
                dt.format("%Y-%m-%dT%H:%M:%S%.f").to_string()
            );
        }
    }

    fn loc(sheet: Option<&str>) -> RowLocation {
        RowLocation {
            file: "registry.xlsx".into(),
            sheet: sheet.map(Into::into),
            row: 42,
        }
    }

    #[test]
    fn locations_print_as_users_read_them() {
        assert_eq!(
            loc(Some("Patients")).to_string(),
            "registry.xlsx[Patients]:42"
        );
        assert_eq!(loc(None).to_string(), "registry.xlsx:42");
        assert_eq!(
            loc(Some("Patients")).cell("birth_date").to_string(),
            "registry.xlsx[Patients]:42:birth_date"
        );
    }

    #[test]
    fn values_print_as_json_by_type() {
        let d: Decimal = "12.50".parse().expect("decimal literal");
        assert_eq!(Value::Decimal(d).to_json().to_string(), "12.50");
        assert_eq!(Value::Integer(12345).to_json().to_string(), "12345");
        assert_eq!(
            Value::Text("00123".into()).to_json().to_string(),
            "\"00123\""
        );
        let date = NaiveDate::from_ymd_opt(2024, 2, 29).expect("valid date");
        assert_eq!(Value::Date(date).to_json().to_string(), "\"2024-02-29\"");
        let tz = DateTime::parse_from_rfc3339("2024-03-01T08:30:00-05:00").expect("rfc3339");
        assert_eq!(
            Value::DateTimeTz(tz).to_json().to_string(),
            "\"2024-03-01T08:30:00-05:00\""
        );
        assert_eq!(Value::Null.to_json(), serde_json::Value::Null);
    }

    #[test]
    fn cell_errors_name_the_cell_and_the_type() {
        let err = CellError {
            location: loc(Some("Patients")).cell("birth_date"),
            raw: "13/45/2020".into(),
            reason: CellErrorKind::Type {
                expected: ColumnType::Date,
                hint: Some("format %m/%d/%Y".into()),
            },
        };
        assert_eq!(
            err.to_string(),
            "registry.xlsx[Patients]:42:birth_date: expected date (format %m/%d/%Y)"
        );
    }
}
