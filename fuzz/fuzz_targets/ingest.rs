//! The typed ingestion layer: arbitrary text in columns declared string, integer, decimal,
//! boolean, date and datetime (with and without formats), in a zone with clock changes. The text
//! reaches the layer through a well-formed CSV record so that the CSV parser is not what is
//! fuzzed here. A panic, or a cell error without its location, is a finding.
#![no_main]

#[path = "common.rs"]
mod common;

use std::collections::BTreeMap;

use fhirlift::config::{ColumnSpec, Defaults, SourceConfig};
use fhirlift::source::ColumnType;
use libfuzzer_sys::fuzz_target;

const COLUMNS: [(&str, ColumnType, &[&str]); 8] = [
    ("s", ColumnType::String, &[]),
    ("i", ColumnType::Integer, &[]),
    ("d", ColumnType::Decimal, &[]),
    ("b", ColumnType::Boolean, &[]),
    ("da", ColumnType::Date, &[]),
    ("dt", ColumnType::DateTime, &[]),
    ("daf", ColumnType::Date, &["%m/%d/%Y", "%d.%m.%y", "%Y%j"]),
    ("dtf", ColumnType::DateTime, &["%m/%d/%Y %H:%M", "%s", "%Y-%m-%dT%H:%M:%S%.f%z"]),
];

const ZONES: [&str; 4] = ["UTC", "America/Chicago", "Pacific/Apia", "Australia/Lord_Howe"];

fuzz_target!(|data: &[u8]| {
    let Some((&zone, body)) = data.split_first() else {
        return;
    };
    // Cells are separated by 0x1F; every column gets the same cells in turn.
    let cells: Vec<String> = body
        .split(|&b| b == 0x1f)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect();
    let mut text = COLUMNS.iter().map(|c| c.0).collect::<Vec<_>>().join(",");
    text.push('\n');
    for cell in &cells {
        let quoted = format!("\"{}\"", cell.replace('"', "\"\""));
        text.push_str(&vec![quoted; COLUMNS.len()].join(","));
        text.push('\n');
    }
    let path = common::scratch("ingest.csv", text.as_bytes());
    let mut cfg = SourceConfig::for_path(&path);
    cfg.delimiter = Some(",".into());
    cfg.columns = COLUMNS
        .iter()
        .map(|(name, kind, formats)| {
            (
                name.to_string(),
                ColumnSpec {
                    kind: *kind,
                    formats: formats.iter().map(|f| f.to_string()).collect(),
                },
            )
        })
        .collect::<BTreeMap<_, _>>();
    let defaults = Defaults {
        timezone: Some(ZONES[usize::from(zone) % ZONES.len()].to_string()),
        null_tokens: None,
    };
    if let Ok(reader) = fhirlift::source::open("fuzz", &cfg, &defaults) {
        common::drain(reader);
    }
});
