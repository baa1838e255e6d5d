//! The CSV reader on arbitrary bytes: detection of the delimiter, quoting, encodings, ragged and
//! undecodable records. A panic, a hang or an error without the file's name is a finding.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the options a user might set; the rest is the file.
    let Some((&opts, body)) = data.split_first() else {
        return;
    };
    let path = common::scratch("input.csv", body);
    let mut cfg = fhirlift::config::SourceConfig::for_path(&path);
    cfg.delimiter = match opts & 3 {
        1 => Some(";".into()),
        2 => Some("tab".into()),
        _ => None,
    };
    if opts & 4 != 0 {
        cfg.encoding = Some("windows-1252".into());
    }
    if opts & 8 != 0 {
        cfg.header_row = Some(u64::from(opts >> 4) + 1);
    }
    let defaults = fhirlift::config::Defaults::default();
    if let Ok(reader) = fhirlift::source::open("fuzz", &cfg, &defaults) {
        common::drain(reader);
    }
});
