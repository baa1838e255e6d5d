//! The Parquet reader: one row group at a time, through polars' Parquet reader.
//!
//! polars 0.55 has no public batched reader for a local file, so each row group is read on its
//! own with a row slice that covers exactly that group (polars skips the other groups), which
//! keeps memory to one group's worth of columns. Values keep their Parquet types: integers of every
//! width, floats (printed exactly as stored), booleans, decimals with their scale, dates,
//! timestamps with their unit, and with their zone when the column has one. Rows are numbered from
//! 1 in file order (Parquet has no header line). This reader must not convert types by guessing:
//! the ingestion layer does declared conversions.

use std::fs::File;
use std::path::PathBuf;
use std::str::FromStr;

use chrono::{DateTime, FixedOffset, NaiveDate, TimeDelta};
use polars::prelude::{AnyValue, DataFrame, ParquetReader, SerReader, TimeUnit};
use rust_decimal::Decimal;

use super::row::{CellErrorKind, ColumnType, Header};
use super::{OpenOptions, RawCell, RawRow, ReadError, RowLocation, SourceError};

/// The rows of one Parquet file.
pub(crate) struct ParquetRows {
    path: PathBuf,
    metadata: polars::io::parquet::metadata::FileMetadataRef,
    /// (first row, row count) of each row group, in file order.
    groups: Vec<(usize, usize)>,
    next_group: usize,
    /// The row group being read, its first row's index, and the next row within it.
    batch: Option<(DataFrame, usize, usize)>,
}

impl ParquetRows {
    pub(crate) fn open(opts: &OpenOptions<'_>) -> Result<(Header, ParquetRows), SourceError> {
        let path = opts.path.to_path_buf();
        let parquet_error = |source| SourceError::Parquet {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(|source| SourceError::Open {
            path: path.clone(),
            source,
        })?;
        let mut reader = ParquetReader::new(file);
        let schema = reader.schema().map_err(parquet_error)?;
        let metadata = reader.get_metadata().map_err(parquet_error)?.clone();
        let names: Vec<String> = schema.iter_names().map(|n| n.to_string()).collect();
        let location = RowLocation {
            file: opts.file.clone(),
            sheet: None,
            row: 0,
        };
        if names.is_empty() {
            return Err(SourceError::Empty {
                file: opts.file.clone(),
            });
        }
        let header = super::build_header(&location, names, 1)?;
        let mut groups = Vec::with_capacity(metadata.row_groups.len());
        let mut first = 0;
        for group in &metadata.row_groups {
            let n = group.num_rows();
            if n > 0 {
                groups.push((first, n));
            }
            first += n;
        }
        tracing::debug!(file = %opts.file, row_groups = groups.len(), rows = first, "Parquet metadata read");
        Ok((
            header,
            ParquetRows {
                path,
                metadata,
                groups,
                next_group: 0,
                batch: None,
            },
        ))
    }

    /// Reads the next row group; `None` when there is none left.
    fn load_next_group(&mut self) -> Option<Result<(), SourceError>> {
        let &(first, len) = self.groups.get(self.next_group)?;
        self.next_group += 1;
        let result = File::open(&self.path)
            .map_err(|source| SourceError::Open {
                path: self.path.clone(),
                source,
            })
            .and_then(|file| {
                let mut reader = ParquetReader::new(file).with_slice(Some((first, len)));
                reader.set_metadata(self.metadata.clone());
                reader.finish().map_err(|source| SourceError::Parquet {
                    path: self.path.clone(),
                    source,
                })
            });
        Some(result.map(|df| {
            self.batch = Some((df, first, 0));
        }))
    }

    pub(crate) fn next_raw(&mut self) -> Option<Result<RawRow, ReadError>> {
        loop {
            if let Some((df, first, pos)) = &mut self.batch {
                if *pos < df.height() {
                    let i = *pos;
                    *pos += 1;
                    let cells = df.columns().iter().map(|c| match c.get(i) {
                        Ok(v) => cell(v),
                        Err(e) => RawCell::Invalid(
                            String::new(),
                            unsupported(format!("unreadable value: {e}")),
                        ),
                    });
                    return Some(Ok(RawRow {
                        row: (*first + i + 1) as u64,
                        cells: cells.collect(),
                    }));
                }
                self.batch = None;
            }
            match self.load_next_group()? {
                Ok(()) => continue,
                Err(e) => return Some(Err(e.into())),
            }
        }
    }
}

fn unsupported(hint: String) -> CellErrorKind {
    CellErrorKind::Type {
        expected: ColumnType::String,
        hint: Some(hint),
    }
}

/// A float exactly as stored, in its shortest round-trip form (`12.5`, not `12.500000001`).
fn float_cell(text: String, finite: bool) -> RawCell {
    if !finite {
        return RawCell::Invalid(
            text,
            CellErrorKind::Type {
                expected: ColumnType::Decimal,
                hint: Some("not a finite number".into()),
            },
        );
    }
    match Decimal::from_str(&text) {
        Ok(d) => RawCell::Decimal(d),
        Err(_) => RawCell::Invalid(
            text,
            CellErrorKind::Type {
                expected: ColumnType::Decimal,
                hint: Some("out of the supported range".into()),
            },
        ),
    }
}

fn wide_int(v: i128) -> RawCell {
    match i64::try_from(v) {
        Ok(i) => RawCell::Int(i),
        Err(_) => match Decimal::try_from_i128_with_scale(v, 0) {
            Ok(d) => RawCell::Decimal(d),
            Err(_) => RawCell::Invalid(
                v.to_string(),
                CellErrorKind::Type {
                    expected: ColumnType::Integer,
                    hint: Some("out of the supported range".into()),
                },
            ),
        },
    }
}

fn timestamp(v: i64, unit: TimeUnit, zone: Option<&str>) -> RawCell {
    let utc = match unit {
        TimeUnit::Nanoseconds => Some(DateTime::from_timestamp_nanos(v)),
        TimeUnit::Microseconds => DateTime::from_timestamp_micros(v),
        TimeUnit::Milliseconds => DateTime::from_timestamp_millis(v),
    };
    let Some(utc) = utc else {
        return RawCell::Invalid(v.to_string(), unsupported("timestamp out of range".into()));
    };
    match zone {
        None => RawCell::DateTime(utc.naive_utc()),
        Some(z) => {
            if let Ok(tz) = z.parse::<chrono_tz::Tz>() {
                RawCell::DateTimeTz(utc.with_timezone(&tz).fixed_offset())
            } else if let Ok(offset) = FixedOffset::from_str(z) {
                RawCell::DateTimeTz(utc.with_timezone(&offset))
            } else {
                RawCell::Invalid(
                    utc.naive_utc().to_string(),
                    unsupported(format!("unknown time zone {z:?} in the file")),
                )
            }
        }
    }
}

/// One Parquet value as the ingestion layer receives it.
fn cell(v: AnyValue<'_>) -> RawCell {
    match v {
        AnyValue::Null => RawCell::Empty,
        AnyValue::Boolean(b) => RawCell::Bool(b),
        AnyValue::String(s) => RawCell::Text(s.to_string()),
        AnyValue::StringOwned(s) => RawCell::Text(s.to_string()),
        AnyValue::Int8(i) => RawCell::Int(i.into()),
        AnyValue::Int16(i) => RawCell::Int(i.into()),
        AnyValue::Int32(i) => RawCell::Int(i.into()),
        AnyValue::Int64(i) => RawCell::Int(i),
        AnyValue::UInt8(i) => RawCell::Int(i.into()),
        AnyValue::UInt16(i) => RawCell::Int(i.into()),
        AnyValue::UInt32(i) => RawCell::Int(i.into()),
        AnyValue::UInt64(i) => wide_int(i.into()),
        AnyValue::Int128(i) => wide_int(i),
        AnyValue::UInt128(i) => match i128::try_from(i) {
            Ok(i) => wide_int(i),
            Err(_) => RawCell::Invalid(i.to_string(), unsupported("out of range".into())),
        },
        AnyValue::Float16(f) => {
            let f = f32::from(f);
            float_cell(f.to_string(), f.is_finite())
        }
        AnyValue::Float32(f) => float_cell(f.to_string(), f.is_finite()),
        AnyValue::Float64(f) => float_cell(f.to_string(), f.is_finite()),
        AnyValue::Date(days) => NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|e| e.checked_add_signed(TimeDelta::days(days.into())))
            .map_or_else(
                || RawCell::Invalid(days.to_string(), unsupported("date out of range".into())),
                RawCell::Date,
            ),
        AnyValue::Datetime(v, unit, zone) => timestamp(v, unit, zone.map(|z| z.as_str())),
        AnyValue::DatetimeOwned(v, unit, zone) => {
            timestamp(v, unit, zone.as_deref().map(|z| z.as_str()))
        }
        AnyValue::Decimal(v, _precision, scale) => {
            match u32::try_from(scale)
                .ok()
                .and_then(|s| Decimal::try_from_i128_with_scale(v, s).ok())
            {
                Some(d) => RawCell::Decimal(d),
                None => RawCell::Invalid(
                    v.to_string(),
                    CellErrorKind::Type {
                        expected: ColumnType::Decimal,
                        hint: Some("more digits than supported (28)".into()),
                    },
                ),
            }
        }
        AnyValue::Binary(b) => binary(b),
        AnyValue::BinaryOwned(b) => binary(&b),
        other => RawCell::Invalid(
            other.to_string(),
            unsupported(format!("unsupported Parquet type {}", other.dtype())),
        ),
    }
}

fn binary(b: &[u8]) -> RawCell {
    match std::str::from_utf8(b) {
        Ok(s) => RawCell::Text(s.to_string()),
        Err(_) => RawCell::Invalid(
            String::from_utf8_lossy(b).into_owned(),
            unsupported("binary value that is not UTF-8 text".into()),
        ),
    }
}
