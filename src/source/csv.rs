//! The CSV reader: delimited text, streamed record by record.
//!
//! Text is decoded on the fly: UTF-8 by default (a byte-order mark is dropped, a UTF-16 one
//! honoured), any WHATWG-labelled encoding when configured. Bytes that are not valid UTF-8 are
//! never replaced silently: the record becomes a row error that says to set the encoding. The
//! delimiter is configured or detected from the first lines (comma, semicolon, tab, pipe). A row's
//! number is the line its record starts on, so a quoted field with line breaks does not shift the
//! numbers of later rows. This reader does no typing; that is the ingestion layer's job.

use std::fs::File;
use std::io::{BufReader, Cursor, Read};

use super::{
    OpenOptions, RawCell, RawRow, ReadError, RowError, RowErrorKind, RowLocation, SourceError,
};
use crate::source::row::Header;

/// How much decoded text the delimiter detection looks at.
const SNIFF_BYTES: u64 = 64 * 1024;
/// Delimiters tried by detection, in order of preference when scores tie.
const CANDIDATES: [u8; 4] = [b',', b';', b'\t', b'|'];

type Input = Box<dyn Read + Send>;

/// Records of one CSV file after its header.
pub(crate) struct CsvRows {
    reader: ::csv::Reader<Input>,
    record: ::csv::ByteRecord,
    width: usize,
    path: std::path::PathBuf,
    file: std::sync::Arc<str>,
}

impl CsvRows {
    /// Opens the file, settles encoding and delimiter, and reads up to and including the header.
    pub(crate) fn open(opts: &OpenOptions<'_>) -> Result<(Header, CsvRows), SourceError> {
        let path = opts.path.to_path_buf();
        let file = File::open(opts.path).map_err(|source| SourceError::Open {
            path: path.clone(),
            source,
        })?;
        // Without a configured encoding, bytes pass through untouched so that invalid UTF-8 is
        // caught per record below instead of being replaced with U+FFFD.
        let mut decoded = encoding_rs_io::DecodeReaderBytesBuilder::new()
            .encoding(opts.encoding)
            .utf8_passthru(true)
            .strip_bom(true)
            .build(BufReader::with_capacity(256 * 1024, file));
        let mut head = Vec::new();
        (&mut decoded)
            .take(SNIFF_BYTES)
            .read_to_end(&mut head)
            .map_err(|source| SourceError::Io {
                path: path.clone(),
                line: None,
                source,
            })?;
        if head.iter().all(u8::is_ascii_whitespace) {
            return Err(SourceError::Empty {
                file: opts.file.clone(),
            });
        }
        let delimiter = opts.delimiter.unwrap_or_else(|| detect_delimiter(&head));
        let input: Input = Box::new(Cursor::new(head).chain(decoded));
        let reader = ::csv::ReaderBuilder::new()
            .delimiter(delimiter)
            .has_headers(false)
            .flexible(true)
            // Records end at `\n` only (a CRLF's `\r` is trimmed below): with the csv crate's
            // default CRLF handling the `\n` of a CRLF is counted on the next record, so every
            // row number after the first would be one too low.
            .terminator(::csv::Terminator::Any(b'\n'))
            .buffer_capacity(256 * 1024)
            .from_reader(input);
        let mut rows = CsvRows {
            reader,
            record: ::csv::ByteRecord::new(),
            width: 0,
            path,
            file: opts.file.clone(),
        };
        let header_line = opts.header_row.unwrap_or(1);
        let header = loop {
            match rows.read()? {
                None => {
                    return Err(SourceError::NoHeader {
                        location: rows.location(header_line),
                    });
                }
                Some(line) if line < header_line => continue,
                Some(line) => break rows.header(line)?,
            }
        };
        rows.width = header.len();
        tracing::debug!(
            file = %rows.file,
            delimiter = %char::from(delimiter).escape_default(),
            "CSV header read"
        );
        Ok((header, rows))
    }

    fn location(&self, row: u64) -> RowLocation {
        RowLocation {
            file: self.file.clone(),
            sheet: None,
            row,
        }
    }

    /// Reads the next record into `self.record`; returns the line it starts on. Lines holding
    /// nothing but a carriage return are skipped like empty ones.
    fn read(&mut self) -> Result<Option<u64>, SourceError> {
        loop {
            match self.read_one()? {
                None => return Ok(None),
                Some(line) => {
                    let n = self.record.len();
                    if n > 0 && self.record[n - 1].last() == Some(&b'\r') {
                        self.trim_last_cr();
                    }
                    if self.record.len() == 1 && self.record[0].is_empty() {
                        continue;
                    }
                    return Ok(Some(line));
                }
            }
        }
    }

    fn trim_last_cr(&mut self) {
        let mut trimmed =
            ::csv::ByteRecord::with_capacity(self.record.as_slice().len(), self.record.len());
        let n = self.record.len();
        for (i, field) in self.record.iter().enumerate() {
            if i + 1 == n {
                trimmed.push_field(&field[..field.len() - 1]);
            } else {
                trimmed.push_field(field);
            }
        }
        trimmed.set_position(self.record.position().cloned());
        self.record = trimmed;
    }

    fn read_one(&mut self) -> Result<Option<u64>, SourceError> {
        match self.reader.read_byte_record(&mut self.record) {
            Ok(true) => Ok(Some(self.record.position().map_or(0, |p| p.line()))),
            Ok(false) => Ok(None),
            Err(e) => {
                let line = e.position().map(|p| p.line());
                let source = match e.into_kind() {
                    ::csv::ErrorKind::Io(io) => io,
                    other => std::io::Error::other(format!("{other:?}")),
                };
                Err(SourceError::Io {
                    path: self.path.clone(),
                    line,
                    source,
                })
            }
        }
    }

    fn header(&self, line: u64) -> Result<Header, SourceError> {
        let location = self.location(line);
        let mut names = Vec::with_capacity(self.record.len());
        for field in self.record.iter() {
            match std::str::from_utf8(field) {
                Ok(s) => names.push(s.to_string()),
                Err(_) => {
                    return Err(SourceError::UndecodableHeader {
                        location,
                        name: String::from_utf8_lossy(field).into_owned(),
                    });
                }
            }
        }
        super::build_header(&location, names, 1)
    }

    fn lossy_fields(&self) -> Vec<String> {
        self.record
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect()
    }

    pub(crate) fn next_raw(&mut self) -> Option<Result<RawRow, ReadError>> {
        let line = match self.read() {
            Ok(Some(line)) => line,
            Ok(None) => return None,
            Err(e) => return Some(Err(e.into())),
        };
        let row_error = |kind| {
            Some(Err(ReadError::Row(RowError {
                location: self.location(line),
                raw: self.lossy_fields(),
                kind,
            })))
        };
        if self.record.len() != self.width {
            return row_error(RowErrorKind::Ragged {
                expected: self.width,
                found: self.record.len(),
            });
        }
        let mut cells = Vec::with_capacity(self.width);
        for (i, field) in self.record.iter().enumerate() {
            match std::str::from_utf8(field) {
                Ok(s) => cells.push(RawCell::Text(s.to_string())),
                Err(e) => {
                    return row_error(RowErrorKind::Undecodable {
                        field: i + 1,
                        byte_offset: e.valid_up_to(),
                    });
                }
            }
        }
        Some(Ok(RawRow { row: line, cells }))
    }
}

/// Picks the delimiter from the first lines: the candidate that splits every sampled line into
/// the same number (> 1) of fields, most fields first; failing that, the one most frequent in the
/// first line; failing that, a comma.
pub fn detect_delimiter(head: &[u8]) -> u8 {
    let lines = sample_lines(head, 20);
    let Some(first) = lines.first() else {
        return b',';
    };
    let count = |line: &[u8], d: u8| count_outside_quotes(line, d);
    let mut best: Option<(usize, u8)> = None;
    for d in CANDIDATES {
        let n = count(first, d);
        if n == 0 {
            continue;
        }
        if lines.iter().all(|l| count(l, d) == n) && best.is_none_or(|(m, _)| n > m) {
            best = Some((n, d));
        }
    }
    if let Some((_, d)) = best {
        return d;
    }
    CANDIDATES
        .iter()
        .map(|&d| (count(first, d), d))
        .filter(|(n, _)| *n > 0)
        .max_by_key(|(n, d)| (*n, std::cmp::Reverse(*d)))
        .map_or(b',', |(_, d)| d)
}

/// Complete lines of the sample (a quoted line break does not end a line), blank ones skipped;
/// the last, possibly cut-off line is left out unless it is the only one.
fn sample_lines(head: &[u8], max: usize) -> Vec<&[u8]> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'\n' if !quoted => {
                let line = &head[start..i];
                if !line.iter().all(u8::is_ascii_whitespace) {
                    lines.push(line);
                }
                start = i + 1;
                if lines.len() == max {
                    return lines;
                }
            }
            _ => {}
        }
    }
    if lines.is_empty() && start < head.len() {
        lines.push(&head[start..]);
    }
    lines
}

fn count_outside_quotes(line: &[u8], d: u8) -> usize {
    let mut quoted = false;
    let mut n = 0;
    for &b in line {
        if b == b'"' {
            quoted = !quoted;
        } else if b == d && !quoted {
            n += 1;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::{ReadError, Value, open_path};

    fn read(bytes: &[u8]) -> Vec<Result<crate::source::Row, ReadError>> {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("t.csv");
        std::fs::write(&p, bytes).expect("write");
        open_path(&p).expect("open").collect()
    }

    #[test]
    fn rows_are_numbered_by_the_line_their_record_starts_on() {
        let rows = read(b"\xEF\xBB\xBFid,note\r\n1,\"two\r\nlines\"\r\n\r\n2,x\r\n");
        let rows: Vec<_> = rows.into_iter().map(|r| r.expect("row")).collect();
        assert_eq!(rows[0].header.columns[0].as_ref(), "id");
        assert_eq!(rows[0].location.row, 2);
        assert_eq!(
            rows[0].get("note"),
            Some(&Value::Text("two\r\nlines".into()))
        );
        assert_eq!(rows[1].location.row, 5);
    }

    #[test]
    fn ragged_and_undecodable_records_are_row_errors_and_reading_goes_on() {
        let rows = read(b"a;b\n1;2;3\n\xE9t\xE9;x\n4;5\n");
        match &rows[0] {
            Err(ReadError::Row(e)) => {
                assert_eq!(e.to_string(), "t.csv:2: 3 fields, but the header has 2")
            }
            other => panic!("{other:?}"),
        }
        match &rows[1] {
            Err(ReadError::Row(e)) => {
                assert!(
                    e.to_string()
                        .starts_with("t.csv:3: field 1 is not valid UTF-8"),
                    "{e}"
                );
                assert_eq!(e.raw[1], "x");
            }
            other => panic!("{other:?}"),
        }
        assert!(rows[2].is_ok());
    }

    #[test]
    fn detects_each_delimiter() {
        assert_eq!(detect_delimiter(b"a,b,c\n1,2,3\n"), b',');
        assert_eq!(detect_delimiter(b"a;b;c\n1,5;2;3\n"), b';');
        assert_eq!(detect_delimiter(b"a\tb\n1\t2\n"), b'\t');
        assert_eq!(detect_delimiter(b"a|b|c\n1|2|3"), b'|');
        assert_eq!(detect_delimiter(b"single\n1\n"), b',');
    }

    #[test]
    fn detection_ignores_delimiters_inside_quotes() {
        assert_eq!(
            detect_delimiter(b"name;note\n\"Doe, Jane\";\"a, b, c\"\n"),
            b';'
        );
        assert_eq!(detect_delimiter(b"a;b\n\"x\ny,z,w\";2\n3;4\n"), b';');
    }
}
