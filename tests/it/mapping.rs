//! Integration tests: mapping, `run --dry-run` and `render`, with the shipped CIBMTR pack.

use std::path::{Path, PathBuf};

use super::common::{fhirlift, repo};

const PATIENTS: &str = "\
mrn,first_name,last_name,birth_date,sex,race,ethnicity,ssn
000101,Ann,\"O'Brien \"\"Annie\"\"\",1975-02-14,F,W,N,123-45-6789
000102,Bob,Back\\slash,1980-07-01,M,B,H,
000103,Cy,Unknown,1990-01-01,U,D,U,
000104,Dee,Baddate,02/30/1975,F,W,N,
000105,Eve,Xsex,1970-05-05,X,W,N,
,No,Mrn,1970-05-05,F,W,N,
";

const LABS: &str = "\
lab_id,mrn,test_code,value,unit,collected_at,ref_low,ref_high,comparator
A0000001,000101,HGB,12.50,g/dL,2024-03-01 08:30:00,12.0,16.0,
A0000002,000101,CMVPCR,35,IU/mL,2024-03-02 09:00:00,,,<
A0000003,000102,WBC,5.2,K/uL,2024-07-01 10:00:00,4.0,11.0,
A0000004,000102,XYZ9,1,mg/dL,2024-03-01 08:30:00,,,
A0000005,000102,PLT,pending,K/uL,2024-03-01 08:30:00,,,
A0000006,999999,HGB,13.1,g/dL,2024-03-01 08:30:00,,,
A0000007,000103,ALT,31,U/L,not a date,,,
A0000008,000104,HGB,11,g/dL,2024-03-01 08:30:00,,,
A0000009,000103,XYZ9,2,mg/dL,2024-03-04 08:30:00,,,
";

/// A pipeline over small CSV files using the shipped mappings and templates.
fn fixture(dir: &Path, extra_mappings: &[&str], extra_sources: &str) -> PathBuf {
    std::fs::write(dir.join("patients.csv"), PATIENTS).expect("write patients");
    std::fs::write(dir.join("labs.csv"), LABS).expect("write labs");
    let mut mappings = vec![
        repo().join("mappings/cibmtr-patient.toml"),
        repo().join("mappings/cibmtr-lab.toml"),
    ];
    mappings.extend(extra_mappings.iter().map(PathBuf::from));
    let list: Vec<String> = mappings
        .iter()
        .map(|p| format!("{:?}", p.display().to_string()))
        .collect();
    let config = format!(
        r#"mappings = [{}]

[center]
ccn = "12001"

[defaults]
timezone = "America/Chicago"

[sources.patients]
path = "patients.csv"
[sources.patients.columns]
birth_date = {{ type = "date", formats = ["%m/%d/%Y"] }}

[sources.labs]
path = "labs.csv"
[sources.labs.columns]
value = {{ type = "decimal" }}
ref_low = {{ type = "decimal" }}
ref_high = {{ type = "decimal" }}
collected_at = {{ type = "datetime" }}
{extra_sources}
"#,
        list.join(", ")
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, config).expect("write config");
    path
}

fn dry_run(config: &Path, out: &Path, jobs: &str) -> std::process::Output {
    fhirlift()
        .args(["run", "--dry-run", "--jobs", jobs, "--bundles", "--out"])
        .arg(out)
        .arg(config)
        .output()
        .expect("run fhirlift")
}

/// The lines of a dry run's rejects.csv (header excluded).
fn rejects(out: &Path) -> Vec<csv::StringRecord> {
    let text = read(&out.join("rejects.csv"));
    csv::Reader::from_reader(text.as_bytes())
        .records()
        .map(|r| r.expect("csv"))
        .collect()
}

/// The fixture plus `extra_mappings` over a wide file, source `labs_wide`, holding `wide_csv`.
fn wide_fixture(dir: &Path, wide_csv: &str, extra_mappings: &[&Path]) -> PathBuf {
    std::fs::write(dir.join("wide.csv"), wide_csv).expect("write wide");
    let names: Vec<&str> = extra_mappings
        .iter()
        .map(|p| p.to_str().expect("utf-8 path"))
        .collect();
    fixture(dir, &names, "\n[sources.labs_wide]\npath = \"wide.csv\"\n")
}

/// Snapshots live in tests/snapshots, named after the test's purpose.
fn snap(name: &str, value: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.set_snapshot_path(repo().join("tests/snapshots"));
    settings.set_prepend_module_to_snapshot(false);
    settings.bind(|| insta::assert_snapshot!(name, value));
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_pack_maps_good_rows_and_rejects_bad_ones_with_precise_reasons() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    let out = dir.path().join("out");
    let o = dry_run(&config, &out, "2");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "rows were rejected: {stderr}");

    snap("pack_patients", &read(&out.join("Patient.ndjson")));
    snap("pack_observations", &read(&out.join("Observation.ndjson")));
    snap(
        "pack_crid_requests",
        &read(&out.join("crid-requests.ndjson")),
    );
    snap("pack_rejects", &read(&out.join("rejects.csv")));

    let report: serde_json::Value =
        serde_json::from_str(&read(&out.join("report.json"))).expect("report json");
    // The counts add up exactly: 6 patient rows = 2 mapped + 4 rejected (sex U has no CRID
    // gender, so the CRID service would refuse that patient); 9 labs = 3 + 6.
    let m = &report["mappings"];
    assert_eq!(
        (
            m[0]["rows_read"].as_u64(),
            m[0]["rows_mapped"].as_u64(),
            m[0]["rows_rejected"].as_u64()
        ),
        (Some(6), Some(2), Some(4))
    );
    assert_eq!(
        (
            m[1]["rows_read"].as_u64(),
            m[1]["rows_mapped"].as_u64(),
            m[1]["rows_rejected"].as_u64()
        ),
        (Some(9), Some(3), Some(6))
    );
    assert_eq!(report["resources"]["Patient"], 2);
    assert_eq!(report["resources"]["Observation"], 3);
    let unmapped = &report["unmapped_codes"];
    assert_eq!(unmapped.as_array().map(Vec::len), Some(2), "{unmapped}");
    let xyz = unmapped
        .as_array()
        .and_then(|a| a.iter().find(|u| u["code"] == "XYZ9"))
        .expect("XYZ9 counted");
    assert_eq!(xyz["count"], 2);
    assert_eq!(
        xyz["first_rows"],
        serde_json::json!(["labs.csv:5", "labs.csv:10"])
    );
    // Every rejected row is in rejects.csv exactly once.
    assert_eq!(rejects(&out).len(), 10);
    // Patient data stays out of the summary.
    assert!(!stderr.contains("O'Brien"), "{stderr}");
    assert!(!stderr.contains("123-45-6789"), "{stderr}");
}

#[test]
fn every_resource_passes_validation_and_bundles_hold_at_most_fifty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    let out = dir.path().join("out");
    dry_run(&config, &out, "1");
    let rules = fhirlift::validate::CibmtrRules::new(
        "12001",
        fhirlift::config::DEFAULT_SECURITY_SYSTEM,
        fhirlift::config::DEFAULT_CRID_SYSTEM,
    );
    for file in ["Patient.ndjson", "Observation.ndjson"] {
        for line in read(&out.join(file)).lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("json line");
            let issues = fhirlift::validate::validate(&v, &rules);
            let errors: Vec<_> = fhirlift::validate::errors(&issues).collect();
            assert!(errors.is_empty(), "{file}: {errors:?}");
        }
    }
    let bundle: serde_json::Value =
        serde_json::from_str(&read(&out.join("bundles/bundle-00001.json"))).expect("bundle");
    assert_eq!(bundle["type"], "transaction");
    assert_eq!(bundle["entry"].as_array().map(Vec::len), Some(5));
    let issues = fhirlift::validate::validate(&bundle, &rules);
    assert!(
        fhirlift::validate::errors(&issues).next().is_none(),
        "{issues:?}"
    );
}

#[test]
fn jobs_1_and_jobs_2_write_byte_identical_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    dry_run(&config, &a, "1");
    dry_run(&config, &b, "2");
    let manifest_a = read(&a.join("manifest.json"));
    assert_eq!(manifest_a, read(&b.join("manifest.json")));
    let m: serde_json::Value = serde_json::from_str(&manifest_a).expect("manifest");
    let files: Vec<&str> = m["files"]
        .as_array()
        .expect("files")
        .iter()
        .filter_map(|f| f["path"].as_str())
        .collect();
    assert_eq!(
        files,
        vec![
            "Observation.ndjson",
            "Patient.ndjson",
            "bundles/bundle-00001.json",
            "crid-requests.ndjson",
            "rejects.csv",
            "report.json"
        ]
    );
    for f in files {
        assert_eq!(
            std::fs::read(a.join(f)).ok(),
            std::fs::read(b.join(f)).ok(),
            "{f}"
        );
    }
    // Running again into the same folder replaces the previous dry run.
    let again = dry_run(&config, &a, "2");
    assert_eq!(again.status.code(), Some(1));
    assert_eq!(manifest_a, read(&a.join("manifest.json")));
}

#[cfg(unix)]
#[test]
fn every_output_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    let out = dir.path().join("out");
    dry_run(&config, &out, "2");
    for f in [
        "Patient.ndjson",
        "Observation.ndjson",
        "crid-requests.ndjson",
        "rejects.csv",
        "report.json",
        "manifest.json",
        "bundles/bundle-00001.json",
    ] {
        let mode = std::fs::metadata(out.join(f))
            .expect("meta")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
}

#[test]
fn wide_rows_give_one_observation_per_filled_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = wide_fixture(
        dir.path(),
        "draw_id,mrn,collected_at,hgb,wbc,plt,creatinine\nD1,000101,2024-03-01T08:30:00,12.1,,250,0.9\nD2,000102,2024-03-02T08:30:00,,,,\n",
        &[&repo().join("mappings/cibmtr-lab-wide.toml")],
    );
    // The shipped lab template serves both layouts: the long layout's columns, absent from the
    // wide file, are warnings for the wide mapping, not errors.
    let v = fhirlift()
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate");
    let stderr = String::from_utf8_lossy(&v.stderr);
    assert_eq!(v.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("warning: ")
            && stderr.contains("column \"test_code\" is not in source \"labs_wide\""),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&v.stdout).contains(": OK, 6 warnings"));
    // `render` shows the item each filled column gives the template.
    let r = fhirlift()
        .args(["render", "--mapping", "labs-wide", "--row", "2"])
        .arg(&config)
        .output()
        .expect("render");
    let shown = String::from_utf8_lossy(&r.stdout);
    assert!(
        shown.contains(r#"item: {"column":"plt","code":"PLT","value":"250","unit":null}"#),
        "{shown}"
    );
    assert_eq!(shown.matches("== Template output").count(), 3, "{shown}");
    let out = dir.path().join("out");
    let o = dry_run(&config, &out, "2");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let obs = read(&out.join("Observation.ndjson"));
    let ids: Vec<String> = obs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["identifier"][0]["value"].as_str().map(str::to_string))
        .filter(|id| id.starts_with("D1"))
        .collect();
    assert_eq!(ids, vec!["D1:HGB", "D1:PLT", "D1:CREAT"]);
    let report: serde_json::Value =
        serde_json::from_str(&read(&out.join("report.json"))).expect("report");
    let wide_counts = &report["mappings"][2];
    assert_eq!(wide_counts["rows_mapped"], 2);
    assert_eq!(wide_counts["resources"], 3);
}

#[test]
fn a_wide_column_in_other_units_than_its_code_is_rejected_naming_the_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wide = "draw_id,mrn,collected_at,hgb,creat_si\nD1,000101,2024-03-01T08:30:00,12.1,88\n";
    let lookups = repo().join("mappings/lookups");
    let mapping = |name: &str, code: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "name = \"{name}\"\nsource = \"labs_wide\"\nkind = \"resource\"\nresource_type = \"Observation\"\n\
                 template = \"cibmtr/observation-lab.json.j2\"\ntemplate_dir = {:?}\n\
                 patient_key = [\"mrn\"]\nrecord_key = [\"draw_id\"]\nidentifier_system = \"urn:x:{name}\"\n\
                 [lookups]\nlab_codes = {:?}\nunits = {:?}\nresult_codes = {:?}\n\
                 [[wide]]\ncolumn = \"hgb\"\ncode = \"HGB\"\n\
                 [[wide]]\ncolumn = \"creat_si\"\ncode = \"{code}\"\nunit = \"umol/L\"\n",
                repo().join("templates").display().to_string(),
                lookups.join("lab_codes.csv").display().to_string(),
                lookups.join("units.csv").display().to_string(),
                lookups.join("result_codes.csv").display().to_string(),
            ),
        )
        .expect("mapping");
        path
    };
    // Creatinine in µmol/L under the mass-concentration code (mg/dL): refused, not relabelled.
    let config = wide_fixture(dir.path(), wide, &[&mapping("wrong", "CREAT")]);
    let out = dir.path().join("out");
    let o = dry_run(&config, &out, "1");
    assert_eq!(o.status.code(), Some(1));
    let reject = rejects(&out)
        .into_iter()
        .find(|r| r.iter().any(|f| f.contains("wide.csv")))
        .expect("the wide row is rejected");
    assert_eq!(&reject[2], "creat_si");
    assert!(
        reject[3].starts_with("creat_si: unit \"umol/L\" is not \"mg/dL\""),
        "{}",
        &reject[3]
    );

    // Under the code measured in µmol/L it goes out with that code's LOINC and unit.
    let config = wide_fixture(dir.path(), wide, &[&mapping("right", "CREAT_SI")]);
    let o = dry_run(&config, &out, "1");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let creat = read(&out.join("Observation.ndjson"))
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["identifier"][0]["value"] == "D1:CREAT_SI")
        .expect("the creatinine Observation");
    assert_eq!(creat["code"]["coding"][0]["code"], "14682-9");
    assert_eq!(creat["valueQuantity"]["code"], "umol/L");
    assert_eq!(creat["valueQuantity"]["value"], 88);
}

#[test]
fn keys_that_lost_their_leading_zeros_are_named_and_pad_zeros_restores_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    // Lab A0000003's patient key written as a number would be: 102, not 000102.
    let labs = LABS.replacen("A0000003,000102,", "A0000003,102,", 1);
    std::fs::write(dir.path().join("labs.csv"), &labs).expect("labs");
    let out = dir.path().join("out");
    let o = dry_run(&config, &out, "1");
    assert_eq!(o.status.code(), Some(1));
    let reject = rejects(&out)
        .into_iter()
        .find(|r| &r[0] == "labs.csv:4")
        .expect("the lab is rejected");
    assert_eq!(
        &reject[3],
        "mrn: patient \"102\" is not among the patients mapped in this run; patient \"000102\" is: are leading zeros lost in one of the files? (`pad_zeros = N` on a key column restores them)"
    );

    // With the key column padded, the lab finds its patient.
    let text = read(&config).replace(
        "[sources.labs.columns]\n",
        "[sources.labs.columns]\nmrn = { type = \"string\", pad_zeros = 6 }\n",
    );
    std::fs::write(&config, text).expect("config");
    let o = dry_run(&config, &out, "1");
    assert_eq!(o.status.code(), Some(1));
    let rejects = read(&out.join("rejects.csv"));
    assert!(!rejects.contains("labs.csv:4,"), "{rejects}");
    assert!(read(&out.join("Observation.ndjson")).contains("A0000003"));
}

#[test]
fn render_shows_context_resource_and_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    let o = fhirlift()
        .args(["render", "--mapping", "labs", "--row", "3"])
        .arg(&config)
        .output()
        .expect("render");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("== Row labs.csv:3 (mapping labs)"),
        "{stdout}"
    );
    assert!(stdout.contains("\"test_code\": \"CMVPCR\""), "{stdout}");
    assert!(stdout.contains("\"comparator\": \"<\""), "{stdout}");
    assert!(stdout.contains("== Validation: passed"), "{stdout}");

    let o = fhirlift()
        .args(["render", "--mapping", "labs", "--row", "5"])
        .arg(&config)
        .output()
        .expect("render");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{stdout}");
    snap("render_unmapped", stdout.lines().last().unwrap_or_default());
}

/// A pipeline of one Observation mapping, `name`, over the LABS rows, with `template` as its
/// template. Runs it dry with `jobs` and returns the first reject's reason and the output folder.
fn first_reject_of_one_template(
    dir: &Path,
    name: &str,
    template: &str,
    jobs: &str,
) -> (String, PathBuf) {
    let tdir = dir.join("templates/t");
    std::fs::create_dir_all(&tdir).expect("mkdir");
    std::fs::write(tdir.join(format!("{name}.json.j2")), template).expect("template");
    let mdir = dir.join("mappings");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    std::fs::write(
        mdir.join(format!("{name}.toml")),
        format!(
            "name = \"{name}\"\nsource = \"labs\"\nkind = \"resource\"\nresource_type = \"Observation\"\ntemplate = \"t/{name}.json.j2\"\npatient_key = [\"mrn\"]\nrecord_key = [\"lab_id\"]\nidentifier_system = \"urn:x:lab\"\n"
        ),
    )
    .expect("mapping");
    let config = dir.join("pipeline.toml");
    std::fs::write(
        &config,
        format!(
            "mappings = [\"mappings/{name}.toml\"]\n[center]\nccn = \"12001\"\n[sources.labs]\npath = \"labs.csv\"\n"
        ),
    )
    .expect("config");
    std::fs::write(dir.join("labs.csv"), LABS).expect("labs");
    let out = dir.join("out");
    let o = dry_run(&config, &out, jobs);
    assert_eq!(o.status.code(), Some(1));
    let first = rejects(&out).into_iter().next().expect("a reject");
    (first[3].to_string(), out)
}

#[test]
fn template_errors_show_name_line_and_caret_and_never_reach_the_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (reason, out) = first_reject_of_one_template(
        dir.path(),
        "typo",
        "{\n  \"resourceType\": \"Observation\",\n  \"status\": {{ row.stauts }}\n}\n",
        "2",
    );
    snap("template_error", &reason);
    assert!(!out.join("Observation.ndjson").exists());
}

#[test]
fn output_that_is_not_json_names_the_template_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    // A comma after the last member: the row is rejected, with where the output breaks.
    let (reason, _) = first_reject_of_one_template(
        dir.path(),
        "comma",
        "{\n  \"resourceType\": \"Observation\",\n  \"status\": {{ row.lab_id }},\n}\n",
        "1",
    );
    assert_eq!(
        reason,
        "template t/comma.json.j2 rendered invalid JSON: syntax error (expected a member name) at line 4 column 1"
    );
    // The rendered value (a record key) is not quoted in the reason.
    assert!(!reason.contains("A000"));
}

#[test]
fn config_and_template_problems_exit_2_and_name_every_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mdir = dir.path().join("mappings");
    std::fs::create_dir_all(dir.path().join("templates")).expect("mkdir");
    std::fs::write(dir.path().join("templates/bad.json.j2"), "{{ row.x ").expect("t");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    std::fs::write(
        mdir.join("m.toml"),
        "name = \"m\"\nsource = \"nowhere\"\nkind = \"resource\"\nresource_type = \"Observation\"\ntemplate = \"missing.json.j2\"\npatient_key = [\"mrn\"]\nrecord_key = [\"lab_id\"]\nidentifier_system = \"urn:x\"\n",
    )
    .expect("mapping");
    let config = dir.path().join("pipeline.toml");
    std::fs::write(
        &config,
        "mappings = [\"mappings/m.toml\"]\n[center]\nccn = \"12001\"\n[sources.labs]\npath = \"labs.csv\"\n",
    )
    .expect("config");
    let o = fhirlift()
        .args(["run", "--dry-run", "--out"])
        .arg(dir.path().join("out"))
        .arg(&config)
        .output()
        .expect("run");
    assert_eq!(o.status.code(), Some(2));
    let stderr =
        String::from_utf8_lossy(&o.stderr).replace(&dir.path().display().to_string(), "[DIR]");
    snap("config_errors", &stderr);
}

/// The documented bad rows of the samples, with the start of the reason each must carry.
const SAMPLE_BAD_ROWS: [(&str, &str); 8] = [
    ("registry.xlsx[Patients]:8", "birth_date: expected date"),
    (
        "registry.xlsx[Patients]:15",
        "sex: no entry for code \"X\" in lookup table sex",
    ),
    (
        "registry.xlsx[Patients]:23",
        "birth_date: spreadsheet error cell #N/A",
    ),
    (
        "registry.xlsx[Patients]:31",
        "mrn: the patient key is empty",
    ),
    (
        "[Labs]:101",
        "test_code: no entry for code \"XYZ9\" in lookup table lab_codes",
    ),
    ("[Labs]:257", "value: expected decimal"),
    (
        "[Labs]:777",
        "mrn: patient \"999999\" is not among the patients mapped in this run",
    ),
    ("[Labs]:1500", "collected_at: expected datetime"),
];

/// Runs a dry run of the samples with the labs from `labs_source` (a TOML table body) and checks
/// that exactly the documented rows are rejected for their own reason, that every other reject is
/// a lab of a rejected patient, and that the counts add up.
fn check_samples(labs_source: &str, lab_bad_rows: &[(&str, &str)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let sample = read(&repo().join("samples/pipeline.toml"));
    let head = sample.split("[sources.labs]").next().expect("labs section");
    let config = dir.path().join("pipeline.toml");
    let text =
        head.replace(
            "\"../mappings/",
            &format!("\"{}/mappings/", repo().display()),
        )
        .replace(
            "\"registry.xlsx\"",
            &format!(
                "{:?}",
                repo().join("samples/registry.xlsx").display().to_string()
            ),
        ) + "[sources.labs]\n"
            + labs_source;
    std::fs::write(&config, text).expect("config");
    let out = dir.path().join("out");
    let o = dry_run(&config, &out, "2");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let rows = rejects(&out);
    let (cascaded, own): (Vec<_>, Vec<_>) = rows
        .iter()
        .partition(|r| r[3].contains("was rejected at registry.xlsx[Patients]:"));
    let expected: Vec<(&str, &str)> = SAMPLE_BAD_ROWS[..4]
        .iter()
        .copied()
        .chain(lab_bad_rows.iter().copied())
        .collect();
    assert_eq!(own.len(), expected.len(), "{rows:?}");
    for ((loc, reason), r) in expected.iter().zip(&own) {
        assert!(r[0].ends_with(loc), "{} is not {loc}", &r[0]);
        assert!(
            r[3].starts_with(reason),
            "{}: {} does not start with {reason}",
            &r[0],
            &r[3]
        );
    }
    for r in &cascaded {
        assert!(
            ["[Patients]:8,", "[Patients]:15,", "[Patients]:23,"]
                .iter()
                .any(|p| r[3].contains(&p[..p.len() - 1])),
            "{}",
            &r[3]
        );
    }
    let patients = read(&out.join("Patient.ndjson")).lines().count();
    let observations = read(&out.join("Observation.ndjson")).lines().count();
    assert_eq!(patients, 50 - 4);
    assert_eq!(
        observations + own.len() - 4 + cascaded.len(),
        2000,
        "the counts add up"
    );
    assert_eq!(read(&out.join("crid-requests.ndjson")).lines().count(), 46);
}

#[test]
fn samples_workbook_rejects_exactly_the_documented_rows() {
    let labs = format!(
        "path = {:?}\nsheet = \"Labs\"\n[sources.labs.columns]\nlab_id = {{ type = \"string\" }}\nmrn = {{ type = \"string\" }}\nvalue = {{ type = \"decimal\" }}\nref_low = {{ type = \"decimal\" }}\nref_high = {{ type = \"decimal\" }}\ncollected_at = {{ type = \"datetime\" }}\n",
        repo().join("samples/registry.xlsx").display().to_string()
    );
    check_samples(&labs, &SAMPLE_BAD_ROWS[4..]);
}

#[test]
fn samples_csv_labs_reject_the_same_rows() {
    let labs = format!(
        "path = {:?}\n[sources.labs.columns]\nvalue = {{ type = \"decimal\" }}\nref_low = {{ type = \"decimal\" }}\nref_high = {{ type = \"decimal\" }}\ncollected_at = {{ type = \"datetime\" }}\n",
        repo().join("samples/labs.csv").display().to_string()
    );
    let bad: Vec<(&str, &str)> = SAMPLE_BAD_ROWS[4..]
        .iter()
        .map(|(l, r)| (l.trim_start_matches("[Labs]"), *r))
        .collect();
    check_samples(&labs, &bad);
}

#[test]
fn samples_parquet_labs_reject_the_same_rows() {
    let labs = format!(
        "path = {:?}\n",
        repo().join("samples/labs.parquet").display().to_string()
    );
    // Parquet counts rows from 1 (no header line), and its typed columns hold nulls where the
    // workbook has bad text.
    check_samples(
        &labs,
        &[
            (":100", "test_code: no entry for code \"XYZ9\""),
            (":256", "value: a required value is empty"),
            (
                ":776",
                "mrn: patient \"999999\" is not among the patients mapped in this run",
            ),
            (":1499", "collected_at: a required value is empty"),
        ],
    );
}

#[test]
fn samples_pipeline_passes_validate() {
    let o = fhirlift()
        .arg("validate")
        .arg(repo().join("samples/pipeline.toml"))
        .output()
        .expect("validate");
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn validate_names_a_template_column_missing_from_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    // The lab template reads row.comparator; drop that column from the labs file.
    let labs: String = LABS
        .lines()
        .map(|l| format!("{}\n", l.rsplit_once(',').map_or(l, |(a, _)| a)))
        .collect();
    std::fs::write(dir.path().join("labs.csv"), labs).expect("labs");
    let o = fhirlift()
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate");
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("column \"comparator\" is not in source \"labs\""),
        "{stderr}"
    );
}

#[test]
fn validate_names_every_template_that_reads_a_missing_column_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = fixture(dir.path(), &[], "");
    // Both patient templates read `sex`; rename that column in the file.
    let patients = PATIENTS.replacen(",sex,", ",gender,", 1);
    std::fs::write(dir.path().join("patients.csv"), patients).expect("patients");
    let o = fhirlift()
        .arg("validate")
        .arg(&config)
        .output()
        .expect("validate");
    assert_eq!(o.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&o.stderr);
    let line = stderr
        .lines()
        .find(|l| l.contains("column \"sex\""))
        .expect("the sex column is named");
    assert!(
        line.contains("template cibmtr/crid-patient.json.j2, template cibmtr/patient.json.j2"),
        "{line}"
    );
    assert_eq!(stderr.matches("column \"sex\"").count(), 1, "{stderr}");
}

/// The fenced block of `lang` that follows `after` in templates/README.md.
fn guide_block(after: &str, lang: &str) -> String {
    let guide = read(&repo().join("templates/README.md"));
    let start = guide.find(after).expect("section in the guide");
    let rest = &guide[start..];
    let open = format!("```{lang}\n");
    let body = &rest[rest.find(&open).expect("code block") + open.len()..];
    let body = &body[..body.find("```").expect("closing fence")];
    // Blocks inside a numbered list are indented by three spaces.
    body.lines()
        .map(|l| l.strip_prefix("   ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_guides_walk_through_works_as_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mdir = dir.path().join("mappings");
    std::fs::create_dir_all(mdir.join("lookups")).expect("mkdir");
    for t in ["lab_codes.csv", "units.csv", "result_codes.csv"] {
        std::fs::copy(
            repo().join("mappings/lookups").join(t),
            mdir.join("lookups").join(t),
        )
        .expect("copy lookup");
    }
    std::fs::write(
        mdir.join("results.toml"),
        guide_block("3. **Write the mapping**", "toml"),
    )
    .expect("mapping");
    std::fs::create_dir_all(dir.path().join("templates/mine")).expect("mkdir");
    std::fs::write(
        dir.path().join("templates/mine/result.json.j2"),
        guide_block("4. **Write the template**", "jinja"),
    )
    .expect("template");
    std::fs::write(
        dir.path().join("transplant_labs.csv"),
        "Patient ID,Accession,Test,Result,Units,Drawn\n00042,X-1,HGB,13.40,g/dL,03/01/2024 08:30\n00042,X-2,NOPE,1,g/dL,03/01/2024 08:30\n",
    )
    .expect("data");
    let source = guide_block("2. **Declare the source**", "toml")
        .replace("transplant_labs.xlsx", "transplant_labs.csv")
        .replace("sheet = \"Results\"\n", "");
    let config = dir.path().join("pipeline.toml");
    std::fs::write(
        &config,
        format!("mappings = [\"mappings/results.toml\"]\n[center]\nccn = \"12001\"\n{source}\n"),
    )
    .expect("config");
    let out = dir.path().join("out");
    let o = dry_run(&config, &out, "1");
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let obs: serde_json::Value =
        serde_json::from_str(read(&out.join("Observation.ndjson")).trim()).expect("one resource");
    assert_eq!(obs["effectiveDateTime"], "2024-03-01T08:30:00-05:00");
    assert_eq!(obs["valueQuantity"]["value"].to_string(), "13.40");
    assert_eq!(obs["identifier"][0]["value"], "X-1");
    assert!(read(&out.join("rejects.csv")).contains("no entry for code \"\"NOPE\"\""));
}
