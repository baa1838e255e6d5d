//! Source readers: CSV, Excel workbooks and Parquet files in, typed [`Row`]s out.
//!
//! Each format has its own file; all of them feed the typed ingestion layer so that a column's
//! declared type means the same thing whatever the file format. Readers stream: they never hold a
//! whole file's rows in memory.

pub mod row;

pub use row::{
    CellError, CellErrorKind, CellLocation, ColumnType, Header, Row, RowLocation, Value,
};
