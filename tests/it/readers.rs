//! Integration tests: readers, `inspect` and `validate`, on files written by other tools
//! (openpyxl, LibreOffice, pyarrow; see tests/fixtures/readers/make_fixtures.py), on the samples,
//! and on malformed inputs. The binary is run for real; the library is called directly where the
//! typed values matter.

use std::path::{Path, PathBuf};
use std::process::Output;

use fhirlift::config::{ColumnSpec, ColumnType, Defaults, PipelineConfig, SheetRef, SourceConfig};
use fhirlift::source::{self, ReadError, Row, Value};

use super::common::{fhirlift, repo};

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/readers").join(name)
}

fn run(args: &[&str]) -> Output {
    fhirlift().args(args).output().expect("run fhirlift")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

/// `inspect --format ndjson` on a fixture: the lines and the exit code.
fn ndjson(file: &Path, extra: &[&str]) -> (Vec<String>, i32, String) {
    let path = file.to_str().expect("UTF-8 path");
    let mut args = vec!["inspect", path, "--format", "ndjson"];
    args.extend_from_slice(extra);
    let o = run(&args);
    let lines = stdout(&o).lines().map(str::to_string).collect();
    (lines, o.status.code().expect("exit code"), stderr(&o))
}

/// A failure must be a message, never a panic or a backtrace.
fn assert_clean_failure(o: &Output, expected: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(expected), "expected {expected:?} in {err:?}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
}

/// The rows every workbook fixture holds, whatever tool wrote it and whatever its date system.
const WORKBOOK_ROWS: [&str; 3] = [
    r##""mrn":"00123","name":"Ana Souza","birth_date":"1975-03-01","visits":3,"score":2.5,"seen_at":"2024-03-01T08:30:00","flag":null,"_errors":[{"column":"flag","raw":"#N/A","error":"spreadsheet error cell #N/A"}]}"##,
    r##""mrn":"00456","name":"Bo Li","birth_date":"1904-01-02","visits":12,"score":0.1,"seen_at":null,"flag":null,"_errors":[{"column":"flag","raw":"#DIV/0!","error":"spreadsheet error cell #DIV/0!"}]}"##,
    r##""mrn":"07","name":null,"birth_date":"2000-02-29","visits":0,"score":100,"seen_at":"2024-11-03T23:59:59","flag":"##,
];

#[test]
fn workbooks_from_openpyxl_and_libreoffice_read_as_a_person_sees_them() {
    for (file, flag) in [
        ("openpyxl_1900.xlsx", "true}"),
        ("openpyxl_1904.xlsx", "true}"),
        ("libreoffice.xls", "true}"),
        ("libreoffice_1904.xls", "true}"),
        // LibreOffice stores the boolean as a number in OpenDocument.
        ("libreoffice.ods", "1}"),
    ] {
        let (lines, code, err) = ndjson(&fixture(file), &[]);
        assert_eq!(lines.len(), 3, "{file}: {lines:#?}");
        for (i, (line, expected)) in lines.iter().zip(WORKBOOK_ROWS).enumerate() {
            let location = format!("{{\"_location\":\"{file}[Patients]:{}\",", i + 2);
            let mut want = format!("{location}{expected}");
            if i == 2 {
                want.push_str(flag);
            }
            assert_eq!(line, &want, "{file} row {}", i + 2);
        }
        assert_eq!(code, 1, "{file}: error cells make exit 1");
        assert!(
            err.contains("3 rows shown, 2 with cell errors, 0 row errors"),
            "{file}: {err}"
        );
    }
}

#[test]
fn the_1900_leap_year_bug_day_is_a_cell_error_and_its_neighbours_are_right() {
    let (lines, code, _) = ndjson(&fixture("leap_1900.xlsx"), &[]);
    assert_eq!(code, 1);
    assert_eq!(
        lines[0],
        r#"{"_location":"leap_1900.xlsx[Dates]:2","serial":59,"shown":"1900-02-28"}"#
    );
    assert!(
        lines[1].contains(r#""shown":null,"_errors":[{"column":"shown","raw":"1900-02-29","error":"expected date (1900-02-29 does not exist"#),
        "{}",
        lines[1]
    );
    assert_eq!(
        lines[2],
        r#"{"_location":"leap_1900.xlsx[Dates]:4","serial":61,"shown":"1900-03-01"}"#
    );
}

#[test]
fn sheets_by_name_and_index_and_a_missing_sheet_lists_the_sheets() {
    let file = fixture("openpyxl_1900.xlsx");
    let path = file.to_str().expect("UTF-8 path");
    let (lines, code, _) = ndjson(&file, &["--sheet", "Second"]);
    assert_eq!(code, 0);
    assert_eq!(
        lines,
        [r#"{"_location":"openpyxl_1900.xlsx[Second]:2","id":"x","amount":42}"#]
    );
    let (by_index, _, _) = ndjson(&file, &["--sheet", "#1"]);
    assert_eq!(by_index, lines);
    let o = run(&["inspect", path, "--sheet", "Labs"]);
    assert_clean_failure(
        &o,
        r#"openpyxl_1900.xlsx: no sheet Labs (sheets: "Patients", "Second")"#,
    );
}

#[test]
fn parquet_from_pyarrow_round_trips_every_type() {
    let (lines, code, _) = ndjson(&fixture("types.parquet"), &[]);
    assert_eq!(code, 0);
    assert_eq!(
        lines,
        [
            r#"{"_location":"types.parquet:1","s":"00123","i8":-128,"i16":-32768,"i32":-2147483648,"i64":-9223372036854775808,"u8":0,"u16":0,"u32":0,"u64":0,"f32":1.5,"f64":12.5,"b":true,"dec":12.50,"d":"2024-02-29","ts":"2024-03-01T08:30:00","ts_chicago":"2024-03-01T08:30:00-06:00","ts_utc":"2024-03-01T08:30:00+00:00"}"#,
            r#"{"_location":"types.parquet:2","s":"é ü","i8":127,"i16":32767,"i32":2147483647,"i64":9223372036854775807,"u8":255,"u16":65535,"u32":4294967295,"u64":18446744073709551615,"f32":0.1,"f64":0.1,"b":false,"dec":-0.01,"d":"1900-01-01","ts":"1999-12-31T23:59:59.123","ts_chicago":"2024-07-01T08:00:00-05:00","ts_utc":null}"#,
            r#"{"_location":"types.parquet:3","s":null,"i8":null,"i16":null,"i32":null,"i64":null,"u8":null,"u16":null,"u32":null,"u64":null,"f32":null,"f64":null,"b":null,"dec":null,"d":null,"ts":null,"ts_chicago":null,"ts_utc":null}"#,
        ]
    );
}

#[test]
fn windows_1252_semicolon_csv_reads_with_its_encoding() {
    let file = fixture("windows1252_semicolon.csv");
    let (lines, code, _) = ndjson(&file, &["--encoding", "windows-1252"]);
    assert_eq!(code, 0);
    assert_eq!(
        lines,
        [
            r#"{"_location":"windows1252_semicolon.csv:2","mrn":"00123","name":"José Müller","city":"Zürich","amount":"12,50 €"}"#,
            r#"{"_location":"windows1252_semicolon.csv:3","mrn":"00456","name":"Zoë Ångström","city":"Besançon","amount":"7"}"#,
        ]
    );
    // Without the encoding, nothing is silently replaced: each row says what to do.
    let (lines, code, _) = ndjson(&file, &[]);
    assert_eq!(code, 1);
    assert!(
        lines[0].starts_with(
            r#"{"_location":"windows1252_semicolon.csv:2","_row_error":"field 2 is not valid UTF-8"#
        ),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains(r#"set the source's encoding, e.g. encoding = \"windows-1252\""#));
}

#[test]
fn csv_dialects_quoting_and_line_numbers() {
    let (lines, code, _) = ndjson(&fixture("quoted_multiline.csv"), &[]);
    assert_eq!(code, 0);
    assert_eq!(
        lines,
        [
            r#"{"_location":"quoted_multiline.csv:2","id":"1","note":"first line\nsecond line","amount":"10"}"#,
            // The record above spans lines 2 and 3, so this one starts on line 4.
            r#"{"_location":"quoted_multiline.csv:4","id":"2","note":"a \"quoted\" word, and a comma","amount":"20"}"#,
            r#"{"_location":"quoted_multiline.csv:5","id":"3","note":"plain","amount":"30"}"#,
        ]
    );
    let (lines, _, _) = ndjson(&fixture("bom_tab.tsv"), &[]);
    assert_eq!(
        lines,
        [r#"{"_location":"bom_tab.tsv:2","mrn":"00123","name":"Ana"}"#]
    );
    let (lines, _, _) = ndjson(&fixture("pipe.txt"), &[]);
    assert_eq!(
        lines[1],
        r#"{"_location":"pipe.txt:3","mrn":"00456","name":"Bo","visits":"4"}"#
    );
    // An explicit delimiter wins over detection.
    let (lines, _, _) = ndjson(&fixture("pipe.txt"), &["--delimiter", ","]);
    assert_eq!(
        lines[0],
        r#"{"_location":"pipe.txt:2","mrn|name|visits":"00123|Ana|3"}"#
    );
}

#[test]
fn ragged_and_undecodable_rows_are_row_errors_and_reading_goes_on() {
    let (lines, code, err) = ndjson(&fixture("ragged.csv"), &[]);
    assert_eq!(code, 1);
    assert_eq!(
        lines,
        [
            r#"{"_location":"ragged.csv:2","mrn":"00123","name":"Ana","visits":"3"}"#,
            r#"{"_location":"ragged.csv:3","_row_error":"2 fields, but the header has 3","_raw":["00456","Bo"]}"#,
            r#"{"_location":"ragged.csv:4","_row_error":"4 fields, but the header has 3","_raw":["00789","Cy","5","extra"]}"#,
            r#"{"_location":"ragged.csv:5","mrn":"00999","name":"Di","visits":"6"}"#,
        ]
    );
    assert!(
        err.contains("4 rows shown, 0 with cell errors, 2 row errors"),
        "{err}"
    );
    let (lines, code, _) = ndjson(&fixture("invalid_utf8.csv"), &[]);
    assert_eq!(code, 1);
    assert!(lines[0].contains("invalid_utf8.csv:2"), "{}", lines[0]);
    assert_eq!(
        lines[1],
        r#"{"_location":"invalid_utf8.csv:3","mrn":"00456","name":"Bo"}"#
    );
}

#[test]
fn malformed_files_end_with_a_clear_message_and_exit_2() {
    for (file, message) in [
        ("empty.csv", "empty.csv: the file is empty (no header row)"),
        (
            "header_only.csv",
            "header_only.csv: header only, no data rows",
        ),
        (
            "duplicate_headers.csv",
            r#"duplicate_headers.csv:1: header "mrn" appears twice (columns 1 and 3)"#,
        ),
        (
            "blank_header.csv",
            "blank_header.csv:1: column 2 has a blank header",
        ),
        (
            "not_zip.xlsx",
            "not_zip.xlsx: not a readable Excel (.xlsx/.xlsm) workbook",
        ),
        (
            "truncated.xlsx",
            "truncated.xlsx: not a readable Excel (.xlsx/.xlsm) workbook",
        ),
        (
            "not_parquet.parquet",
            "not_parquet.parquet: not a readable Parquet file",
        ),
        ("no_such_file.csv", "no_such_file.csv: cannot open"),
    ] {
        let path = fixture(file);
        for format in ["table", "ndjson"] {
            let o = run(&[
                "inspect",
                path.to_str().expect("UTF-8 path"),
                "--format",
                format,
            ]);
            assert_clean_failure(&o, message);
        }
    }
}

#[test]
fn bad_inspect_options_are_usage_errors() {
    let path = fixture("pipe.txt");
    let path = path.to_str().expect("UTF-8 path");
    let o = run(&["inspect", path, "--encoding", "klingon"]);
    assert_clean_failure(&o, r#"encoding: unknown encoding label "klingon""#);
    let o = run(&["inspect", path, "--delimiter", "::"]);
    assert_clean_failure(&o, "delimiter");
    let o = run(&["inspect", path, "--header-row", "9"]);
    assert_clean_failure(&o, "pipe.txt:9: no header row here");
}

#[test]
fn table_format_marks_failed_cells_and_lists_their_errors() {
    let path = fixture("openpyxl_1900.xlsx");
    let o = run(&["inspect", path.to_str().expect("UTF-8 path")]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("row  mrn    name"), "{out}");
    assert!(
        lines[2].starts_with("2    00123  Ana Souza  1975-03-01"),
        "{out}"
    );
    assert!(lines[2].ends_with("!#N/A"), "{out}");
    assert!(
        out.contains("! openpyxl_1900.xlsx[Patients]:2:flag: spreadsheet error cell #N/A"),
        "{out}"
    );
}

#[test]
fn limit_stops_early() {
    let (lines, code, _) = ndjson(&repo().join("samples/labs.csv"), &["--limit", "5"]);
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 5);
    assert!(lines[4].starts_with(r#"{"_location":"labs.csv:6","lab_id":"A0000005""#));
}

// --- the samples -------------------------------------------------------------------------------

fn spec(kind: ColumnType, formats: &[&str]) -> ColumnSpec {
    ColumnSpec {
        kind,
        formats: formats.iter().map(|s| s.to_string()).collect(),
        decimal_comma: false,
        pad_zeros: None,
    }
}

/// The labs as a pipeline would declare them, from any of the three files.
fn typed_labs(path: &str, sheet: Option<&str>) -> Vec<Result<Row, ReadError>> {
    let mut cfg = SourceConfig::for_path(&repo().join(path));
    cfg.sheet = sheet.map(|s| SheetRef::Name(s.into()));
    for (c, k) in [
        ("lab_id", ColumnType::String),
        ("mrn", ColumnType::String),
        ("value", ColumnType::Decimal),
        ("collected_at", ColumnType::Datetime),
        ("ref_low", ColumnType::Decimal),
        ("ref_high", ColumnType::Decimal),
    ] {
        cfg.columns.insert(c.into(), spec(k, &[]));
    }
    let defaults = Defaults {
        timezone: Some("America/Chicago".into()),
        null_tokens: None,
    };
    let mut reader = source::open("labs", &cfg, &defaults).expect("open labs");
    let mut rows = Vec::new();
    loop {
        let batch = reader.next_batch(300);
        if batch.is_empty() {
            break;
        }
        rows.extend(batch);
    }
    rows
}

#[test]
fn the_sample_labs_agree_across_workbook_csv_and_parquet() {
    let xlsx = typed_labs("samples/registry.xlsx", Some("Labs"));
    let csv = typed_labs("samples/labs.csv", None);
    let parquet = typed_labs("samples/labs.parquet", None);
    assert_eq!(xlsx.len(), 2000);
    assert_eq!(csv.len(), 2000);
    assert_eq!(parquet.len(), 2000);
    let mut cell_errors = Vec::new();
    for ((x, c), p) in xlsx.iter().zip(&csv).zip(&parquet) {
        let (x, c, p) = (
            x.as_ref().expect("xlsx row"),
            c.as_ref().expect("csv row"),
            p.as_ref().expect("parquet row"),
        );
        assert_eq!(x.location.row, c.location.row);
        assert_eq!(p.location.row + 1, c.location.row);
        for e in x.errors.iter().chain(&c.errors) {
            cell_errors.push(e.to_string());
        }
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        if x.has_errors() {
            continue;
        }
        for col in [
            "lab_id",
            "mrn",
            "test_code",
            "value",
            "collected_at",
            "ref_low",
            "ref_high",
            "comparator",
            "unit",
        ] {
            assert_eq!(x.get(col), c.get(col), "{} {col}", c.location);
            assert_eq!(x.get(col), p.get(col), "{} {col}", c.location);
        }
    }
    assert_eq!(
        cell_errors,
        [
            "registry.xlsx[Labs]:257:value: expected decimal",
            "labs.csv:257:value: expected decimal",
            "registry.xlsx[Labs]:1500:collected_at: expected datetime (format ISO 8601 %Y-%m-%dT%H:%M:%S)",
            "labs.csv:1500:collected_at: expected datetime (format ISO 8601 %Y-%m-%dT%H:%M:%S)",
        ]
    );
    let first = csv[0].as_ref().expect("row");
    assert_eq!(first.get("lab_id"), Some(&Value::Text("A0000001".into())));
    assert_eq!(
        first.get("value").map(|v| v.to_json().to_string()),
        Some("1.9".into())
    );
}

#[test]
fn the_sample_patients_keep_text_mrns_and_flag_the_bad_rows() {
    let (lines, code, _) = ndjson(
        &repo().join("samples/registry.xlsx"),
        &["--sheet", "Patients"],
    );
    assert_eq!(code, 1);
    assert_eq!(lines.len(), 50);
    assert!(lines[0].starts_with(r#"{"_location":"registry.xlsx[Patients]:2","mrn":"000123","#));
    assert!(
        lines[6].contains(r#""birth_date":"02/30/1975""#),
        "{}",
        lines[6]
    );
    assert!(lines[13].contains(r#""sex":"X""#), "{}", lines[13]);
    assert!(
        lines[21].contains(r##""_errors":[{"column":"birth_date","raw":"#N/A""##),
        "{}",
        lines[21]
    );
    assert!(lines[29].contains(r#""mrn":null"#), "{}", lines[29]);
    let with_errors = lines.iter().filter(|l| l.contains("_errors")).count();
    assert_eq!(with_errors, 1);
}

// --- validate ----------------------------------------------------------------------------------

#[test]
fn validate_accepts_a_good_pipeline() {
    let path = fixture("pipeline_ok.toml");
    let o = run(&["validate", path.to_str().expect("UTF-8 path")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).ends_with(": OK\n"));
    // The library agrees, and resolves paths against the config's folder.
    let config = PipelineConfig::load(&path).expect("valid config");
    assert!(config.sources["patients"].path.starts_with(fixture("")));
}

#[test]
fn validate_reports_every_problem_at_once() {
    let path = fixture("pipeline_bad.toml");
    let o = run(&["validate", path.to_str().expect("UTF-8 path")]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    for expected in [
        r#"sources.labs: labs.csv: declared column(s) "collected", "result" not in the header"#,
        r#"registry.xlsx: no sheet Patient (sheets: "Patients", "Labs")"#,
        "gone.csv: cannot open",
        r#"pipeline_bad.toml: sources.legacy.encoding: unknown encoding label "klingon""#,
        "mapping file not found",
        "5 problems found",
    ] {
        assert!(err.contains(expected), "expected {expected:?} in:\n{err}");
    }
}

#[test]
fn validate_names_unknown_keys_with_their_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("p.toml");
    std::fs::write(
        &p,
        "[center]\nccn = \"12001\"\n[sources.labs]\npath = \"labs.csv\"\nsheeet = \"x\"\n",
    )
    .expect("write config");
    let o = run(&["validate", p.to_str().expect("UTF-8 path")]);
    assert_clean_failure(&o, "p.toml:5:1");
    assert!(stderr(&o).contains("sheeet"));
}

/// The `gen-samples` example as `cargo test` builds it, beside the `fhirlift` binary.
fn gen_samples() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_fhirlift"));
    let dir = bin.parent().expect("the binary's folder");
    let exe = dir
        .join("examples")
        .join(format!("gen-samples{}", std::env::consts::EXE_SUFFIX));
    assert!(
        exe.exists(),
        "{} is missing: `cargo test` builds the examples, `cargo test --test tests` alone does not",
        exe.display()
    );
    exe
}

#[test]
fn the_samples_are_what_their_generator_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let o = std::process::Command::new(gen_samples())
        .arg(dir.path())
        .output()
        .expect("gen-samples");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for file in ["registry.xlsx", "labs.csv", "labs.parquet"] {
        let written = std::fs::read(dir.path().join(file)).expect("written");
        let shipped = std::fs::read(repo().join("samples").join(file)).expect("shipped");
        assert!(
            written == shipped,
            "samples/{file} differs from what `cargo run --example gen-samples -- samples` writes"
        );
    }
}
