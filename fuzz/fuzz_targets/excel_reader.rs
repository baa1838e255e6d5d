//! The workbook reader on arbitrary bytes, as .xlsx, .xls, .xlsb and .ods. A panic, an abort
//! (allocation failure), a hang or an error without the file's name is a finding.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    // The extension decides the format; zip-based ones share most seeds.
    let name = match kind & 3 {
        0 => "input.xlsx",
        1 => "input.ods",
        2 => "input.xls",
        _ => "input.xlsb",
    };
    let path = common::scratch(name, body);
    let cfg = fhirlift::config::SourceConfig::for_path(&path);
    let defaults = fhirlift::config::Defaults::default();
    if let Ok(reader) = fhirlift::source::open("fuzz", &cfg, &defaults) {
        common::drain(reader);
    }
});
