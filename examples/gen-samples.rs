//! Writes the sample registry (`samples/registry.xlsx`, `samples/labs.csv`,
//! `samples/labs.parquet`) and, on request, a large labs CSV for benchmarks.
//!
//! Everything is derived from a fixed seed with a small self-contained generator, so the files are
//! the same on every machine and every run. The data is synthetic: names from short lists, SSNs in
//! the 900 area (never issued), MRNs and accession numbers made up.
//!
//!     cargo run --example gen-samples -- samples
//!     cargo run --release --example gen-samples -- --big-csv 1000000 /tmp/labs-1m.csv

use std::error::Error;
use std::io::Write;
use std::path::Path;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use polars::prelude::{Column, DataFrame, DataType, ParquetWriter, TimeUnit};
use rust_xlsxwriter::{DocProperties, ExcelDateTime, Format, Formula, Workbook};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// SplitMix64: tiny, seedable, and fixed forever (a library's generator may change between
/// versions, which would change the committed samples).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const SEED: u64 = 12001;
const PATIENTS: usize = 50;
const LABS: usize = 2000;

const FIRST: &[&str] = &[
    "Maria", "James", "Aisha", "Wei", "Olivia", "Mateo", "Priya", "Noah", "Fatima", "Liam",
    "Sofia", "Kenji", "Amara", "Lucas", "Chloe", "Dmitri", "Zoe", "Omar", "Hana", "Elijah",
];
const LAST: &[&str] = &[
    "Garcia", "Smith", "Johnson", "Nguyen", "O'Brien", "Kowalski", "Patel", "Kim", "Okafor",
    "Martinez", "Chen", "Brown", "Silva", "Haddad", "Yazzie", "Kealoha", "Müller", "Rossi",
];
// Only M and F: the CRID service accepts no other gender, and the samples should load cleanly apart
// from the rows that are bad on purpose.
const SEX: &[&str] = &["M", "M", "F", "F", "F"];
const RACE: &[&str] = &["W", "W", "W", "B", "B", "A", "I", "P", "D", "U"];
const ETHNICITY: &[&str] = &["N", "N", "N", "H", "U"];

/// A local test: code, unit, value range in tenths, reference range, decimals shown.
struct Test {
    code: &'static str,
    unit: &'static str,
    low: i64,
    high: i64,
    reference: Option<(&'static str, &'static str)>,
    decimals: u32,
}

const TESTS: &[Test] = &[
    Test {
        code: "HGB",
        unit: "g/dL",
        low: 70,
        high: 170,
        reference: Some(("12.0", "17.5")),
        decimals: 1,
    },
    Test {
        code: "WBC",
        unit: "K/uL",
        low: 5,
        high: 150,
        reference: Some(("4.0", "11.0")),
        decimals: 1,
    },
    Test {
        code: "PLT",
        unit: "K/uL",
        low: 100,
        high: 4500,
        reference: Some(("150", "400")),
        decimals: 0,
    },
    Test {
        code: "ANC",
        unit: "K/uL",
        low: 0,
        high: 90,
        reference: Some(("1.5", "8.0")),
        decimals: 1,
    },
    Test {
        code: "CREAT",
        unit: "mg/dL",
        low: 4,
        high: 30,
        reference: Some(("0.6", "1.3")),
        decimals: 1,
    },
    Test {
        code: "ALT",
        unit: "U/L",
        low: 50,
        high: 2000,
        reference: Some(("7", "56")),
        decimals: 0,
    },
    Test {
        code: "AST",
        unit: "U/L",
        low: 50,
        high: 1500,
        reference: Some(("10", "40")),
        decimals: 0,
    },
    Test {
        code: "TBILI",
        unit: "mg/dL",
        low: 2,
        high: 60,
        reference: Some(("0.1", "1.2")),
        decimals: 1,
    },
    Test {
        code: "ALB",
        unit: "g/dL",
        low: 20,
        high: 55,
        reference: Some(("3.5", "5.0")),
        decimals: 1,
    },
    Test {
        code: "LDH",
        unit: "U/L",
        low: 1000,
        high: 9000,
        reference: Some(("140", "280")),
        decimals: 0,
    },
    Test {
        code: "FERRITIN",
        unit: "ng/mL",
        low: 100,
        high: 40000,
        reference: None,
        decimals: 0,
    },
    Test {
        code: "CMVPCR",
        unit: "IU/mL",
        low: 350,
        high: 500000,
        reference: None,
        decimals: 0,
    },
];

struct Patient {
    mrn: String,
    first: String,
    last: String,
    birth: BirthDate,
    sex: String,
    race: String,
    ethnicity: String,
    ssn: Option<String>,
}

enum BirthDate {
    Date(NaiveDate),
    /// Deliberately bad: a text cell that is not a date.
    Text(&'static str),
    /// Deliberately bad: an `#N/A` error cell.
    Error,
}

struct Lab {
    lab_id: String,
    mrn: String,
    test_code: String,
    /// The value as text (`13.2`, or the bad `pending`).
    value: String,
    unit: String,
    collected_at: Collected,
    ref_low: Option<String>,
    ref_high: Option<String>,
    comparator: Option<String>,
}

enum Collected {
    At(NaiveDateTime),
    /// Deliberately bad: a text that is no date-time.
    Text(&'static str),
}

/// Spreadsheet rows of the deliberately bad patients (row 1 is the header).
const BAD_BIRTH_TEXT: usize = 8;
const BAD_SEX: usize = 15;
const BAD_BIRTH_ERROR: usize = 23;
const BAD_EMPTY_MRN: usize = 31;
/// Spreadsheet rows (= CSV lines) of the deliberately bad labs.
const BAD_TEST_CODE: usize = 101;
const BAD_VALUE: usize = 257;
const BAD_UNKNOWN_MRN: usize = 777;
const BAD_COLLECTED: usize = 1500;

fn patients(rng: &mut Rng) -> Vec<Patient> {
    (0..PATIENTS)
        .map(|i| {
            let row = i + 2;
            let birth = NaiveDate::from_ymd_opt(1945, 1, 1).expect("valid date")
                + Duration::days(rng.below(365 * 70) as i64);
            let mut p = Patient {
                mrn: format!("{:06}", 123 + i * 4_111),
                first: rng.pick(FIRST).to_string(),
                last: rng.pick(LAST).to_string(),
                birth: BirthDate::Date(birth),
                sex: rng.pick(SEX).to_string(),
                race: rng.pick(RACE).to_string(),
                ethnicity: rng.pick(ETHNICITY).to_string(),
                ssn: (rng.below(3) != 0).then(|| {
                    format!(
                        "9{:02}-{:02}-{:04}",
                        rng.below(100),
                        1 + rng.below(99),
                        1 + rng.below(9999)
                    )
                }),
            };
            match row {
                BAD_BIRTH_TEXT => p.birth = BirthDate::Text("02/30/1975"),
                BAD_SEX => p.sex = "X".into(),
                BAD_BIRTH_ERROR => p.birth = BirthDate::Error,
                BAD_EMPTY_MRN => p.mrn = String::new(),
                _ => {}
            }
            p
        })
        .collect()
}

fn scaled(tenths: i64, decimals: u32) -> String {
    match decimals {
        0 => (tenths / 10).to_string(),
        _ => format!("{}.{}", tenths / 10, tenths % 10),
    }
}

fn lab(rng: &mut Rng, n: usize, mrns: &[String]) -> Lab {
    let test = rng.pick(TESTS);
    let start = NaiveDate::from_ymd_opt(2024, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .expect("valid date-time");
    let collected = start
        + Duration::days(rng.below(366) as i64)
        + Duration::minutes((6 * 60 + rng.below(15 * 60)) as i64);
    let mut value = scaled(
        test.low + rng.below((test.high - test.low) as u64) as i64,
        test.decimals,
    );
    let mut comparator = None;
    if test.code == "CMVPCR" && rng.below(2) == 0 {
        // Below the limit of quantitation: reported as "< 35".
        value = "35".into();
        comparator = Some("<".to_string());
    }
    Lab {
        lab_id: format!("A{n:07}"),
        mrn: rng.pick(mrns).clone(),
        test_code: test.code.into(),
        value,
        unit: test.unit.into(),
        collected_at: Collected::At(collected),
        ref_low: test.reference.map(|r| r.0.to_string()),
        ref_high: test.reference.map(|r| r.1.to_string()),
        comparator,
    }
}

fn labs(rng: &mut Rng, patients: &[Patient]) -> Vec<Lab> {
    let mrns: Vec<String> = patients
        .iter()
        .map(|p| p.mrn.clone())
        .filter(|m| !m.is_empty())
        .collect();
    (0..LABS)
        .map(|i| {
            let row = i + 2;
            let mut l = lab(rng, i + 1, &mrns);
            match row {
                BAD_TEST_CODE => l.test_code = "XYZ9".into(),
                BAD_VALUE => l.value = "pending".into(),
                BAD_UNKNOWN_MRN => l.mrn = "999999".into(),
                BAD_COLLECTED => l.collected_at = Collected::Text("2024-13-45 25:00:00"),
                _ => {}
            }
            l
        })
        .collect()
}

fn excel_datetime(dt: &NaiveDateTime) -> Result<ExcelDateTime> {
    Ok(ExcelDateTime::parse_from_str(
        &dt.format("%Y-%m-%d %H:%M:%S").to_string(),
    )?)
}

fn write_workbook(path: &Path, patients: &[Patient], labs: &[Lab]) -> Result<()> {
    let mut workbook = Workbook::new();
    // A fixed creation time keeps the file byte-for-byte reproducible.
    workbook.set_properties(
        &DocProperties::new().set_creation_datetime(&ExcelDateTime::from_ymd(2024, 1, 1)?),
    );
    let text = Format::new().set_num_format("@");
    let date = Format::new().set_num_format("yyyy-mm-dd");
    let datetime = Format::new().set_num_format("yyyy-mm-dd hh:mm");
    let sheet = workbook.add_worksheet().set_name("Patients")?;
    let headers = [
        "mrn",
        "first_name",
        "last_name",
        "birth_date",
        "sex",
        "race",
        "ethnicity",
        "ssn",
    ];
    for (c, h) in headers.iter().enumerate() {
        sheet.write_string(0, c as u16, *h)?;
    }
    for (i, p) in patients.iter().enumerate() {
        let r = (i + 1) as u32;
        if !p.mrn.is_empty() {
            sheet.write_string_with_format(r, 0, &p.mrn, &text)?;
        }
        sheet.write_string(r, 1, &p.first)?;
        sheet.write_string(r, 2, &p.last)?;
        match &p.birth {
            BirthDate::Date(d) => {
                let d = ExcelDateTime::parse_from_str(&d.format("%Y-%m-%d").to_string())?;
                sheet.write_datetime_with_format(r, 3, &d, &date)?;
            }
            BirthDate::Text(t) => {
                sheet.write_string_with_format(r, 3, *t, &text)?;
            }
            BirthDate::Error => {
                sheet.write_formula(r, 3, Formula::new("=NA()").set_result("#N/A"))?;
            }
        }
        sheet.write_string(r, 4, &p.sex)?;
        sheet.write_string(r, 5, &p.race)?;
        sheet.write_string(r, 6, &p.ethnicity)?;
        if let Some(ssn) = &p.ssn {
            sheet.write_string_with_format(r, 7, ssn, &text)?;
        }
    }
    sheet.set_column_width(0, 10)?;
    sheet.set_column_width(3, 12)?;
    let sheet = workbook.add_worksheet().set_name("Labs")?;
    for (c, h) in LAB_HEADERS.iter().enumerate() {
        sheet.write_string(0, c as u16, *h)?;
    }
    for (i, l) in labs.iter().enumerate() {
        let r = (i + 1) as u32;
        sheet.write_string_with_format(r, 0, &l.lab_id, &text)?;
        sheet.write_string_with_format(r, 1, &l.mrn, &text)?;
        sheet.write_string(r, 2, &l.test_code)?;
        match l.value.parse::<f64>() {
            Ok(v) => sheet.write_number(r, 3, v)?,
            Err(_) => sheet.write_string(r, 3, &l.value)?,
        };
        sheet.write_string(r, 4, &l.unit)?;
        match &l.collected_at {
            Collected::At(dt) => {
                sheet.write_datetime_with_format(r, 5, &excel_datetime(dt)?, &datetime)?;
            }
            Collected::Text(t) => {
                sheet.write_string(r, 5, *t)?;
            }
        }
        for (c, v) in [(6, &l.ref_low), (7, &l.ref_high)] {
            if let Some(v) = v {
                sheet.write_number(r, c, v.parse::<f64>()?)?;
            }
        }
        if let Some(c) = &l.comparator {
            sheet.write_string(r, 8, c)?;
        }
    }
    sheet.set_column_width(5, 17)?;
    workbook.save(path)?;
    Ok(())
}

const LAB_HEADERS: [&str; 9] = [
    "lab_id",
    "mrn",
    "test_code",
    "value",
    "unit",
    "collected_at",
    "ref_low",
    "ref_high",
    "comparator",
];

fn collected_text(c: &Collected) -> String {
    match c {
        Collected::At(dt) => dt.format("%Y-%m-%d %H:%M:%S").to_string(),
        Collected::Text(t) => t.to_string(),
    }
}

fn write_csv(path: &Path, labs: &[Lab]) -> Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(LAB_HEADERS)?;
    for l in labs {
        w.write_record([
            l.lab_id.as_str(),
            &l.mrn,
            &l.test_code,
            &l.value,
            &l.unit,
            &collected_text(&l.collected_at),
            l.ref_low.as_deref().unwrap_or(""),
            l.ref_high.as_deref().unwrap_or(""),
            l.comparator.as_deref().unwrap_or(""),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// The Parquet copy keeps real types, so values a typed column cannot hold (`pending`, the
/// impossible date) are nulls there.
fn write_parquet(path: &Path, labs: &[Lab]) -> Result<()> {
    let strings = |f: &dyn Fn(&Lab) -> Option<String>| labs.iter().map(f).collect::<Vec<_>>();
    let numbers = |f: &dyn Fn(&Lab) -> Option<String>| {
        labs.iter()
            .map(|l| f(l).and_then(|v| v.parse::<f64>().ok()))
            .collect::<Vec<_>>()
    };
    let micros: Vec<Option<i64>> = labs
        .iter()
        .map(|l| match &l.collected_at {
            Collected::At(dt) => Some(dt.and_utc().timestamp_micros()),
            Collected::Text(_) => None,
        })
        .collect();
    let collected = Column::new("collected_at".into(), micros)
        .cast(&DataType::Datetime(TimeUnit::Microseconds, None))?;
    let mut df = DataFrame::new_infer_height(vec![
        Column::new("lab_id".into(), strings(&|l| Some(l.lab_id.clone()))),
        Column::new("mrn".into(), strings(&|l| Some(l.mrn.clone()))),
        Column::new("test_code".into(), strings(&|l| Some(l.test_code.clone()))),
        Column::new("value".into(), numbers(&|l| Some(l.value.clone()))),
        Column::new("unit".into(), strings(&|l| Some(l.unit.clone()))),
        collected,
        Column::new("ref_low".into(), numbers(&|l| l.ref_low.clone())),
        Column::new("ref_high".into(), numbers(&|l| l.ref_high.clone())),
        Column::new("comparator".into(), strings(&|l| l.comparator.clone())),
    ])?;
    let file = std::fs::File::create(path)?;
    // Several row groups, so that the reader's group-by-group path is what the samples exercise.
    ParquetWriter::new(file)
        .with_row_group_size(Some(512))
        .finish(&mut df)?;
    Ok(())
}

/// A large labs CSV (~150 bytes a row) streamed straight to disk.
fn write_big_csv(rows: usize, path: &Path) -> Result<()> {
    let mut rng = Rng(SEED);
    let pats = patients(&mut rng);
    let mrns: Vec<String> = pats
        .iter()
        .map(|p| p.mrn.clone())
        .filter(|m| !m.is_empty())
        .collect();
    let file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut w = csv::Writer::from_writer(file);
    let mut headers = LAB_HEADERS.to_vec();
    headers.push("note");
    w.write_record(&headers)?;
    const NOTES: &[&str] = &[
        "Specimen received at core lab; hemolysis index normal; result verified by technologist",
        "Drawn from central line after flush; repeat requested if value outside expected range",
        "Collected pre-infusion; sample stored at 4C and analysed within two hours of draw time",
    ];
    for n in 0..rows {
        let l = lab(&mut rng, n + 1, &mrns);
        w.write_record([
            l.lab_id.as_str(),
            &l.mrn,
            &l.test_code,
            &l.value,
            &l.unit,
            &collected_text(&l.collected_at),
            l.ref_low.as_deref().unwrap_or(""),
            l.ref_high.as_deref().unwrap_or(""),
            l.comparator.as_deref().unwrap_or(""),
            *rng.pick(NOTES),
        ])?;
    }
    w.into_inner().map_err(|e| e.to_string())?.flush()?;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [flag, rows, path] if flag == "--big-csv" => write_big_csv(rows.parse()?, Path::new(path)),
        [dir] => {
            let dir = Path::new(dir);
            std::fs::create_dir_all(dir)?;
            let mut rng = Rng(SEED);
            let patients = patients(&mut rng);
            let labs = labs(&mut rng, &patients);
            write_workbook(&dir.join("registry.xlsx"), &patients, &labs)?;
            write_csv(&dir.join("labs.csv"), &labs)?;
            write_parquet(&dir.join("labs.parquet"), &labs)?;
            println!(
                "wrote {} patients and {} labs to {}",
                patients.len(),
                labs.len(),
                dir.display()
            );
            Ok(())
        }
        _ => Err("usage: gen-samples DIR | gen-samples --big-csv ROWS FILE".into()),
    }
}
