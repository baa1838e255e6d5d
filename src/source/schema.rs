//! The typed ingestion layer: turns the raw cells of any format into [`Value`]s of each column's
//! declared type, the same way for CSV, workbooks and Parquet.
//!
//! Rules, in order: empty cells and null tokens become [`Value::Null`]; a declared column's value
//! is converted to its type or becomes a [`CellError`] that keeps the raw text; an undeclared
//! column keeps the type the format gave it (text for CSV). Naive date-times must exist in the
//! source's zone (a local time skipped by a clock change is an error). This layer never guesses:
//! a number is never read as a date serial, a fractional number never rounded to an integer.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, NaiveTime, TimeZone};
use rust_decimal::Decimal;

use super::RawCell;
use super::row::{
    CellError, CellErrorKind, ColumnType, Header, Row, RowLocation, Value, format_naive_datetime,
};
use crate::config::ColumnSpec;

/// ISO layouts accepted for naive date-times after a column's own formats.
const ISO_DATETIME: &[&str] = &[
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
];
/// ISO layouts with an offset, beyond RFC 3339 itself.
const ISO_DATETIME_TZ: &[&str] = &["%Y-%m-%d %H:%M:%S%.f%:z", "%Y-%m-%d %H:%M:%S%.f%#z"];

/// The typing rules for one opened source.
#[derive(Clone, Debug)]
pub struct Schema {
    /// The declared spec of each header column, by position.
    specs: Vec<Option<ColumnSpec>>,
    null_tokens: Vec<String>,
    timezone: chrono_tz::Tz,
}

impl Schema {
    /// Binds declared column specs to a header's positions. Declared columns missing from the
    /// header are the caller's to report.
    pub fn new(
        header: &Header,
        columns: &BTreeMap<String, ColumnSpec>,
        null_tokens: Vec<String>,
        timezone: chrono_tz::Tz,
    ) -> Schema {
        let specs = header
            .columns
            .iter()
            .map(|c| columns.get(&**c).cloned())
            .collect();
        let null_tokens = null_tokens
            .into_iter()
            .map(|t| t.trim().to_string())
            .collect();
        Schema {
            specs,
            null_tokens,
            timezone,
        }
    }

    /// The declared spec of a column position, if any.
    pub fn spec(&self, index: usize) -> Option<&ColumnSpec> {
        self.specs.get(index).and_then(Option::as_ref)
    }

    pub fn timezone(&self) -> chrono_tz::Tz {
        self.timezone
    }

    pub fn null_tokens(&self) -> &[String] {
        &self.null_tokens
    }

    /// Types one record. Cells beyond the header are ignored (readers report them first); missing
    /// cells are empty.
    pub(crate) fn apply(
        &self,
        location: RowLocation,
        header: &Arc<Header>,
        cells: Vec<RawCell>,
    ) -> Row {
        let width = header.len();
        let mut values = Vec::with_capacity(width);
        let mut raw = Vec::with_capacity(width);
        let mut errors = Vec::new();
        let mut cells = cells.into_iter();
        for index in 0..width {
            let cell = cells.next().unwrap_or(RawCell::Empty);
            let text = raw_text(&cell);
            match self.convert(cell, self.spec(index)) {
                Ok(v) => values.push(v),
                Err(reason) => {
                    errors.push(CellError {
                        location: location.cell(&header.columns[index]),
                        raw: text.clone(),
                        reason,
                    });
                    values.push(Value::Null);
                }
            }
            raw.push(text);
        }
        Row {
            location,
            header: header.clone(),
            values,
            raw,
            errors,
        }
    }

    fn is_null_token(&self, text: &str) -> bool {
        let t = text.trim();
        t.is_empty() || self.null_tokens.iter().any(|n| n == t)
    }

    /// One cell to its value.
    fn convert(&self, cell: RawCell, spec: Option<&ColumnSpec>) -> Result<Value, CellErrorKind> {
        if let RawCell::Text(t) = &cell
            && self.is_null_token(t)
        {
            return Ok(Value::Null);
        }
        let value = match (cell, spec) {
            (RawCell::Empty, _) => Value::Null,
            (RawCell::Invalid(_, kind), _) => return Err(kind),
            (cell, None) => native(cell)?,
            (cell, Some(spec)) => typed(cell, spec)?,
        };
        if let Value::DateTime(dt) = &value
            && localize(dt, self.timezone).is_none()
        {
            return Err(CellErrorKind::Type {
                expected: ColumnType::Datetime,
                hint: Some(format!(
                    "this local time does not exist in {} (clock change)",
                    self.timezone
                )),
            });
        }
        Ok(value)
    }
}

/// A naive local date-time placed in a zone. An ambiguous time (the repeated hour when clocks go
/// back) takes the earlier instant; a time skipped when clocks go forward has none.
pub fn localize(dt: &NaiveDateTime, zone: chrono_tz::Tz) -> Option<DateTime<FixedOffset>> {
    zone.from_local_datetime(dt)
        .earliest()
        .map(|t| t.fixed_offset())
}

/// The raw text of a cell, for the rejects file and for error messages' `raw`.
pub fn raw_text(cell: &RawCell) -> String {
    match cell {
        RawCell::Empty => String::new(),
        RawCell::Text(s) => s.clone(),
        RawCell::Int(i) => i.to_string(),
        RawCell::Float(f) => match spreadsheet_decimal(*f) {
            Ok(d) => d.to_string(),
            Err(_) => f.to_string(),
        },
        RawCell::Bool(b) => b.to_string(),
        RawCell::Decimal(d) => d.to_string(),
        RawCell::Date(d) => d.format("%Y-%m-%d").to_string(),
        RawCell::DateTime(dt) => format_naive_datetime(dt),
        RawCell::DateTimeTz(dt) => dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false),
        RawCell::Invalid(s, _) => s.clone(),
    }
}

fn type_error(expected: ColumnType, hint: impl Into<String>) -> CellErrorKind {
    CellErrorKind::Type {
        expected,
        hint: Some(hint.into()),
    }
}

/// A spreadsheet number as a person sees it: 15 significant digits, trailing zeros dropped.
fn spreadsheet_decimal(f: f64) -> Result<Decimal, CellErrorKind> {
    if !f.is_finite() {
        return Err(type_error(ColumnType::Decimal, "not a finite number"));
    }
    Decimal::from_scientific(&format!("{f:.14e}"))
        .map(|d| d.normalize())
        .map_err(|_| type_error(ColumnType::Decimal, "out of the supported range"))
}

/// A decimal with no fractional part as an `i64`.
fn whole(d: &Decimal) -> Option<i64> {
    if d.fract().is_zero() {
        i64::try_from(d.trunc()).ok()
    } else {
        None
    }
}

/// A value keeping the type the format gave it.
fn native(cell: RawCell) -> Result<Value, CellErrorKind> {
    Ok(match cell {
        RawCell::Empty => Value::Null,
        RawCell::Text(s) => Value::Text(s),
        RawCell::Int(i) => Value::Integer(i),
        // Whole spreadsheet numbers are integers: an MRN typed as a number is 12345, not 12345.0.
        RawCell::Float(f) => {
            let d = spreadsheet_decimal(f)?;
            match whole(&d) {
                Some(i) => Value::Integer(i),
                None => Value::Decimal(d),
            }
        }
        RawCell::Bool(b) => Value::Boolean(b),
        RawCell::Decimal(d) => Value::Decimal(d),
        RawCell::Date(d) => Value::Date(d),
        RawCell::DateTime(dt) => Value::DateTime(dt),
        RawCell::DateTimeTz(dt) => Value::DateTimeTz(dt),
        RawCell::Invalid(_, kind) => return Err(kind),
    })
}

/// A value converted to a declared type.
fn typed(cell: RawCell, spec: &ColumnSpec) -> Result<Value, CellErrorKind> {
    match spec.kind {
        ColumnType::String => to_string(cell).map(|v| match (v, spec.pad_zeros) {
            (Value::Text(s), Some(width)) => Value::Text(pad_zeros(s, usize::from(width))),
            (v, _) => v,
        }),
        ColumnType::Integer => to_integer(cell),
        ColumnType::Decimal => to_decimal(cell, spec.decimal_comma),
        ColumnType::Boolean => to_boolean(cell),
        ColumnType::Date => to_date(cell, &spec.formats),
        ColumnType::Datetime => to_datetime(cell, &spec.formats),
    }
}

fn to_string(cell: RawCell) -> Result<Value, CellErrorKind> {
    Ok(match cell {
        RawCell::Text(s) => Value::Text(s),
        other => match native(other)? {
            Value::Null => Value::Null,
            v => Value::Text(v.to_string()),
        },
    })
}

/// Digits shorter than `width` with leading zeros added; anything else as it is.
fn pad_zeros(s: String, width: usize) -> String {
    let digits = s.trim();
    if digits.is_empty() || digits.len() >= width || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return s;
    }
    format!("{digits:0>width$}")
}

fn parse_decimal(text: &str) -> Option<Decimal> {
    let t = text.trim();
    if t.contains(['e', 'E']) {
        Decimal::from_scientific(t).ok()
    } else {
        Decimal::from_str(t).ok()
    }
}

fn to_integer(cell: RawCell) -> Result<Value, CellErrorKind> {
    let expected = ColumnType::Integer;
    let fractional = || type_error(expected, "has a fractional part");
    match cell {
        RawCell::Int(i) => Ok(Value::Integer(i)),
        RawCell::Text(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                return Ok(Value::Integer(i));
            }
            match parse_decimal(t) {
                Some(d) => whole(&d).map(Value::Integer).ok_or_else(fractional),
                None => Err(CellErrorKind::Type {
                    expected,
                    hint: None,
                }),
            }
        }
        RawCell::Float(f) => {
            let d =
                spreadsheet_decimal(f).map_err(|_| type_error(expected, "not a finite number"))?;
            whole(&d).map(Value::Integer).ok_or_else(fractional)
        }
        RawCell::Decimal(d) => whole(&d).map(Value::Integer).ok_or_else(fractional),
        other => Err(type_error(expected, found(&other))),
    }
}

fn to_decimal(cell: RawCell, decimal_comma: bool) -> Result<Value, CellErrorKind> {
    let expected = ColumnType::Decimal;
    match cell {
        RawCell::Int(i) => Ok(Value::Decimal(Decimal::from(i))),
        RawCell::Float(f) => spreadsheet_decimal(f).map(Value::Decimal),
        RawCell::Decimal(d) => Ok(Value::Decimal(d)),
        RawCell::Text(s) if decimal_comma => {
            if s.contains('.') {
                return Err(type_error(
                    expected,
                    "decimal_comma is set, so a point is refused (it may group thousands); \
                     write decimals as 12,5 and no grouping",
                ));
            }
            parse_decimal(&s.replacen(',', ".", 1))
                .map(Value::Decimal)
                .ok_or(CellErrorKind::Type {
                    expected,
                    hint: Some("a number like 12,5".into()),
                })
        }
        RawCell::Text(s) => parse_decimal(&s).map(Value::Decimal).ok_or_else(|| {
            let t = s.trim();
            let comma_decimal =
                t.matches(',').count() == 1 && t.replace(',', "").parse::<Decimal>().is_ok();
            CellErrorKind::Type {
                expected,
                hint: comma_decimal.then(|| {
                    "a decimal comma? set decimal_comma = true on this column".to_string()
                }),
            }
        }),
        other => Err(type_error(expected, found(&other))),
    }
}

fn to_boolean(cell: RawCell) -> Result<Value, CellErrorKind> {
    let expected = ColumnType::Boolean;
    match cell {
        RawCell::Bool(b) => Ok(Value::Boolean(b)),
        RawCell::Int(0) => Ok(Value::Boolean(false)),
        RawCell::Int(1) => Ok(Value::Boolean(true)),
        RawCell::Float(0.0) => Ok(Value::Boolean(false)),
        RawCell::Float(1.0) => Ok(Value::Boolean(true)),
        RawCell::Text(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "yes" | "y" | "1" => Ok(Value::Boolean(true)),
            "false" | "f" | "no" | "n" | "0" => Ok(Value::Boolean(false)),
            _ => Err(type_error(expected, "true/false, yes/no, y/n or 1/0")),
        },
        other => Err(type_error(expected, found(&other))),
    }
}

fn formats_hint(formats: &[String], iso: &str) -> String {
    let mut all: Vec<&str> = formats.iter().map(String::as_str).collect();
    all.push(iso);
    format!("format {}", all.join(" or "))
}

fn to_date(cell: RawCell, formats: &[String]) -> Result<Value, CellErrorKind> {
    let expected = ColumnType::Date;
    match cell {
        RawCell::Date(d) => Ok(Value::Date(d)),
        // Spreadsheets store dates as date-times; a midnight one is a plain date.
        RawCell::DateTime(dt) if dt.time() == NaiveTime::MIN => Ok(Value::Date(dt.date())),
        RawCell::DateTime(_) | RawCell::DateTimeTz(_) => {
            Err(type_error(expected, "has a time of day"))
        }
        RawCell::Text(s) => {
            let t = s.trim();
            formats
                .iter()
                .map(String::as_str)
                .chain(["%Y-%m-%d"])
                .find_map(|f| NaiveDate::parse_from_str(t, f).ok())
                .map(Value::Date)
                .ok_or_else(|| type_error(expected, formats_hint(formats, "%Y-%m-%d")))
        }
        other => Err(type_error(expected, found(&other))),
    }
}

fn to_datetime(cell: RawCell, formats: &[String]) -> Result<Value, CellErrorKind> {
    let expected = ColumnType::Datetime;
    match cell {
        RawCell::DateTime(dt) => Ok(Value::DateTime(dt)),
        RawCell::DateTimeTz(dt) => Ok(Value::DateTimeTz(dt)),
        RawCell::Date(d) => Ok(Value::DateTime(d.and_time(NaiveTime::MIN))),
        RawCell::Text(s) => {
            let t = s.trim();
            for f in formats {
                if let Some(v) = parse_with_format(t, f) {
                    return Ok(v);
                }
            }
            // Naive layouts first: they are the common case in registry extracts, and a text
            // with an offset fails them on its trailing characters.
            for f in ISO_DATETIME {
                if let Ok(dt) = NaiveDateTime::parse_from_str(t, f) {
                    return Ok(Value::DateTime(dt));
                }
            }
            if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
                return Ok(Value::DateTimeTz(dt));
            }
            for f in ISO_DATETIME_TZ {
                if let Ok(dt) = DateTime::parse_from_str(t, f) {
                    return Ok(Value::DateTimeTz(dt));
                }
            }
            Err(type_error(
                expected,
                formats_hint(formats, "ISO 8601 %Y-%m-%dT%H:%M:%S"),
            ))
        }
        other => Err(type_error(expected, found(&other))),
    }
}

/// One user format: with an offset, a naive date-time, or a date alone (midnight).
fn parse_with_format(text: &str, format: &str) -> Option<Value> {
    if let Ok(dt) = DateTime::parse_from_str(text, format) {
        return Some(Value::DateTimeTz(dt));
    }
    if let Ok(dt) = NaiveDateTime::parse_from_str(text, format) {
        return Some(Value::DateTime(dt));
    }
    NaiveDate::parse_from_str(text, format)
        .ok()
        .map(|d| Value::DateTime(d.and_time(NaiveTime::MIN)))
}

/// What a cell held instead, for hints.
fn found(cell: &RawCell) -> &'static str {
    match cell {
        RawCell::Empty => "empty",
        RawCell::Text(_) => "text",
        RawCell::Int(_) | RawCell::Float(_) | RawCell::Decimal(_) => "a number",
        RawCell::Bool(_) => "a boolean",
        RawCell::Date(_) => "a date",
        RawCell::DateTime(_) | RawCell::DateTimeTz(_) => "a date-time",
        RawCell::Invalid(..) => "an error value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(cols: &[(&str, ColumnType, &[&str])], tz: &str) -> (Arc<Header>, Schema) {
        let header = Arc::new(Header::new(cols.iter().map(|c| c.0)));
        let specs = cols
            .iter()
            .map(|(n, k, f)| {
                (
                    n.to_string(),
                    ColumnSpec {
                        kind: *k,
                        formats: f.iter().map(|s| s.to_string()).collect(),
                        decimal_comma: false,
                        pad_zeros: None,
                    },
                )
            })
            .collect();
        let tokens = crate::config::DEFAULT_NULL_TOKENS
            .iter()
            .map(|s| s.to_string())
            .collect();
        let s = Schema::new(&header, &specs, tokens, tz.parse().expect("zone"));
        (header, s)
    }

    fn loc() -> RowLocation {
        RowLocation {
            file: "labs.csv".into(),
            sheet: None,
            row: 7,
        }
    }

    fn one(kind: ColumnType, formats: &[&str], cell: RawCell) -> Result<Value, String> {
        let (h, s) = schema(&[("c", kind, formats)], "America/Chicago");
        let row = s.apply(loc(), &h, vec![cell]);
        match row.errors.first() {
            Some(e) => Err(e.to_string()),
            None => Ok(row.values[0].clone()),
        }
    }

    /// A column of `kind` with no options.
    fn spec_of(kind: ColumnType) -> ColumnSpec {
        ColumnSpec {
            kind,
            formats: Vec::new(),
            decimal_comma: false,
            pad_zeros: None,
        }
    }

    /// One cell through a one-column schema declared as `spec` (no null tokens, UTC).
    fn with_spec(spec: ColumnSpec, cell: RawCell) -> Result<Value, String> {
        let header = Arc::new(Header::new(["c"]));
        let specs = BTreeMap::from([("c".to_string(), spec)]);
        let s = Schema::new(&header, &specs, Vec::new(), chrono_tz::UTC);
        let row = s.apply(loc(), &header, vec![cell]);
        match row.errors.first() {
            Some(e) => Err(e.to_string()),
            None => Ok(row.values[0].clone()),
        }
    }

    fn text(s: &str) -> RawCell {
        RawCell::Text(s.into())
    }

    #[test]
    fn null_tokens_and_blank_cells_are_null_in_every_type() {
        for kind in [
            ColumnType::String,
            ColumnType::Integer,
            ColumnType::Date,
            ColumnType::Datetime,
        ] {
            for raw in ["", "  ", "NA", "N/A", "."] {
                assert_eq!(one(kind, &[], text(raw)), Ok(Value::Null), "{kind} {raw:?}");
            }
        }
    }

    #[test]
    fn strings_keep_leading_zeros_and_spaces() {
        assert_eq!(
            one(ColumnType::String, &[], text("00123 ")),
            Ok(Value::Text("00123 ".into()))
        );
        assert_eq!(
            one(ColumnType::String, &[], RawCell::Float(123.0)),
            Ok(Value::Text("123".into()))
        );
    }

    #[test]
    fn integers_accept_whole_numbers_only() {
        assert_eq!(
            one(ColumnType::Integer, &[], text(" 42")),
            Ok(Value::Integer(42))
        );
        assert_eq!(
            one(ColumnType::Integer, &[], text("42.0")),
            Ok(Value::Integer(42))
        );
        assert_eq!(
            one(ColumnType::Integer, &[], text("4.5")),
            Err("labs.csv:7:c: expected integer (has a fractional part)".into())
        );
        assert_eq!(
            one(ColumnType::Integer, &[], text("pending")),
            Err("labs.csv:7:c: expected integer".into())
        );
    }

    #[test]
    fn decimals_keep_their_scale_and_floats_read_as_shown() {
        let d = |s: &str| Value::Decimal(s.parse().expect("decimal"));
        assert_eq!(one(ColumnType::Decimal, &[], text("12.50")), Ok(d("12.50")));
        assert_eq!(one(ColumnType::Decimal, &[], text("1.5e2")), Ok(d("150")));
        assert_eq!(
            one(ColumnType::Decimal, &[], RawCell::Float(0.1 + 0.2)),
            Ok(d("0.3"))
        );
        assert!(one(ColumnType::Decimal, &[], RawCell::Float(f64::NAN)).is_err());
    }

    #[test]
    fn decimal_commas_are_read_only_when_declared_and_a_point_is_then_refused() {
        let d = |s: &str| Value::Decimal(s.parse().expect("decimal"));
        let comma = |cell: RawCell| {
            let spec = ColumnSpec {
                decimal_comma: true,
                ..spec_of(ColumnType::Decimal)
            };
            with_spec(spec, cell)
        };
        assert_eq!(comma(text("12,50")), Ok(d("12.50")));
        assert_eq!(comma(text(" -0,5 ")), Ok(d("-0.5")));
        assert_eq!(comma(text("88")), Ok(d("88")));
        // Spreadsheet numbers are numbers whatever the column says about text.
        assert_eq!(comma(RawCell::Float(2.25)), Ok(d("2.25")));
        let point = comma(text("1.234")).expect_err("a point is refused");
        assert!(point.contains("decimal_comma is set"), "{point}");
        assert!(comma(text("1,2,3")).is_err());
        // Undeclared, a decimal comma is an error that says what to set.
        let hint = one(ColumnType::Decimal, &[], text("12,0")).expect_err("comma");
        assert!(hint.contains("set decimal_comma = true"), "{hint}");
        let plain = one(ColumnType::Decimal, &[], text("twelve")).expect_err("text");
        assert!(!plain.contains("decimal_comma"), "{plain}");
    }

    #[test]
    fn pad_zeros_gives_numbers_and_short_digit_text_their_leading_zeros() {
        let padded = |cell: RawCell| {
            let spec = ColumnSpec {
                pad_zeros: Some(5),
                ..spec_of(ColumnType::String)
            };
            with_spec(spec, cell).expect("no cell error")
        };
        let t = |s: &str| Value::Text(s.into());
        assert_eq!(padded(RawCell::Int(42)), t("00042"));
        assert_eq!(padded(RawCell::Float(42.0)), t("00042"));
        assert_eq!(padded(text("42")), t("00042"));
        assert_eq!(padded(text("00042")), t("00042"));
        assert_eq!(padded(text("123456")), t("123456"));
        assert_eq!(padded(text("A42")), t("A42"));
        assert_eq!(padded(RawCell::Empty), Value::Null);
    }

    #[test]
    fn untyped_whole_spreadsheet_numbers_become_integers() {
        let h = Arc::new(Header::new(["a", "b"]));
        let s = Schema::new(&h, &BTreeMap::new(), Vec::new(), chrono_tz::UTC);
        let row = s.apply(
            loc(),
            &h,
            vec![RawCell::Float(12345.0), RawCell::Float(2.25)],
        );
        assert_eq!(row.values[0], Value::Integer(12345));
        assert_eq!(
            row.values[1],
            Value::Decimal("2.25".parse().expect("decimal"))
        );
    }

    #[test]
    fn booleans() {
        assert_eq!(
            one(ColumnType::Boolean, &[], text("Yes")),
            Ok(Value::Boolean(true))
        );
        assert_eq!(
            one(ColumnType::Boolean, &[], RawCell::Int(0)),
            Ok(Value::Boolean(false))
        );
        assert!(one(ColumnType::Boolean, &[], text("maybe")).is_err());
    }

    #[test]
    fn dates_try_the_column_formats_then_iso() {
        let date = |y, m, d| Value::Date(NaiveDate::from_ymd_opt(y, m, d).expect("date"));
        assert_eq!(
            one(ColumnType::Date, &["%m/%d/%Y"], text("03/01/1975")),
            Ok(date(1975, 3, 1))
        );
        assert_eq!(
            one(ColumnType::Date, &["%m/%d/%Y"], text("1975-03-01")),
            Ok(date(1975, 3, 1))
        );
        assert_eq!(
            one(ColumnType::Date, &["%m/%d/%Y"], text("02/30/1975")),
            Err("labs.csv:7:c: expected date (format %m/%d/%Y or %Y-%m-%d)".into())
        );
        // A number is never taken for a date serial.
        assert_eq!(
            one(ColumnType::Date, &[], RawCell::Float(27454.0)),
            Err("labs.csv:7:c: expected date (a number)".into())
        );
    }

    #[test]
    fn datetimes_keep_offsets_and_reject_skipped_local_times() {
        let naive = NaiveDate::from_ymd_opt(2024, 3, 1)
            .and_then(|d| d.and_hms_opt(8, 30, 0))
            .expect("datetime");
        assert_eq!(
            one(ColumnType::Datetime, &[], text("2024-03-01 08:30:00")),
            Ok(Value::DateTime(naive))
        );
        assert_eq!(
            one(ColumnType::Datetime, &[], text("2024-03-01T08:30:00-06:00"))
                .map(|v| v.to_string()),
            Ok("2024-03-01T08:30:00-06:00".into())
        );
        assert_eq!(
            one(
                ColumnType::Datetime,
                &["%m/%d/%Y %H:%M"],
                text("03/01/2024 08:30")
            ),
            Ok(Value::DateTime(naive))
        );
        // 02:30 on 10 March 2024 never happened in Chicago.
        let err = one(ColumnType::Datetime, &[], text("2024-03-10 02:30:00")).expect_err("gap");
        assert!(err.contains("does not exist in America/Chicago"), "{err}");
    }

    #[test]
    fn cell_errors_keep_the_raw_value_and_null_the_cell() {
        let (h, s) = schema(&[("value", ColumnType::Decimal, &[])], "UTC");
        let row = s.apply(loc(), &h, vec![text("pending")]);
        assert_eq!(row.values, vec![Value::Null]);
        assert_eq!(row.raw, vec!["pending".to_string()]);
        assert_eq!(row.errors[0].raw, "pending");
        assert_eq!(row.errors[0].location.to_string(), "labs.csv:7:value");
    }

    #[test]
    fn ambiguous_local_times_take_the_earlier_instant() {
        let dt = NaiveDate::from_ymd_opt(2024, 11, 3)
            .and_then(|d| d.and_hms_opt(1, 30, 0))
            .expect("datetime");
        let tz: chrono_tz::Tz = "America/Chicago".parse().expect("zone");
        assert_eq!(
            localize(&dt, tz).map(|t| t.to_rfc3339()),
            Some("2024-11-03T01:30:00-05:00".into())
        );
    }
}
