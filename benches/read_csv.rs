//! Reader throughput: rows per second through the public reader API, untyped and typed.
//!
//!     cargo bench --bench read_csv                 # a generated 300,000-row labs CSV
//!     cargo bench --bench read_csv -- FILE.csv     # any CSV (e.g. the gen-samples --big-csv one)
//!
//! Prints one line per case; the figures go into README.md by hand. Nothing here asserts a time.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use fhirlift::config::{ColumnSpec, ColumnType, Defaults, SourceConfig};
use fhirlift::source;

fn generate(path: &Path, rows: usize) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(
        w,
        "lab_id,mrn,test_code,value,unit,collected_at,ref_low,ref_high,comparator,note"
    )?;
    for i in 0..rows {
        writeln!(
            w,
            "A{i:07},{:06},HGB,{}.{},g/dL,2024-{:02}-{:02} {:02}:{:02}:00,12.0,17.5,,\"Drawn from central line after flush; repeat requested if outside range\"",
            (i * 7919) % 1_000_000,
            7 + i % 10,
            i % 10,
            1 + i % 12,
            1 + i % 28,
            6 + i % 15,
            i % 60
        )?;
    }
    w.flush()
}

fn measure(label: &str, cfg: &SourceConfig, bytes: u64) {
    let start = Instant::now();
    let mut reader = source::open("bench", cfg, &Defaults::default()).expect("open");
    let (mut rows, mut errors) = (0u64, 0u64);
    for item in reader.by_ref() {
        match item {
            Ok(row) => {
                rows += 1;
                errors += u64::from(row.has_errors());
            }
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{label:<28} {rows:>9} rows  {errors:>3} with errors  {secs:>7.2} s  {:>9.0} rows/s  {:>6.1} MB/s",
        rows as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
}

fn main() {
    let arg = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = match arg {
        Some(p) => p.into(),
        None => {
            let p = dir.path().join("labs.csv");
            generate(&p, 300_000).expect("generate");
            p
        }
    };
    let bytes = std::fs::metadata(&path).expect("file").len();
    let untyped = SourceConfig::for_path(&path);
    measure("csv, untyped", &untyped, bytes);
    let mut typed = untyped.clone();
    for (c, k) in [
        ("value", ColumnType::Decimal),
        ("collected_at", ColumnType::Datetime),
        ("ref_low", ColumnType::Decimal),
        ("ref_high", ColumnType::Decimal),
    ] {
        typed.columns.insert(
            c.into(),
            ColumnSpec {
                kind: k,
                formats: vec![],
                decimal_comma: false,
                pad_zeros: None,
            },
        );
    }
    measure("csv, 4 typed columns", &typed, bytes);
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    for (label, file, sheet) in [
        ("xlsx sample (Labs sheet)", "registry.xlsx", Some("Labs")),
        ("parquet sample", "labs.parquet", None),
    ] {
        let p = samples.join(file);
        let mut cfg = SourceConfig::for_path(&p);
        cfg.sheet = sheet.map(|s| fhirlift::config::SheetRef::Name(s.into()));
        let bytes = std::fs::metadata(&p).expect("sample").len();
        measure(label, &cfg, bytes);
    }
}
