//! Integration tests: hostile input, faults under load, secrets and patient data, template safety.
//!
//! Every child process runs with a memory limit and a time limit, so that a reader that inflates
//! without bound or loops forever fails its test instead of taking the machine down. These tests
//! never assert how fast anything is; the time limit only catches hangs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::common::{StandaloneSandbox as Sandbox, fhirlift, repo};

/// Virtual memory a child may map (KiB): far above what any file here needs read properly, far
/// below what an unbounded reader asks for.
const CHILD_MEMORY_KIB: u64 = 4 << 20;

/// Past this a child is taken for hung.
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn bad(name: &str) -> PathBuf {
    repo().join("tests/fixtures/bad").join(name)
}

/// What a finished child did.
struct Finished {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn describe(&self) -> String {
        format!(
            "exit {:?}\nstderr:\n{}\nstdout (start):\n{}",
            self.code,
            tail(&self.stderr, 4000),
            tail(&self.stdout, 2000)
        )
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// Runs `cmd` under a memory limit (`ulimit -v`) and a time limit, with its output in files (so a
/// child that prints a lot never blocks on a pipe). A child still running at the limit is killed
/// and the test fails.
fn run_bounded(cmd: &Command, scratch: &Path) -> Finished {
    let out_path = scratch.join(format!("stdout-{}", rand::random::<u32>()));
    let err_path = scratch.join(format!("stderr-{}", rand::random::<u32>()));
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(format!(
            "ulimit -v {CHILD_MEMORY_KIB} && exec \"$0\" \"$@\""
        ))
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"));
    if let Some(dir) = cmd.get_current_dir() {
        sh.current_dir(dir);
    }
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let mut child = sh.spawn().expect("spawn");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll child") {
            break status;
        }
        if started.elapsed() > CHILD_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{:?} hung (killed after {CHILD_TIMEOUT:?}); stderr:\n{}",
                cmd.get_args().collect::<Vec<_>>(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let f = Finished {
        code: status.code(),
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    // Never a panic, an abort (allocation failure) or any other signal.
    assert!(
        !f.stderr.contains("panicked") && !f.stderr.contains("memory allocation of"),
        "{:?} crashed:\n{}",
        cmd.get_args().collect::<Vec<_>>(),
        f.describe()
    );
    assert!(
        f.code.is_some(),
        "{:?} died of a signal:\n{}",
        cmd.get_args().collect::<Vec<_>>(),
        f.describe()
    );
    f
}

/// The role a corpus file plays in a dry run.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Role {
    /// The patients source (read as the CIBMTR pack's patient list).
    Patients,
    /// The labs source, with `good-patients.csv` as the patients.
    Labs,
}

/// What a command must do with a file.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Exit 0.
    Clean,
    /// Exit 1: some rows rejected, each named by its location; the rest read.
    Rows,
    /// Exit 2 with an error that names the file and contains this text.
    Fatal(&'static str),
}

struct Case {
    file: &'static str,
    inspect: Expect,
    role: Role,
    dry_run: Expect,
}

const fn case(file: &'static str, inspect: Expect, role: Role, dry_run: Expect) -> Case {
    Case {
        file,
        inspect,
        role,
        dry_run,
    }
}

use Expect::{Clean, Fatal, Rows};
use Role::{Labs, Patients};

/// Every file of the corpus and what it must give. A file missing from this table fails
/// `every_corpus_file_is_in_the_table`.
const CASES: &[Case] = &[
    // Workbooks that cannot be read at all.
    case(
        "truncated.xlsx",
        Fatal("not a readable Excel"),
        Patients,
        Fatal("not a readable Excel"),
    ),
    case(
        "truncated-end.xlsx",
        Fatal("not a readable Excel"),
        Patients,
        Fatal("not a readable Excel"),
    ),
    case(
        "not-a-zip.xlsx",
        Fatal("not a readable Excel"),
        Patients,
        Fatal("not a readable Excel"),
    ),
    case(
        "empty.xlsx",
        Fatal("not a readable Excel"),
        Patients,
        Fatal("not a readable Excel"),
    ),
    case(
        "text-as.xlsx",
        Fatal("not a readable Excel"),
        Patients,
        Fatal("not a readable Excel"),
    ),
    case(
        "corrupt-sheet-xml.xlsx",
        Fatal("Xml error"),
        Patients,
        Fatal("Xml error"),
    ),
    case(
        "bad-cell-ref.xlsx",
        Fatal("[Patients]: header only"),
        Patients,
        Fatal("not in the header"),
    ),
    case(
        "sparse-bomb.xlsx",
        Fatal("[Patients]: refused: its cells span 1048576 rows"),
        Patients,
        Fatal("refused"),
    ),
    case(
        "zip-bomb.xlsx",
        Fatal("refused: part \"xl/worksheets/sheet1.xml\" inflates past"),
        Patients,
        Fatal("refused"),
    ),
    case(
        "zip-bomb-lying-size.xlsx",
        Fatal("larger than its declared uncompressed size"),
        Patients,
        Fatal("declared uncompressed size"),
    ),
    case(
        "garbage.xls",
        Fatal("not a readable Excel 97-2003"),
        Patients,
        Fatal("not a readable Excel 97-2003"),
    ),
    case(
        "text-as.xls",
        Fatal("not a readable Excel 97-2003"),
        Patients,
        Fatal("not a readable Excel 97-2003"),
    ),
    case(
        "garbage.xlsb",
        Fatal("not a readable Excel binary"),
        Patients,
        Fatal("not a readable Excel binary"),
    ),
    case(
        "truncated.ods",
        Fatal("not a readable OpenDocument"),
        Patients,
        Fatal("not a readable OpenDocument"),
    ),
    case(
        "corrupt-content.ods",
        Fatal("not a readable OpenDocument"),
        Patients,
        Fatal("not a readable OpenDocument"),
    ),
    case(
        "repeat-bomb.ods",
        Fatal("Cell limit exceeded"),
        Patients,
        Fatal("Cell limit exceeded"),
    ),
    // Workbook cells: formulas without cached values, error cells, edge date serials and numbers.
    case("formulas-errors-dates.xlsx", Rows, Patients, Rows),
    // Parquet files that cannot be read, and edge values that can.
    case(
        "truncated.parquet",
        Fatal("not a readable Parquet file"),
        Labs,
        Fatal("not a readable Parquet file"),
    ),
    case(
        "bad-magic.parquet",
        Fatal("not a readable Parquet file"),
        Labs,
        Fatal("not a readable Parquet file"),
    ),
    case(
        "bad-footer-length.parquet",
        Fatal("not a readable Parquet file"),
        Labs,
        Fatal("not a readable Parquet file"),
    ),
    case(
        "garbage.parquet",
        Fatal("not a readable Parquet file"),
        Labs,
        Fatal("not a readable Parquet file"),
    ),
    case(
        "empty.parquet",
        Fatal("not a readable Parquet file"),
        Labs,
        Fatal("not a readable Parquet file"),
    ),
    case("edge-values.parquet", Rows, Labs, Rows),
    // CSV files that stop a source.
    case(
        "empty.csv",
        Fatal("the file is empty"),
        Patients,
        Fatal("the file is empty"),
    ),
    case(
        "only-newlines.csv",
        Fatal("the file is empty"),
        Patients,
        Fatal("the file is empty"),
    ),
    case("header-only.csv", Fatal("header only"), Patients, Clean),
    case(
        "blank-header.csv",
        Fatal(":1: column 2 has a blank header"),
        Patients,
        Fatal("blank header"),
    ),
    case(
        "duplicate-header.csv",
        Fatal(":1: header \"mrn\" appears twice"),
        Patients,
        Fatal("appears twice"),
    ),
    case(
        "undecodable-header.csv",
        Fatal(":1: header"),
        Patients,
        Fatal("not valid text"),
    ),
    case("binary-garbage.csv", Fatal(":1: "), Patients, Fatal(":1: ")),
    case(
        "template-text-header.csv",
        Clean,
        Patients,
        Fatal("not in the header"),
    ),
    // CSV rows that are rejected one by one while the others go on.
    case("invalid-utf8.csv", Rows, Patients, Rows),
    case("nul-bytes.csv", Rows, Patients, Rows),
    case(
        "utf16-no-bom.csv",
        Rows,
        Patients,
        Fatal("not in the header"),
    ),
    case("unbalanced-quotes.csv", Rows, Patients, Rows),
    case("ragged.csv", Rows, Patients, Rows),
    case("stray-quote.csv", Clean, Patients, Clean),
    case("huge-cell.csv", Clean, Patients, Clean),
    case("wide-10000-columns.csv", Clean, Patients, Clean),
    case("edge-dates.csv", Clean, Patients, Rows),
    case("edge-numbers.csv", Clean, Labs, Rows),
    case("rtl-combining.csv", Clean, Patients, Clean),
    case("template-text-patients.csv", Clean, Patients, Rows),
    case("template-text-labs.csv", Clean, Labs, Rows),
    case("good-patients.csv", Clean, Patients, Clean),
];

#[test]
fn every_corpus_file_is_in_the_table() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(repo().join("tests/fixtures/bad"))
        .expect("corpus folder")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".py") && !n.ends_with(".md"))
        .collect();
    let listed: BTreeSet<String> = CASES.iter().map(|c| c.file.to_string()).collect();
    assert_eq!(on_disk, listed);
    assert!(listed.len() >= 30, "the corpus has at least 30 files");
}

fn check_expect(what: &str, file: &str, expect: Expect, f: &Finished) -> Result<(), String> {
    let ctx = |why: &str| Err(format!("{what} {file}: {why}: {}", f.describe()));
    match expect {
        Clean if f.code != Some(0) => ctx("expected exit 0"),
        Rows if f.code != Some(1) => ctx("expected exit 1"),
        Fatal(text) => {
            if f.code != Some(2) {
                return ctx("expected exit 2");
            }
            let Some(line) = f.stderr.lines().find(|l| l.starts_with("error: ")) else {
                return ctx("no error line");
            };
            if !line.contains(file) {
                return ctx("the error does not name the file");
            }
            if !line.contains(text) {
                return ctx(&format!("expected {text:?}"));
            }
            // One clear line, not a wall: a hostile header must not flood the terminal.
            if line.len() > 2000 {
                return ctx(&format!("an error line of {} bytes", line.len()));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

#[test]
fn inspect_gives_a_clear_error_or_located_row_errors_for_every_hostile_file() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for c in CASES {
        let mut cmd = fhirlift();
        cmd.args(["inspect", "--format", "ndjson"]).arg(bad(c.file));
        let f = run_bounded(&cmd, scratch.path());
        if let Err(e) = check_expect("inspect", c.file, c.inspect, &f) {
            failures.push(e);
            continue;
        }
        if matches!(c.inspect, Clean | Rows) {
            let mut errors = 0;
            for line in f.stdout.lines() {
                let v: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("inspect {}: a line is not JSON ({e})", c.file));
                let loc = v["_location"].as_str().expect("every row has a location");
                assert!(loc.starts_with(c.file), "{loc}");
                if v.get("_errors").is_some() || v.get("_row_error").is_some() {
                    errors += 1;
                }
            }
            assert_eq!(
                errors > 0,
                matches!(c.inspect, Rows),
                "inspect {}: row errors iff exit 1",
                c.file
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// A pipeline config reading `file` in `role` through the CIBMTR pack.
fn corpus_config(dir: &Path, file: &Path, role: Role) -> PathBuf {
    let sheet = match file.extension().and_then(|e| e.to_str()) {
        Some("xlsx" | "xls" | "xlsb" | "ods") => "sheet = \"Patients\"\n",
        _ => "",
    };
    let (patients, labs) = match role {
        Patients => (
            format!("path = {:?}\n{sheet}", file.display().to_string()),
            None,
        ),
        Labs => (
            format!(
                "path = {:?}\n",
                bad("good-patients.csv").display().to_string()
            ),
            Some(format!("path = {:?}\n", file.display().to_string())),
        ),
    };
    let mut config = format!(
        r#"mappings = [{:?}{}]

[center]
ccn = "12001"

[defaults]
timezone = "America/Chicago"

[sources.patients]
{patients}
[sources.patients.columns]
mrn = {{ type = "string" }}
birth_date = {{ type = "date", formats = ["%m/%d/%Y"] }}
ssn = {{ type = "string" }}
"#,
        repo()
            .join("mappings/cibmtr-patient.toml")
            .display()
            .to_string(),
        match role {
            Patients => String::new(),
            Labs => format!(
                ", {:?}",
                repo()
                    .join("mappings/cibmtr-lab.toml")
                    .display()
                    .to_string()
            ),
        },
    );
    if let Some(labs) = labs {
        config.push_str(&format!(
            r#"
[sources.labs]
{labs}
[sources.labs.columns]
lab_id = {{ type = "string" }}
mrn = {{ type = "string" }}
value = {{ type = "decimal" }}
ref_low = {{ type = "decimal" }}
ref_high = {{ type = "decimal" }}
collected_at = {{ type = "datetime" }}
"#
        ));
    }
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// Every output NDJSON line is JSON, and every FHIR resource passes R4 validation.
fn check_outputs(out: &Path, file: &str) -> usize {
    let mut resources = 0;
    for entry in std::fs::read_dir(out).expect("output folder") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !name.ends_with(".ndjson") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("output is UTF-8");
        for (i, line) in text.lines().enumerate() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{file}: {name} line {} is not JSON: {e}", i + 1));
            if name == "crid-requests.ndjson" {
                continue;
            }
            let issues = fhirlift::validate::validate_r4(&v);
            let errors: Vec<_> = fhirlift::validate::errors(&issues).collect();
            assert!(
                errors.is_empty(),
                "{file}: {name} line {} fails R4: {errors:?}",
                i + 1
            );
            resources += 1;
        }
    }
    resources
}

#[test]
fn dry_runs_of_hostile_files_reject_rows_cleanly_and_write_only_valid_fhir() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut failures = Vec::new();
    for (i, c) in CASES.iter().enumerate() {
        let dir = scratch.path().join(format!("case-{i}"));
        std::fs::create_dir_all(&dir).expect("case dir");
        let config = corpus_config(&dir, &bad(c.file), c.role);
        let out = dir.join("out");
        let mut cmd = fhirlift();
        cmd.args(["run", "--dry-run", "--no-progress", "--bundles", "--out"])
            .arg(&out)
            .arg(&config);
        let f = run_bounded(&cmd, scratch.path());
        if let Err(e) = check_expect("dry run", c.file, c.dry_run, &f) {
            failures.push(e);
            continue;
        }
        if matches!(c.dry_run, Fatal(_)) {
            continue;
        }
        check_outputs(&out, c.file);
        let rejects = std::fs::read_to_string(out.join("rejects.csv")).unwrap_or_default();
        let mut reader = csv::Reader::from_reader(rejects.as_bytes());
        let mut n = 0;
        for rec in reader.records() {
            let rec = rec.unwrap_or_else(|e| panic!("{}: rejects.csv is CSV: {e}", c.file));
            n += 1;
            let location = rec.get(0).unwrap_or_default();
            assert!(
                location.starts_with(c.file) || location.starts_with("good-patients.csv"),
                "{}: a reject is located: {location}",
                c.file
            );
            assert!(
                !rec.get(3).unwrap_or_default().is_empty(),
                "{}: a reason",
                c.file
            );
        }
        assert_eq!(
            n > 0,
            matches!(c.dry_run, Rows),
            "{}: rejects iff exit 1",
            c.file
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn markup_and_template_text_comes_out_as_plain_text() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = corpus_config(dir.path(), &bad("template-text-patients.csv"), Patients);
    let out = dir.path().join("out");
    let mut cmd = fhirlift();
    cmd.args(["run", "--dry-run", "--no-progress", "--out"])
        .arg(&out)
        .arg(&config);
    let f = run_bounded(&cmd, dir.path());
    assert_eq!(f.code, Some(1), "{}", f.describe());
    let crids = std::fs::read_to_string(out.join("crid-requests.ndjson")).expect("crid requests");
    let names: BTreeSet<String> = crids
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
            v["patient"]["firstName"]
                .as_str()
                .expect("a name")
                .to_string()
        })
        .collect();
    // Each hostile text arrives exactly as written: not evaluated, not cut, not escaped twice.
    for text in [
        "{{ 7*7 }}",
        "\"}",
        "</script><script>alert(1)</script>",
        "{% raw %}",
        "{{ config }}",
        "\", \"resourceType\": \"Bundle",
    ] {
        assert!(names.contains(text), "{text:?} not kept in {names:?}");
    }
    assert!(
        !crids.contains("\"49\""),
        "a template expression was evaluated"
    );
    let patients = std::fs::read_to_string(out.join("Patient.ndjson")).expect("patients");
    assert_eq!(
        patients.lines().count(),
        10,
        "one Patient per well-keyed row"
    );
    for l in patients.lines() {
        let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
        assert_eq!(v["resourceType"], "Patient");
    }
}

/// The bug the corpus found first: a workbook with two cells at opposite corners of a sheet made
/// calamine allocate a grid of 17 billion cells and the process abort.
#[test]
fn sparse_bomb_xlsx_is_refused_before_the_grid_is_allocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = fhirlift();
    cmd.arg("inspect").arg(bad("sparse-bomb.xlsx"));
    let f = run_bounded(&cmd, dir.path());
    assert_eq!(f.code, Some(2), "{}", f.describe());
    assert!(
        f.stderr.contains(
            "sparse-bomb.xlsx[Patients]: refused: its cells span 1048576 rows × 16384 columns"
        ),
        "{}",
        f.describe()
    );
}

/// A sheet XML that inflates to hundreds of megabytes from one megabyte is refused by its size
/// before calamine parses it.
#[test]
fn zip_bomb_xlsx_is_refused_by_what_it_inflates_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = fhirlift();
    cmd.arg("inspect").arg(bad("zip-bomb.xlsx"));
    let f = run_bounded(&cmd, dir.path());
    assert_eq!(f.code, Some(2), "{}", f.describe());
    assert!(
        f.stderr.contains("inflates past 256 MiB"),
        "{}",
        f.describe()
    );
    assert!(std::fs::metadata(bad("zip-bomb.xlsx")).expect("bomb").len() < 2 << 20);
}

// ---------------------------------------------------------------------------------------------
// Template safety
// ---------------------------------------------------------------------------------------------

/// A pipeline whose only mapping renders `template` (under templates/t/) for each row of a small
/// labs file.
fn template_pipeline(dir: &Path, template: &str) -> PathBuf {
    let tdir = dir.join("templates/t");
    std::fs::create_dir_all(&tdir).expect("mkdir");
    std::fs::write(tdir.join("hostile.json.j2"), template).expect("template");
    let mdir = dir.join("mappings");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    std::fs::write(
        mdir.join("hostile.toml"),
        "name = \"hostile\"\nsource = \"labs\"\nkind = \"resource\"\nresource_type = \"Observation\"\ntemplate = \"t/hostile.json.j2\"\npatient_key = [\"mrn\"]\nrecord_key = [\"lab_id\"]\nidentifier_system = \"urn:x:lab\"\n",
    )
    .expect("mapping");
    std::fs::write(
        dir.join("labs.csv"),
        "lab_id,mrn,value\nA1,900101,12.5\nA2,900101,13.5\n",
    )
    .expect("labs");
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        "mappings = [\"mappings/hostile.toml\"]\n[center]\nccn = \"12001\"\n[sources.labs]\npath = \"labs.csv\"\n",
    )
    .expect("config");
    config
}

/// Dry-runs a hostile template; returns the run and the reasons of its rejects.
fn run_template(template: &str) -> (Finished, Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = template_pipeline(dir.path(), template);
    let out = dir.path().join("out");
    let mut cmd = fhirlift();
    cmd.args(["run", "--dry-run", "--no-progress", "--jobs", "1", "--out"])
        .arg(&out)
        .arg(&config)
        .env("FHIRLIFT_TEST_CANARY", "canary-from-the-environment");
    let f = run_bounded(&cmd, dir.path());
    let rejects = std::fs::read_to_string(out.join("rejects.csv")).unwrap_or_default();
    let reasons = csv::Reader::from_reader(rejects.as_bytes())
        .records()
        .map(|r| r.expect("csv")[3].to_string())
        .collect();
    (f, reasons, dir)
}

/// Every way a template might reach a file or the environment fails, and nothing of the file or
/// the variable reaches any output.
#[test]
fn templates_cannot_read_files_or_environment_variables() {
    let secret_file = std::env::temp_dir().join(format!("fhirlift-canary-{}", std::process::id()));
    std::fs::write(&secret_file, "canary-from-a-file").expect("canary file");
    let path = secret_file.display().to_string();
    let attempts = [
        format!("{{% include {path:?} %}}"),
        format!("{{% import {path:?} as x %}}"),
        format!("{{% extends {path:?} %}}"),
        "{% include \"../../pipeline.toml\" %}".to_string(),
        "{% include \"/etc/passwd\" %}".to_string(),
        "{{ env.FHIRLIFT_TEST_CANARY }}".to_string(),
        "{{ environ[\"FHIRLIFT_TEST_CANARY\"] }}".to_string(),
        "{{ getenv(\"FHIRLIFT_TEST_CANARY\") }}".to_string(),
        "{{ open(\"/etc/passwd\") }}".to_string(),
        "{{ self.__init__ }}".to_string(),
        "{{ range.__globals__ }}".to_string(),
        "{{ lookup(\"/etc/passwd\", \"root\") }}".to_string(),
    ];
    for attempt in attempts {
        let template = format!(
            "{{\"resourceType\": \"Observation\", \"status\": \"final\", \"note\": {attempt}}}"
        );
        let (f, reasons, dir) = run_template(&template);
        let outputs: String = walk(&dir.path().join("out"))
            .iter()
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned())
            .collect();
        for text in [&f.stdout, &f.stderr, &outputs] {
            assert!(
                !text.contains("canary-from"),
                "{attempt}: leaked\n{}",
                f.describe()
            );
            assert!(!text.contains("root:x:0"), "{attempt}: leaked /etc/passwd");
            assert!(!text.contains("[center]"), "{attempt}: leaked the config");
        }
        // Either the template is refused up front (exit 2) or every row is rejected (exit 1),
        // with the template named.
        match f.code {
            Some(2) => assert!(
                f.stderr.contains("hostile.json.j2"),
                "{attempt}: {}",
                f.describe()
            ),
            Some(1) => {
                assert_eq!(reasons.len(), 2, "{attempt}: every row rejected");
                for r in &reasons {
                    assert!(r.contains("hostile.json.j2"), "{attempt}: {r}");
                }
            }
            other => panic!("{attempt}: exit {other:?}\n{}", f.describe()),
        }
    }
    let _ = std::fs::remove_file(&secret_file);
}

/// A template that would loop for ever (or for 10^10 steps) is stopped by the fuel limit, and
/// the reject says so and names the template; minijinja's own limits stop deep recursion, huge
/// ranges and huge repeated strings. Not covered: fuel counts steps, not bytes, so a template
/// that doubles a string in a loop (`s ~ s`) exhausts memory in a few dozen steps. Templates are
/// configuration, written and reviewed like code; row data can never become template code (see
/// `markup_and_template_text_comes_out_as_plain_text`).
#[test]
fn a_runaway_template_is_stopped_by_the_fuel_limit() {
    // (template, what the reason must say)
    for (runaway, why) in [
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}",
            "fuel",
        ),
        (
            "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
            "fuel",
        ),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ""),
        ("{{ \"x\" * 1000000000 }}", "too large"),
        (
            "{% for i in range(1000000000) %}{% endfor %}",
            "too many elements",
        ),
    ] {
        let template = format!(
            "{{\"resourceType\": \"Observation\", \"status\": \"final\", \"x\": \"{runaway}\"}}"
        );
        let (f, reasons, _dir) = run_template(&template);
        assert_eq!(f.code, Some(1), "{runaway}: {}", f.describe());
        assert_eq!(reasons.len(), 2, "{runaway}");
        for r in &reasons {
            assert!(r.contains("hostile.json.j2"), "{runaway}: {r}");
            assert!(r.contains(why), "{runaway}: the reason says why: {r}");
            eprintln!("{runaway}\n  -> {}", r.lines().next().unwrap_or_default());
        }
    }
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// A standalone sandbox, a recording proxy in front of it, and a registry to load
// ---------------------------------------------------------------------------------------------

/// A TCP proxy on 127.0.0.1 that forwards to `upstream` and keeps every byte the server sends,
/// so a test knows the access tokens the client was given.
struct Proxy {
    url: String,
    from_server: Arc<Mutex<Vec<u8>>>,
}

impl Proxy {
    fn start(upstream_url: &str) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        let upstream = upstream_url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let from_server = Arc::new(Mutex::new(Vec::new()));
        let seen = from_server.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                    continue;
                };
                pipe(client, server, None);
                pipe(s2, c2, Some(seen.clone()));
            }
        });
        Proxy { url, from_server }
    }

    /// Every `access_token` the server handed out through this proxy.
    fn tokens(&self) -> Vec<String> {
        let bytes = self.from_server.lock().expect("lock").clone();
        let text = String::from_utf8_lossy(&bytes);
        let mut out = Vec::new();
        for (i, _) in text.match_indices("\"access_token\"") {
            let rest = &text[i + "\"access_token\"".len()..];
            let rest = rest.trim_start_matches([':', ' ']).trim_start_matches('"');
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
            }
        }
        out
    }
}

fn pipe(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    record: Option<Arc<Mutex<Vec<u8>>>>,
) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown(std::net::Shutdown::Write);
                    break;
                }
                Ok(n) => {
                    if let Some(r) = &record {
                        r.lock().expect("lock").extend_from_slice(&buf[..n]);
                    }
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// A synthetic registry written as the CSV files the shipped pack reads.
struct Registry {
    /// (mrn, first, last, birth date, ssn)
    patients: Vec<(String, String, String, String, String)>,
    /// lab ids
    labs: Vec<String>,
}

impl Registry {
    /// `patients` patients with `labs_per_patient` labs each. Names, SSNs and birth dates are
    /// distinctive so that a leak is found by a plain text search.
    fn generate(patients: usize, labs_per_patient: usize) -> Registry {
        let mut r = Registry {
            patients: Vec::new(),
            labs: Vec::new(),
        };
        for p in 0..patients {
            let mrn = format!("{p:06}");
            r.patients.push((
                mrn.clone(),
                format!("Quillonia{p}x"),
                format!("Vorthwick{p}y"),
                format!("19{:02}-{:02}-{:02}", 40 + p % 50, 1 + p % 12, 10 + p % 18),
                // `p % 10_000` keeps the serial to four digits (it was `1000 + p`, which made the
                // SSNs of patients 9,000 and up five digits long: invalid for the CRID service).
                format!("9{:02}-{:02}-{:04}", p % 100, 10 + p % 89, p % 10_000),
            ));
            for j in 0..labs_per_patient {
                r.labs.push(format!("L{mrn}{j:04}"));
            }
        }
        r
    }

    fn write(&self, dir: &Path) {
        let mut p = String::from("mrn,first_name,last_name,birth_date,sex,race,ethnicity,ssn\n");
        for (i, (mrn, first, last, birth, ssn)) in self.patients.iter().enumerate() {
            let sex = if i % 2 == 0 { "F" } else { "M" };
            p.push_str(&format!("{mrn},{first},{last},{birth},{sex},W,N,{ssn}\n"));
        }
        std::fs::write(dir.join("patients.csv"), p).expect("write patients");
        let mut l = String::from(
            "lab_id,mrn,test_code,value,unit,collected_at,ref_low,ref_high,comparator\n",
        );
        for (j, id) in self.labs.iter().enumerate() {
            let mrn = &id[1..7];
            let (test, unit) = [("HGB", "g/dL"), ("WBC", "K/uL"), ("PLT", "K/uL")][j % 3];
            l.push_str(&format!(
                "{id},{mrn},{test},{}.{},{unit},2024-03-01 08:{:02}:00,,,\n",
                5 + j % 9,
                j % 10,
                j % 60
            ));
        }
        std::fs::write(dir.join("labs.csv"), l).expect("write labs");
    }
}

/// A pipeline config over the registry's files, sending to `base_url` as a custom target.
fn live_config(dir: &Path, base_url: &str) -> PathBuf {
    let config = format!(
        r#"mappings = [{:?}, {:?}]

[center]
ccn = "12001"

[defaults]
timezone = "America/Chicago"

[sources.patients]
path = "patients.csv"
[sources.patients.columns]
mrn = {{ type = "string" }}
ssn = {{ type = "string" }}
birth_date = {{ type = "date" }}

[sources.labs]
path = "labs.csv"
[sources.labs.columns]
mrn = {{ type = "string" }}
value = {{ type = "decimal" }}
ref_low = {{ type = "decimal" }}
ref_high = {{ type = "decimal" }}
collected_at = {{ type = "datetime" }}

[target]
kind = "custom"
base_url = {:?}
token_url = "{}/oauth2/token"
"#,
        repo()
            .join("mappings/cibmtr-patient.toml")
            .display()
            .to_string(),
        repo()
            .join("mappings/cibmtr-lab.toml")
            .display()
            .to_string(),
        base_url,
        base_url.trim_end_matches('/'),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

/// `fhirlift run CONFIG` with credentials in the environment.
fn live_cmd(config: &Path, secret: &str, password: &str, extra: &[&str]) -> Command {
    let mut c = fhirlift();
    c.arg("run")
        .arg(config)
        .args(extra)
        .env("FHIRLIFT_CLIENT_ID", "fhirlift-sandbox")
        .env("FHIRLIFT_CLIENT_SECRET", secret)
        .env("FHIRLIFT_USERNAME", "sandbox-user")
        .env("FHIRLIFT_PASSWORD", password);
    c
}

// ---------------------------------------------------------------------------------------------
// Secrets and patient data
// ---------------------------------------------------------------------------------------------

const CLIENT_SECRET: &str = "cs-7Hq2ZpX91vLkWm";
const PASSWORD: &str = "pw-Rt5uNm3Kd8WqJb";

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777
}

/// Quotes a word for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Runs `cmd` on a pseudo-terminal (`script`), so that progress bars are drawn, and returns
/// everything the terminal showed.
fn on_terminal(cmd: &Command, dir: &Path) -> (Option<i32>, String) {
    let mut line = sh_quote(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        line.push(' ');
        line.push_str(&sh_quote(&a.to_string_lossy()));
    }
    let typescript = dir.join(format!("typescript-{}", rand::random::<u32>()));
    let mut script = Command::new("script");
    script.args(["-q", "-e", "-c", &line]).arg(&typescript);
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => script.env(k, v),
            None => script.env_remove(k),
        };
    }
    let f = run_bounded(&script, dir);
    let shown =
        String::from_utf8_lossy(&std::fs::read(&typescript).unwrap_or_default()).into_owned();
    (f.code, shown)
}

/// Whole-pipeline runs, dry and live (through a recording proxy into a standalone sandbox), at
/// every log level: nothing secret and no patient value may appear in stderr, stdout, the log
/// file, the reports, the error messages or the progress output. At `fhirlift=trace` secrets and
/// tokens still never appear; patient values may (that is what TRACE is for), and the test
/// prints which ones did.
#[test]
fn no_secret_token_or_patient_value_reaches_logs_reports_errors_or_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let sb = Sandbox::start(
        d,
        &[
            "--client-secret",
            CLIENT_SECRET,
            "--password",
            PASSWORD,
            // Short-lived tokens: several are issued during the runs.
            "--token-ttl",
            "2",
        ],
    );
    let proxy = Proxy::start(&sb.base_url);
    let reg = Registry::generate(8, 5);
    reg.write(d);
    // Rows that are rejected, so that error messages and the rejects file are written: a birth
    // date that does not exist, and a lab with an unknown code.
    let mut p = std::fs::read_to_string(d.join("patients.csv")).expect("patients");
    p.push_str("000900,Xanthippa,Grumbleton,1961-02-30,F,W,N,955-44-3322\n");
    std::fs::write(d.join("patients.csv"), p).expect("patients");
    let mut l = std::fs::read_to_string(d.join("labs.csv")).expect("labs");
    l.push_str("LBAD00001,000001,NOPE,1.0,g/dL,2024-03-01 08:30:00,,,\n");
    std::fs::write(d.join("labs.csv"), l).expect("labs");
    let config = live_config(d, &proxy.url);

    let mut personal: Vec<String> = vec![
        "Xanthippa".into(),
        "Grumbleton".into(),
        "1961-02-30".into(),
        "955-44-3322".into(),
        "955443322".into(),
    ];
    for (_, first, last, birth, ssn) in &reg.patients {
        personal.extend([
            first.clone(),
            last.clone(),
            birth.clone(),
            ssn.clone(),
            ssn.replace('-', ""),
        ]);
    }
    let secrets = [CLIENT_SECRET.to_string(), PASSWORD.to_string()];

    // (what, level, text) of everything that must stay clean.
    let mut seen: Vec<(String, Option<&str>, String)> = Vec::new();
    let read_all = |paths: &[PathBuf]| -> String {
        paths
            .iter()
            .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned())
            .collect::<Vec<_>>()
            .join("\n")
    };

    for (i, level) in [None, Some("info"), Some("debug"), Some("fhirlift=trace")]
        .into_iter()
        .enumerate()
    {
        for log_file in [false, true] {
            let tag = format!("{i}-{log_file}");
            let log = d.join(format!("log-{tag}.txt"));
            let with_level = |mut c: Command| {
                match level {
                    Some(l) => c.env("RUST_LOG", l),
                    None => c.env_remove("RUST_LOG"),
                };
                if log_file {
                    c.arg("--log-file").arg(&log);
                }
                c
            };

            // Dry run.
            let out = d.join(format!("out-{tag}"));
            let mut c = fhirlift();
            c.args(["run", "--dry-run", "--no-progress", "--out"])
                .arg(&out)
                .arg(&config);
            let f = run_bounded(&with_level(c), d);
            assert_eq!(f.code, Some(1), "dry run {tag}: {}", f.describe());
            for file in walk(&out) {
                assert_eq!(mode(&file), 0o600, "{} is private", file.display());
            }
            let rejects = std::fs::read_to_string(out.join("rejects.csv")).expect("rejects");
            let reasons: String = csv::Reader::from_reader(rejects.as_bytes())
                .records()
                .map(|r| r.expect("csv")[3].to_string())
                .collect::<Vec<_>>()
                .join("\n");
            assert!(reasons.contains("birth_date"), "{reasons}");
            seen.push((
                format!("dry run {tag} stdout+stderr"),
                level,
                f.stdout + &f.stderr,
            ));
            seen.push((format!("dry run {tag} reject reasons"), None, reasons));
            seen.push((
                format!("dry run {tag} report and manifest"),
                None,
                read_all(&[out.join("report.json"), out.join("manifest.json")]),
            ));
            // The personal-data files still hold no secret.
            seen.push((
                format!("dry run {tag} all files"),
                Some("secrets only"),
                read_all(&walk(&out)),
            ));

            // Live run with a fresh state directory (so that every resource is looked up again).
            let state = d.join(format!("state-{tag}"));
            let mut c = live_cmd(
                &config,
                CLIENT_SECRET,
                PASSWORD,
                &["--no-progress", "--state"],
            );
            c.arg(&state);
            let f = run_bounded(&with_level(c), d);
            assert_eq!(f.code, Some(1), "live run {tag}: {}", f.describe());
            seen.push((
                format!("live run {tag} stdout+stderr"),
                level,
                f.stdout + &f.stderr,
            ));
            let state_files = walk(&state);
            assert!(!state_files.is_empty());
            // The rejects file keeps the raw cells of rejected rows (that is its job) and is
            // private; nothing else in the state directory holds a personal value: the ledger
            // keeps keys and hashes, the reports counts, locations and reasons. There is no CRID
            // request log: the loader writes none.
            let (rejects, others): (Vec<PathBuf>, Vec<PathBuf>) = state_files
                .into_iter()
                .partition(|p| p.file_name().is_some_and(|n| n == "rejects.csv"));
            assert_eq!(rejects.len(), 1, "live run {tag} writes its rejects");
            for file in rejects.iter().chain(&others) {
                let name = file.file_name().unwrap_or_default().to_string_lossy();
                assert!(!name.contains("crid"), "a CRID log: {}", file.display());
                if name.ends_with(".json") || name.ends_with(".csv") {
                    assert_eq!(mode(file), 0o600, "{} is private", file.display());
                }
            }
            seen.push((
                format!("live run {tag} state directory"),
                None,
                read_all(&others),
            ));
            seen.push((
                format!("live run {tag} rejects"),
                Some("secrets only"),
                read_all(&rejects),
            ));
            if log_file {
                let text = std::fs::read_to_string(&log).expect("the log file");
                seen.push((format!("log file {tag}"), level, text));
            }
        }
    }

    // Progress output, drawn on a terminal.
    let mut c = fhirlift();
    c.args(["run", "--dry-run", "--out"])
        .arg(d.join("out-tty"))
        .arg(&config);
    let (code, shown) = on_terminal(&c, d);
    assert_eq!(code, Some(1), "{shown}");
    seen.push(("dry run on a terminal".into(), None, shown));
    let mut c = live_cmd(&config, CLIENT_SECRET, PASSWORD, &["--state"]);
    c.arg(d.join("state-tty"));
    let (code, shown) = on_terminal(&c, d);
    assert_eq!(code, Some(1), "{shown}");
    seen.push(("live run on a terminal".into(), None, shown));

    let tokens = proxy.tokens();
    assert!(tokens.len() >= 8, "the runs were given tokens: {tokens:?}");
    let mut at_trace = BTreeSet::new();
    for (what, level, text) in &seen {
        for s in secrets.iter().chain(&tokens) {
            assert!(
                !text.contains(s.as_str()),
                "{what}: a secret or token appears"
            );
        }
        match *level {
            Some("secrets only") => {}
            Some(l) if l.contains("trace") => {
                for v in &personal {
                    if text.contains(v.as_str()) {
                        at_trace.insert(v.clone());
                    }
                }
            }
            _ => {
                for v in &personal {
                    assert!(
                        !text.contains(v.as_str()),
                        "{what}: the patient value {v:?} appears:\n{}",
                        tail(text, 3000)
                    );
                }
            }
        }
    }
    eprintln!("patient values seen at fhirlift=trace: {at_trace:?}");
}

// ---------------------------------------------------------------------------------------------
// Faults under load
// ---------------------------------------------------------------------------------------------

/// The soak's fault mix: 10 % 5xx, 5 % 429, 2 % dropped connections, 2 % lost answers.
const SOAK_FAULTS: [&str; 8] = [
    "--error-rate",
    "0.10",
    "--throttle-rate",
    "0.05",
    "--drop-rate",
    "0.02",
    "--lost-answer-rate",
    "0.02",
];

/// Loads `patients` × `labs_per_patient` into a standalone sandbox with the soak's fault mix and
/// tokens of `token_ttl` seconds, then checks that the server holds every expected resource
/// exactly once and that the run report accounts for every row. Returns a one-line summary.
fn soak(patients: usize, labs_per_patient: usize, token_ttl: u64, extra: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let ttl = token_ttl.to_string();
    let seed = std::env::var("FHIRLIFT_SOAK_SEED").unwrap_or_else(|_| "7".into());
    let mut args: Vec<&str> = SOAK_FAULTS.to_vec();
    args.extend(["--token-ttl", &ttl, "--seed", &seed, "--retry-after", "1"]);
    let sb = Sandbox::start(d, &args);
    let reg = Registry::generate(patients, labs_per_patient);
    reg.write(d);
    let config = live_config(d, &sb.base_url);
    let state = d.join("state");
    let mut c = live_cmd(
        &config,
        "sandbox-secret",
        "sandbox-password",
        &["--no-progress", "--state"],
    );
    c.arg(&state).args(extra);
    let started = Instant::now();
    let o = c.output().expect("run the load");
    let secs = started.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");

    // The server: every patient and every lab, exactly once.
    let stored_patients = sb.dump(d, "Patient");
    let stored_labs = sb.dump(d, "Observation");
    assert_eq!(stored_patients.len(), patients, "each patient exactly once");
    let crids: BTreeSet<&str> = stored_patients
        .iter()
        .filter_map(|p| p["identifier"][0]["value"].as_str())
        .collect();
    assert_eq!(crids.len(), patients, "no two Patients share a CRID");
    assert_eq!(stored_labs.len(), reg.labs.len(), "each lab exactly once");
    let ids: BTreeSet<&str> = stored_labs
        .iter()
        .filter_map(|o| o["identifier"][0]["value"].as_str())
        .collect();
    let expected: BTreeSet<&str> = reg.labs.iter().map(String::as_str).collect();
    assert_eq!(ids, expected, "every lab is on the server, once");

    // The report: one outcome per resource, none rejected or unknown, every identifier once.
    // The run report sits in reports/; the pipeline's report and rejects of the run are in a
    // folder of their own beside it.
    let reports: Vec<PathBuf> = walk(&state.join("reports"))
        .into_iter()
        .filter(|p| p.parent() == Some(state.join("reports").as_path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    assert_eq!(reports.len(), 1, "one run, one report: {reports:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&reports[0]).expect("report")).expect("JSON");
    let outcomes = report["outcomes"].as_array().expect("outcomes");
    assert_eq!(
        outcomes.len(),
        patients + reg.labs.len(),
        "every row accounted for"
    );
    let mut keys = BTreeSet::new();
    for o in outcomes {
        let status = o["status"].as_str().unwrap_or_default();
        assert!(matches!(status, "created" | "updated" | "unchanged"), "{o}");
        keys.insert(format!(
            "{}|{}",
            o["resource_type"],
            o["identifier"]["value"].as_str().unwrap_or_default()
        ));
    }
    assert_eq!(keys.len(), outcomes.len(), "no row reported twice");
    let counts = &report["counts"];
    assert_eq!(counts["rejected"], 0);
    assert_eq!(counts["unknown"], 0);
    let done = counts["created"].as_u64().unwrap_or(0)
        + counts["updated"].as_u64().unwrap_or(0)
        + counts["unchanged"].as_u64().unwrap_or(0);
    assert_eq!(done as usize, patients + reg.labs.len(), "{counts}");
    format!(
        "{patients} patients, {} observations in {secs:.1} s: created {}, updated {}, unchanged {}, retried {}; server holds {} Patients and {} Observations, each once",
        reg.labs.len(),
        counts["created"],
        counts["updated"],
        counts["unchanged"],
        counts["retried"],
        stored_patients.len(),
        stored_labs.len()
    )
}

/// The soak in small: 50 patients and 1,000 Observations through the full fault mix, with tokens
/// short enough to expire during the run.
#[test]
fn a_load_through_faults_stores_everything_exactly_once_and_reports_every_row() {
    let summary = soak(50, 20, 3, &[]);
    eprintln!("{summary}");
}

/// The full soak, run by `scripts/soak.sh` (not in CI): sizes and options from the environment.
#[test]
#[ignore = "long: run with scripts/soak.sh"]
fn soak_full() {
    let var = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let patients = var("FHIRLIFT_SOAK_PATIENTS", 10_000);
    let labs = var("FHIRLIFT_SOAK_OBSERVATIONS", 200_000);
    let ttl = var("FHIRLIFT_SOAK_TOKEN_TTL", 60) as u64;
    let extra = std::env::var("FHIRLIFT_SOAK_ARGS").unwrap_or_default();
    let extra: Vec<&str> = extra.split_whitespace().collect();
    let summary = soak(patients, labs / patients.max(1), ttl, &extra);
    println!("SOAK {summary}");
}

/// The bug the small soak found: the loader took a token once per request and kept it through
/// its retry waits; a token that expired during a wait was refused, refreshed once, expired again
/// in the next wait, and the second refusal aborted the whole load as "the target refused a
/// freshly issued token".
#[test]
fn a_token_that_expires_during_retry_waits_does_not_abort_the_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // Half the requests are throttled with a wait longer than a token lives.
    let sb = Sandbox::start(
        d,
        &[
            "--throttle-rate",
            "0.5",
            "--retry-after",
            "3",
            "--token-ttl",
            "2",
            "--seed",
            "3",
        ],
    );
    let reg = Registry::generate(3, 3);
    reg.write(d);
    let config = live_config(d, &sb.base_url);
    let mut c = live_cmd(
        &config,
        "sandbox-secret",
        "sandbox-password",
        &["--no-progress", "--state"],
    );
    c.arg(d.join("state"));
    let f = run_bounded(&c, d);
    assert_eq!(f.code, Some(0), "{}", f.describe());
    assert_eq!(sb.dump(d, "Patient").len(), 3);
    assert_eq!(sb.dump(d, "Observation").len(), 9);
}
