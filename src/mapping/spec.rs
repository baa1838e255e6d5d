//! Mapping files (`mappings/*.toml`): which source feeds which template, and how a row is keyed.
//!
//! Parsing is pure: this module reads one TOML file and checks what needs no other file. It does
//! not load templates or lookup tables (see [`super::MappingSet::load`]).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::MappingError;

/// What a mapping produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MappingKind {
    /// One Patient per row, plus the CRID demographics (`crid_template`).
    Patient,
    /// Any other resource, tied to a patient by the patient key.
    Resource,
}

/// One column of a wide row: a non-empty cell in `column` yields one resource, and the template
/// sees `item.code` (the local code this column stands for), `item.column`, `item.value` and
/// `item.unit` (the column's local unit, `none` when the mapping gives none).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WideColumn {
    pub column: String,
    pub code: String,
    #[serde(default)]
    pub unit: Option<String>,
}

/// The parsed form of a `mappings/*.toml` file. Paths are resolved against the file's folder.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingSpec {
    /// Unique name, used in reports, rejects and `render --mapping`.
    pub name: String,
    /// A source name from the pipeline config (`[sources.<name>]`).
    pub source: String,
    pub kind: MappingKind,
    /// The FHIR resource type the template renders (`Patient`, `Observation`, …).
    pub resource_type: String,
    /// The template's name inside `template_dir` (e.g. `cibmtr/observation-lab.json.j2`).
    pub template: String,
    /// For patients: the template rendering the `patient` object of a `PUT /CRID` body.
    #[serde(default)]
    pub crid_template: Option<String>,
    /// Folder holding the templates; default `../templates` beside the mapping file.
    #[serde(default)]
    pub template_dir: Option<PathBuf>,
    /// Column(s) tying a row to its patient; several are joined with `|`.
    pub patient_key: Vec<String>,
    /// Column(s) making the resource's business identifier value; several are joined with `|`.
    pub record_key: Vec<String>,
    /// The business identifier's system (a URI the center owns).
    pub identifier_system: String,
    /// For patients: a column that already holds the CRID (used when the target's CRID mode is
    /// `column`).
    #[serde(default)]
    pub crid_column: Option<String>,
    /// Lookup tables this mapping uses: name → CSV file (relative to the mapping file).
    #[serde(default)]
    pub lookups: std::collections::BTreeMap<String, PathBuf>,
    /// The wide-row form: one resource per non-empty column listed.
    #[serde(default)]
    pub wide: Vec<WideColumn>,
    /// The file it was read from.
    #[serde(skip)]
    pub file: PathBuf,
}

impl MappingSpec {
    /// Reads, parses and checks one mapping file, resolving its paths.
    pub fn load(path: &Path) -> Result<MappingSpec, Vec<MappingError>> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            vec![MappingError::Read {
                path: path.to_path_buf(),
                source,
            }]
        })?;
        let mut spec: MappingSpec = crate::config::parse_toml(path, &text)
            .map_err(|e| vec![MappingError::Config(Box::new(e))])?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        spec.template_dir = Some(
            dir.join(
                spec.template_dir
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("../templates")),
            ),
        );
        for table in spec.lookups.values_mut() {
            *table = dir.join(&*table);
        }
        spec.file = path.to_path_buf();
        let problems = spec.check();
        if problems.is_empty() {
            Ok(spec)
        } else {
            Err(problems)
        }
    }

    /// The resolved template folder.
    pub fn template_dir(&self) -> PathBuf {
        self.template_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("templates"))
    }

    /// Every source column this mapping names (keys, CRID column, wide columns), for `validate`.
    /// Columns used only inside templates are not listed: templates read them through `row`.
    pub fn named_columns(&self) -> Vec<(&'static str, &str)> {
        let mut out: Vec<(&'static str, &str)> = Vec::new();
        out.extend(self.patient_key.iter().map(|c| ("patient_key", c.as_str())));
        out.extend(self.record_key.iter().map(|c| ("record_key", c.as_str())));
        if let Some(c) = &self.crid_column {
            out.push(("crid_column", c));
        }
        out.extend(self.wide.iter().map(|w| ("wide", w.column.as_str())));
        out
    }

    fn check(&self) -> Vec<MappingError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, message: String| {
            problems.push(MappingError::Invalid {
                path: self.file.clone(),
                key: key.to_string(),
                message,
            })
        };
        if self.name.trim().is_empty() {
            bad("name", "must not be empty".into());
        }
        if self.patient_key.is_empty() {
            bad("patient_key", "name at least one column".into());
        }
        if self.record_key.is_empty() {
            bad("record_key", "name at least one column".into());
        }
        if !self
            .resource_type
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
            || !self
                .resource_type
                .chars()
                .all(|c| c.is_ascii_alphanumeric())
        {
            bad(
                "resource_type",
                format!("{:?} is not a FHIR resource type name", self.resource_type),
            );
        }
        match self.kind {
            MappingKind::Patient => {
                if self.resource_type != "Patient" {
                    bad(
                        "resource_type",
                        "a mapping of kind \"patient\" renders a Patient".into(),
                    );
                }
                if !self.wide.is_empty() {
                    bad(
                        "wide",
                        "a patient mapping yields one Patient per row".into(),
                    );
                }
            }
            MappingKind::Resource => {
                if self.resource_type == "Patient" {
                    bad(
                        "kind",
                        "a Patient mapping must have kind = \"patient\"".into(),
                    );
                }
                if self.crid_template.is_some() {
                    bad("crid_template", "only patient mappings have one".into());
                }
            }
        }
        if !self.identifier_system.contains(':') {
            bad(
                "identifier_system",
                format!("{:?} is not an absolute URI", self.identifier_system),
            );
        }
        let mut seen = std::collections::HashSet::new();
        for w in &self.wide {
            if !seen.insert(&w.column) {
                bad("wide", format!("column {:?} is listed twice", w.column));
            }
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("m.toml");
        std::fs::write(&p, text).expect("write mapping");
        p
    }

    const GOOD: &str = r#"
name = "labs"
source = "labs"
kind = "resource"
resource_type = "Observation"
template = "cibmtr/observation-lab.json.j2"
patient_key = ["mrn"]
record_key = ["lab_id"]
identifier_system = "urn:example:lab"
lookups = { lab_codes = "lookups/lab_codes.csv" }
"#;

    #[test]
    fn paths_resolve_against_the_mapping_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = MappingSpec::load(&write(dir.path(), GOOD)).expect("valid mapping");
        assert_eq!(spec.template_dir(), dir.path().join("../templates"));
        assert_eq!(
            spec.lookups["lab_codes"],
            dir.path().join("lookups/lab_codes.csv")
        );
        assert_eq!(
            spec.named_columns(),
            vec![("patient_key", "mrn"), ("record_key", "lab_id")]
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = GOOD
            .replace("\"Observation\"", "\"Patient\"")
            .replace("urn:example:lab", "lab")
            .replace("[\"mrn\"]", "[]");
        let errs = MappingSpec::load(&write(dir.path(), &text)).expect_err("invalid");
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 3, "{text:#?}");
        assert!(text.iter().any(|t| t.contains("patient_key")), "{text:#?}");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let errs = MappingSpec::load(&write(dir.path(), &format!("{GOOD}\ntempalte = \"x\"\n")))
            .expect_err("typo");
        let text = errs[0].to_string();
        assert!(text.contains("m.toml:12:1"), "{text}");
        assert!(text.contains("tempalte"), "{text}");
    }
}
