//! Mapping throughput: generated lab rows → validated Observation NDJSON through the shipped
//! CIBMTR lab mapping and the dry-run sink, for `--jobs 1` and `--jobs 2`, with peak memory.
//!
//! `cargo bench --bench mapping` runs every case in a child process of its own (so that each
//! peak-memory figure belongs to one case) and prints one line per case. A single case:
//! `cargo bench --bench mapping -- ROWS JOBS`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use fhirlift::config::PipelineConfig;
use fhirlift::mapping::MappingSet;
use fhirlift::pipeline::{self, RowStream, RunOptions, SourceItem, Sources};
use fhirlift::sink::dry_run::{DryRunOptions, DryRunSink};
use fhirlift::source::{Header, Row, RowLocation, Value};
use rust_decimal::Decimal;

// The same allocator as the `fhirlift` binary, so the figures are the binary's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CODES: [(&str, &str); 12] = [
    ("HGB", "g/dL"),
    ("WBC", "K/uL"),
    ("PLT", "K/uL"),
    ("ANC", "K/uL"),
    ("CREAT", "mg/dL"),
    ("ALT", "U/L"),
    ("AST", "U/L"),
    ("TBILI", "mg/dL"),
    ("ALB", "g/dL"),
    ("LDH", "U/L"),
    ("FERRITIN", "ng/mL"),
    ("CMVPCR", "IU/mL"),
];

/// Rows made on demand, so the input itself takes no memory.
struct Generated {
    rows: u64,
}

impl Sources for Generated {
    fn open(
        &mut self,
        _source: &str,
    ) -> Result<RowStream, Box<dyn std::error::Error + Send + Sync>> {
        let header = Arc::new(Header::new([
            "lab_id",
            "mrn",
            "test_code",
            "value",
            "unit",
            "collected_at",
            "ref_low",
            "ref_high",
            "comparator",
        ]));
        let file: Arc<str> = "labs.csv".into();
        let base = chrono::NaiveDate::from_ymd_opt(2024, 1, 1)
            .and_then(|d| d.and_hms_opt(8, 0, 0))
            .ok_or("bad base date")?;
        Ok(Box::new((0..self.rows).map(move |i| {
            let (code, unit) = CODES[(i % CODES.len() as u64) as usize];
            let value = Decimal::new(50 + (i % 900) as i64, 1);
            // Daytime draws: a night-time wall clock could fall in a daylight-saving gap,
            // which the mapping rightly rejects.
            let at = base
                + chrono::Duration::days((i % 366) as i64)
                + chrono::Duration::minutes((i % 600) as i64);
            let cmv = code == "CMVPCR";
            let values = vec![
                Value::Text(format!("A{i:08}")),
                Value::Text(format!("{:06}", i % 5000)),
                Value::Text(code.to_string()),
                Value::Decimal(value),
                Value::Text(unit.to_string()),
                Value::DateTime(at),
                if cmv {
                    Value::Null
                } else {
                    Value::Decimal(Decimal::new(40, 1))
                },
                if cmv {
                    Value::Null
                } else {
                    Value::Decimal(Decimal::new(160, 1))
                },
                if cmv {
                    Value::Text("<".into())
                } else {
                    Value::Null
                },
            ];
            let raw = values.iter().map(|v| v.to_string()).collect();
            Ok(SourceItem::Row(Row {
                location: RowLocation {
                    file: file.clone(),
                    sheet: None,
                    row: i + 2,
                },
                header: header.clone(),
                values,
                raw,
                errors: Vec::new(),
            }))
        })))
    }
}

/// Peak resident memory of this process, from /proc (Linux), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn one_case(rows: u64, jobs: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config_path = dir.path().join("pipeline.toml");
    std::fs::write(
        &config_path,
        format!(
            "mappings = [{:?}]\n[center]\nccn = \"12001\"\n[defaults]\ntimezone = \"America/Chicago\"\n[sources.labs]\npath = \"labs.csv\"\n",
            repo.join("mappings/cibmtr-lab.toml").display().to_string()
        ),
    )?;
    let config = PipelineConfig::load(&config_path).map_err(|e| format!("{e:?}"))?;
    let set = MappingSet::load(&config).map_err(|e| format!("{e:?}"))?;
    let out = dir.path().join("out");
    let sink = DryRunSink::create(
        &out,
        DryRunOptions {
            ccn: "12001".into(),
            bundles: false,
        },
    )?;
    let opts = RunOptions {
        jobs,
        batch_size: pipeline::DEFAULT_BATCH,
        report_dir: out.clone(),
        config_sha256: String::new(),
        dry_run: true,
        progress: false,
        known_rows: None,
    };
    let started = Instant::now();
    let report = pipeline::run(&set, &mut Generated { rows }, Box::new(sink), &opts)?;
    let secs = started.elapsed().as_secs_f64();
    let resources = report.resources.get("Observation").copied().unwrap_or(0);
    if report.rows_rejected != 0 || resources != rows {
        return Err(format!(
            "expected {rows} Observations and no reject, got {resources} and {} rejects",
            report.rows_rejected
        )
        .into());
    }
    let bytes = std::fs::metadata(out.join("Observation.ndjson"))?.len();
    println!(
        "rows={rows:>8} jobs={jobs} time={secs:>6.2}s rows/s={:>8.0} resources/s={:>8.0} ndjson={:.0}MiB peak_rss={:.0}MiB",
        rows as f64 / secs,
        resources as f64 / secs,
        bytes as f64 / (1024.0 * 1024.0),
        peak_rss_mib().unwrap_or(f64::NAN),
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; ignore flags.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if let [rows, jobs] = args.as_slice() {
        return one_case(rows.parse()?, jobs.parse()?);
    }
    let exe = std::env::current_exe()?;
    for rows in [200_000u64, 1_000_000] {
        for jobs in [1usize, 2] {
            let status = std::process::Command::new(&exe)
                .args([rows.to_string(), jobs.to_string()])
                .status()?;
            if !status.success() {
                return Err(format!("case rows={rows} jobs={jobs} failed").into());
            }
        }
    }
    Ok(())
}
