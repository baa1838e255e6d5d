//! The workbook reader: .xlsx, .xlsm, .xls, .xlsb and .ods sheets, read with calamine.
//!
//! Every cell type is converted on purpose: text stays text (leading zeros kept), numbers stay
//! numbers (the ingestion layer makes whole ones integers), date cells become dates or date-times
//! using the workbook's own date system (1900 or 1904, with the 1900 leap-year bug: serial 60 is
//! the 29 February 1900 that never was, and is reported as such), error cells become cell errors.
//! Row numbers are the spreadsheet's own. Fully empty rows (formatted but blank, or trailing) are
//! skipped without shifting the numbers of the others.
//!
//! A sheet is read into memory as one grid, because that is how calamine reads every format; this
//! reader must not copy that grid again.

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use calamine::{Data, Range, Reader, Sheets};
use chrono::{Duration, NaiveDate, NaiveDateTime, NaiveTime};

use super::row::{CellErrorKind, Header};
use super::{
    OpenOptions, RawCell, RawRow, ReadError, RowError, RowErrorKind, RowLocation, SourceError,
};
use crate::config::{SheetRef, SourceFormat};

/// The rows of one sheet after its header.
pub(crate) struct ExcelRows {
    range: Range<Data>,
    /// Absolute 0-based index of the next row to read.
    next: u32,
    /// Absolute 0-based index of the last row.
    last: u32,
    /// Absolute 0-based column of the header's first column.
    first_col: u32,
    /// Absolute 0-based index of the last column holding anything.
    last_col: u32,
    width: usize,
    file: Arc<str>,
    sheet: Arc<str>,
    /// OpenDocument error results reach us as plain text (see [`ods_error`]).
    ods: bool,
}

impl ExcelRows {
    /// Opens the workbook, picks the sheet, and reads its header row.
    pub(crate) fn open(
        opts: &OpenOptions<'_>,
        format: SourceFormat,
    ) -> Result<(Header, Arc<str>, ExcelRows), SourceError> {
        let path = opts.path.to_path_buf();
        let file = File::open(&path).map_err(|source| SourceError::Open {
            path: path.clone(),
            source,
        })?;
        if matches!(
            format,
            SourceFormat::Xlsx | SourceFormat::Xlsm | SourceFormat::Xlsb | SourceFormat::Ods
        ) {
            check_zip_parts(&file, &opts.file)?;
        }
        let reader = BufReader::new(file);
        let kind = match format {
            SourceFormat::Xls => "Excel 97-2003 (.xls)",
            SourceFormat::Xlsb => "Excel binary (.xlsb)",
            SourceFormat::Ods => "OpenDocument (.ods)",
            _ => "Excel (.xlsx/.xlsm)",
        };
        let workbook_error = |source: calamine::Error| SourceError::Workbook {
            path: path.clone(),
            kind,
            source,
        };
        let mut workbook: Sheets<BufReader<File>> = match format {
            SourceFormat::Xls => calamine::open_workbook_from_rs(reader)
                .map(Sheets::Xls)
                .map_err(|e| workbook_error(calamine::Error::Xls(e)))?,
            SourceFormat::Xlsb => calamine::open_workbook_from_rs(reader)
                .map(Sheets::Xlsb)
                .map_err(|e| workbook_error(calamine::Error::Xlsb(e)))?,
            SourceFormat::Ods => calamine::open_workbook_from_rs(reader)
                .map(Sheets::Ods)
                .map_err(|e| workbook_error(calamine::Error::Ods(e)))?,
            _ => calamine::open_workbook_from_rs(reader)
                .map(Sheets::Xlsx)
                .map_err(|e| workbook_error(calamine::Error::Xlsx(e)))?,
        };
        let names = workbook.sheet_names();
        let chosen = match opts.sheet {
            None => names.first().cloned(),
            Some(SheetRef::Name(n)) => names.iter().find(|s| *s == n).cloned(),
            Some(SheetRef::Index(i)) => names.get(*i).cloned(),
        };
        let Some(sheet_name) = chosen else {
            return Err(SourceError::SheetNotFound {
                path,
                sheet: opts.sheet.cloned().unwrap_or(SheetRef::Index(0)),
                available: names,
            });
        };
        let grid_location = || format!("{}[{}]", opts.file, sheet_name);
        let range = match &mut workbook {
            Sheets::Xlsx(x) => match x.worksheet_cells_reader(&sheet_name) {
                Ok(mut cells) => bounded_grid(|| cells.next_cell(), grid_location)?
                    .map_err(|e| workbook_error(calamine::Error::Xlsx(e)))?,
                // A chart sheet has no cells.
                Err(calamine::XlsxError::NotAWorksheet(_)) => Range::default(),
                Err(e) => return Err(workbook_error(calamine::Error::Xlsx(e))),
            },
            Sheets::Xlsb(x) => {
                let mut cells = x
                    .worksheet_cells_reader(&sheet_name)
                    .map_err(|e| workbook_error(calamine::Error::Xlsb(e)))?;
                bounded_grid(|| cells.next_cell(), grid_location)?
                    .map_err(|e| workbook_error(calamine::Error::Xlsb(e)))?
            }
            // .xls grids are bounded by the format (65,536 rows × 256 columns); calamine caps
            // .ods repeats at a cell limit of its own.
            other => other.worksheet_range(&sheet_name).map_err(workbook_error)?,
        };
        let sheet: Arc<str> = sheet_name.into();
        let location = |row: u64| RowLocation {
            file: opts.file.clone(),
            sheet: Some(sheet.clone()),
            row,
        };
        let (Some(start), Some(end)) = (range.start(), range.end()) else {
            return Err(match opts.header_row {
                Some(r) => SourceError::NoHeader {
                    location: location(r),
                },
                None => SourceError::Empty {
                    file: format!("{}[{}]", opts.file, sheet).into(),
                },
            });
        };
        let row_is_empty = |r: u32| (start.1..=end.1).all(|c| is_blank(range.get_value((r, c))));
        // The header is the configured row, or else the first row holding anything.
        let header_row = match opts.header_row {
            Some(r) => {
                let r = u32::try_from(r - 1).unwrap_or(u32::MAX);
                if r > end.0 || r < start.0 || row_is_empty(r) {
                    return Err(SourceError::NoHeader {
                        location: location(u64::from(r) + 1),
                    });
                }
                r
            }
            None => (start.0..=end.0)
                .find(|&r| !row_is_empty(r))
                .unwrap_or(start.0),
        };
        // Trailing header cells left blank are not columns (a sheet's used range often runs wider
        // than its data); a value below one is reported per row.
        let mut names: Vec<String> = (start.1..=end.1)
            .map(|c| {
                range
                    .get_value((header_row, c))
                    .map(header_text)
                    .unwrap_or_default()
            })
            .collect();
        while names.last().is_some_and(|n| n.trim().is_empty()) {
            names.pop();
        }
        let header_location = location(u64::from(header_row) + 1);
        let header = super::build_header(&header_location, names, start.1 as usize + 1)?;
        let rows = ExcelRows {
            next: header_row + 1,
            last: end.0,
            first_col: start.1,
            last_col: end.1,
            width: header.len(),
            range,
            file: opts.file.clone(),
            sheet: sheet.clone(),
            ods: format == SourceFormat::Ods,
        };
        Ok((header, sheet, rows))
    }

    fn location(&self, row: u32) -> RowLocation {
        RowLocation {
            file: self.file.clone(),
            sheet: Some(self.sheet.clone()),
            row: u64::from(row) + 1,
        }
    }

    pub(crate) fn next_raw(&mut self) -> Option<Result<RawRow, ReadError>> {
        while self.next <= self.last {
            let r = self.next;
            self.next += 1;
            let get = |c: u32| self.range.get_value((r, c));
            if (self.first_col..=self.last_col).all(|c| is_blank(get(c))) {
                continue;
            }
            let beyond = self.first_col + self.width as u32;
            let cells: Vec<RawCell> = (self.first_col..beyond)
                .map(|c| match get(c) {
                    Some(Data::String(s)) if self.ods && ods_error(s) => {
                        RawCell::Invalid(s.clone(), CellErrorKind::Spreadsheet(s.clone()))
                    }
                    d => cell(d),
                })
                .collect();
            if let Some(c) = (beyond..=self.last_col).find(|&c| !is_blank(get(c))) {
                let raw = cells.iter().map(super::schema::raw_text).collect();
                return Some(Err(ReadError::Row(RowError {
                    location: self.location(r),
                    raw,
                    kind: RowErrorKind::OutsideHeader {
                        position: c as usize + 1,
                    },
                })));
            }
            return Some(Ok(RawRow {
                row: u64::from(r) + 1,
                cells,
            }));
        }
        None
    }
}

/// The most a single compressed part of a workbook (a sheet's XML, the shared strings) may
/// inflate to. calamine streams sheets but keeps every cell and every shared string, so a part
/// that inflates without bound (a zip bomb) would take memory without bound. Real registry
/// sheets are far below this: 100,000 rows of 20 columns are about 150 MB of XML.
pub const MAX_PART_BYTES: u64 = 256 << 20;

/// The most bytes all parts of a workbook may inflate to together.
pub const MAX_WORKBOOK_BYTES: u64 = 1 << 30;

/// The most cells a sheet's grid may span (rows × columns of its used range). calamine holds a
/// sheet as one dense grid, so two cells at opposite corners of a sheet would ask for 17 billion
/// cells; this bound keeps a sheet under about a gigabyte.
pub const MAX_GRID_CELLS: u64 = 32_000_000;

/// Inflates every part of a zip-based workbook once, counting bytes, and refuses the workbook when
/// a part or the whole inflates past the limits. The sizes a zip declares can lie, so the bytes
/// are counted, not read from the directory. Anything else wrong with the archive is left for
/// calamine to report, with its own words.
fn check_zip_parts(file: &File, display: &str) -> Result<(), SourceError> {
    let Ok(handle) = file.try_clone() else {
        return Ok(());
    };
    let Ok(mut archive) = zip::ZipArchive::new(BufReader::new(handle)) else {
        return Ok(());
    };
    let too_large = |reason: String| SourceError::TooLarge {
        location: display.to_string(),
        reason,
    };
    let mut total: u64 = 0;
    for i in 0..archive.len() {
        let Ok(mut part) = archive.by_index(i) else {
            continue;
        };
        let name = part.name().map(|n| n.to_string()).unwrap_or_default();
        // An honest directory answers at once; a lying one is caught by counting.
        let n = if part.size() > MAX_PART_BYTES {
            part.size()
        } else {
            let mut limited = std::io::Read::take(&mut part, MAX_PART_BYTES + 1);
            std::io::copy(&mut limited, &mut std::io::sink()).unwrap_or(0)
        };
        if n > MAX_PART_BYTES {
            return Err(too_large(format!(
                "part {name:?} inflates past {} MiB (a compressed bomb, or a sheet far larger than a registry)",
                MAX_PART_BYTES >> 20
            )));
        }
        total += n;
        if total > MAX_WORKBOOK_BYTES {
            return Err(too_large(format!(
                "its parts inflate past {} MiB together",
                MAX_WORKBOOK_BYTES >> 20
            )));
        }
    }
    Ok(())
}

/// Collects a sheet's non-empty cells into a grid, as calamine's own `worksheet_range` does, but
/// stops as soon as the cells span more than [`MAX_GRID_CELLS`], before the grid is allocated.
/// The outer error is the refusal; the inner one is calamine's.
fn bounded_grid<'a, E>(
    mut next: impl FnMut() -> Result<Option<calamine::Cell<calamine::DataRef<'a>>>, E>,
    location: impl Fn() -> String,
) -> Result<Result<Range<Data>, E>, SourceError> {
    let mut cells: Vec<calamine::Cell<Data>> = Vec::new();
    let (mut r0, mut r1, mut c0, mut c1) = (u32::MAX, 0u32, u32::MAX, 0u32);
    loop {
        let cell = match next() {
            Ok(Some(cell)) => cell,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        };
        if matches!(cell.get_value(), calamine::DataRef::Empty) {
            continue;
        }
        let (r, c) = cell.get_position();
        (r0, r1, c0, c1) = (r0.min(r), r1.max(r), c0.min(c), c1.max(c));
        let span = (u64::from(r1 - r0) + 1) * (u64::from(c1 - c0) + 1);
        if span > MAX_GRID_CELLS || cells.len() as u64 >= MAX_GRID_CELLS {
            return Err(SourceError::TooLarge {
                location: location(),
                reason: format!(
                    "its cells span {} rows × {} columns, more than the {MAX_GRID_CELLS} cells a sheet may hold (the farthest is row {}, column {}; a stray value far from the data often causes this)",
                    u64::from(r1 - r0) + 1,
                    u64::from(c1 - c0) + 1,
                    u64::from(r) + 1,
                    u64::from(c) + 1,
                ),
            });
        }
        cells.push(calamine::Cell::new(
            (r, c),
            Data::from(cell.get_value().clone()),
        ));
    }
    Ok(Ok(Range::from_sparse(cells)))
}

/// calamine reads an OpenDocument formula's error result (`#N/A`) as the text it displays, so in
/// .ods files a cell whose whole text is an error code is taken for the error it shows.
fn ods_error(s: &str) -> bool {
    matches!(
        s,
        "#N/A" | "#DIV/0!" | "#VALUE!" | "#REF!" | "#NAME?" | "#NUM!" | "#NULL!"
    )
}

fn is_blank(d: Option<&Data>) -> bool {
    match d {
        None | Some(Data::Empty) => true,
        Some(Data::String(s)) => s.trim().is_empty(),
        _ => false,
    }
}

/// A header cell's text: what the cell shows.
fn header_text(d: &Data) -> String {
    super::schema::raw_text(&cell(Some(d)))
}

/// One spreadsheet cell as the ingestion layer receives it.
fn cell(d: Option<&Data>) -> RawCell {
    let Some(d) = d else {
        return RawCell::Empty;
    };
    match d {
        Data::Empty => RawCell::Empty,
        Data::String(s) => RawCell::Text(s.clone()),
        Data::Int(i) => RawCell::Int(*i),
        Data::Float(f) => RawCell::Float(*f),
        Data::Bool(b) => RawCell::Bool(*b),
        Data::Error(e) => {
            RawCell::Invalid(e.to_string(), CellErrorKind::Spreadsheet(e.to_string()))
        }
        Data::DateTime(dt) => {
            if dt.is_duration() {
                RawCell::Text(duration_text(dt.as_f64()))
            } else {
                serial_cell(dt.as_f64(), is_1904(dt))
            }
        }
        Data::DateTimeIso(s) => iso_cell(s),
        Data::DurationIso(s) => RawCell::Text(s.clone()),
    }
}

/// Whether a date cell counts from 1904. calamine keeps the flag private but compares it, so an
/// otherwise identical 1904 value tells.
fn is_1904(dt: &calamine::ExcelDateTime) -> bool {
    *dt == calamine::ExcelDateTime::new(dt.as_f64(), calamine::ExcelDateTimeType::DateTime, true)
}

/// An Excel date serial as a date (midnight) or a date-time; below 1 it is a time of day.
pub fn serial_cell(serial: f64, is_1904: bool) -> RawCell {
    if !serial.is_finite() || serial < 0.0 {
        return invalid_date(format!("{serial}"), "not a valid date serial");
    }
    if serial < 1.0 && !is_1904 {
        return RawCell::Text(duration_text(serial));
    }
    let days = serial.floor();
    let millis = ((serial - days) * 86_400_000.0).round() as i64;
    let base = if is_1904 {
        NaiveDate::from_ymd_opt(1904, 1, 1)
    } else if days < 60.0 {
        // Serial 1 is 1 January 1900.
        NaiveDate::from_ymd_opt(1899, 12, 31)
    } else if days < 61.0 {
        // Serial 60 is Excel's 29 February 1900 (1900 was not a leap year).
        return invalid_date(
            "1900-02-29".into(),
            "1900-02-29 does not exist; spreadsheets count it by an old leap-year bug",
        );
    } else {
        // From serial 61 on, the phantom leap day shifts the epoch back one day.
        NaiveDate::from_ymd_opt(1899, 12, 30)
    };
    let dt = base
        .map(|b| b.and_time(NaiveTime::MIN))
        .and_then(|b| b.checked_add_signed(Duration::try_days(days as i64)?))
        .and_then(|b| b.checked_add_signed(Duration::try_milliseconds(millis)?));
    match dt {
        Some(dt) if dt.time() == NaiveTime::MIN => RawCell::Date(dt.date()),
        Some(dt) => RawCell::DateTime(dt),
        None => invalid_date(format!("{serial}"), "date out of range"),
    }
}

fn invalid_date(raw: String, hint: &str) -> RawCell {
    RawCell::Invalid(
        raw,
        CellErrorKind::Type {
            expected: super::ColumnType::Date,
            hint: Some(hint.into()),
        },
    )
}

/// A time of day or a duration as `HH:MM:SS` (hours may exceed 24 for durations).
fn duration_text(days: f64) -> String {
    let total = (days * 86_400.0).round() as i64;
    let (h, m, s) = (total / 3600, (total / 60) % 60, total % 60);
    format!("{h:02}:{m:02}:{s:02}")
}

/// An ISO date or date-time as OpenDocument stores it.
fn iso_cell(s: &str) -> RawCell {
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return RawCell::Date(d);
    }
    match NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f") {
        Ok(dt) if dt.time() == NaiveTime::MIN => RawCell::Date(dt.date()),
        Ok(dt) => RawCell::DateTime(dt),
        Err(_) => RawCell::Text(s.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> RawCell {
        RawCell::Date(NaiveDate::from_ymd_opt(y, m, d).expect("date"))
    }

    #[test]
    fn serials_in_the_1900_system_honour_the_leap_year_bug() {
        assert_eq!(serial_cell(1.0, false), date(1900, 1, 1));
        assert_eq!(serial_cell(59.0, false), date(1900, 2, 28));
        assert!(matches!(serial_cell(60.0, false), RawCell::Invalid(..)));
        assert_eq!(serial_cell(61.0, false), date(1900, 3, 1));
        assert_eq!(serial_cell(45352.0, false), date(2024, 3, 1));
    }

    #[test]
    fn serials_in_the_1904_system() {
        assert_eq!(serial_cell(0.0, true), date(1904, 1, 1));
        assert_eq!(serial_cell(43890.0, true), date(2024, 3, 1));
    }

    #[test]
    fn absurd_serials_are_cell_errors_not_panics() {
        for serial in [1e300, f64::MAX, f64::INFINITY, f64::NAN, -1.0] {
            assert!(
                matches!(serial_cell(serial, false), RawCell::Invalid(..)),
                "{serial}"
            );
        }
    }

    #[test]
    fn fractions_are_times_of_day() {
        let dt = NaiveDate::from_ymd_opt(2024, 3, 1)
            .and_then(|d| d.and_hms_opt(8, 30, 0))
            .expect("datetime");
        assert_eq!(
            serial_cell(45352.354166666664, false),
            RawCell::DateTime(dt)
        );
        assert_eq!(serial_cell(0.5, false), RawCell::Text("12:00:00".into()));
    }
}
