//! The mapping stage: typed rows → FHIR resources through minijinja templates, each one parsed
//! and validated before it leaves the stage.
//!
//! A [`MappingSet`] is built once per run from the pipeline config: the mapping files, every
//! template under their template folders (compiled into one [`minijinja::Environment`] that rayon
//! workers share read-only) and the lookup tables. [`MappingSet::map_row`] is pure and thread-safe:
//! it turns one [`Row`] into a [`MappedRow`] or a [`RowError`]. This module must not read sources,
//! write files or talk to the network, and it keeps no per-run state: the pipeline
//! ([`crate::pipeline`]) does the reading, ordering and sending.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::Value as JValue;
use minijinja::{AutoEscape, Environment, UndefinedBehavior};

use crate::config::PipelineConfig;
use crate::resource::json as json_doc;
use crate::resource::{Body, BusinessIdentifier, MappedPatient, MappedResource};
use crate::source::{Row, Value};
use crate::validate::{CibmtrRules, Issue, Severity};

use context::{RowContext, RowValues};

mod context;
mod error;
pub mod filters;
pub mod json;
pub mod lookup;
pub mod spec;

pub use context::cell_value;
pub use error::{MappingError, RowError, TemplateFailure};
pub use json::JsonMap;
pub use lookup::{LookupTable, Lookups};
pub use spec::{MappingKind, MappingSpec, WideColumn};

/// Instructions one render may execute: far above what a resource template needs, low enough
/// that a runaway loop fails the row instead of hanging the run.
pub const TEMPLATE_FUEL: u64 = 100_000;

/// Separator between the values of a multi-column key, and before a wide column's code.
pub const KEY_SEPARATOR: &str = ":";

/// One loaded mapping.
#[derive(Debug)]
pub struct Mapping {
    pub spec: MappingSpec,
    /// The IANA zone naive date-times of its source are read in.
    pub timezone: String,
    /// Context members that are the same for every row, made once.
    identifier_system: JValue,
    name_value: JValue,
    timezone_value: JValue,
}

impl Mapping {
    pub fn name(&self) -> &str {
        &self.spec.name
    }
}

/// What one row produced.
#[derive(Clone, Debug, PartialEq)]
pub enum Mapped {
    Patient(Box<MappedPatient>),
    /// Zero or more resources (a wide row with no filled column yields none).
    Resources(Vec<MappedResource>),
}

/// One row, mapped and validated.
#[derive(Clone, Debug, PartialEq)]
pub struct MappedRow {
    pub patient_key: String,
    pub mapped: Mapped,
    /// Validation warnings (resource type, issue); they do not reject the row.
    pub warnings: Vec<(String, Issue)>,
}

/// A source column a mapping names, and where ([`MappingSet::columns_used`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnUse {
    pub column: String,
    /// The mapping file's keys (`patient_key`, `wide`, …) and the templates (`template t.json.j2`)
    /// that name it, sorted.
    pub places: Vec<String>,
    /// Named only as `row.<column>` in templates, not in the mapping file.
    pub templates_only: bool,
}

/// What [`MappingSet::check_columns`] found.
#[derive(Debug, Default)]
pub struct ColumnCheck {
    /// Columns a mapping needs that its source lacks.
    pub errors: Vec<MappingError>,
    /// Columns a template may read that its source lacks, where that need not be a mistake.
    pub warnings: Vec<MappingError>,
}

/// Every mapping of a pipeline, with its templates and lookup tables.
pub struct MappingSet {
    env: Environment<'static>,
    mappings: Vec<Mapping>,
    lookups: Arc<Lookups>,
    rules: CibmtrRules,
    center: JValue,
    /// sha256 of everything besides the row that decides what a row renders to.
    fingerprint: [u8; 32],
}

impl std::fmt::Debug for MappingSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappingSet")
            .field("mappings", &self.mappings)
            .field("lookups", &self.lookups.names())
            .finish_non_exhaustive()
    }
}

impl MappingSet {
    /// Loads every mapping the config lists, their templates and lookup tables. Every problem
    /// found is returned, not just the first.
    pub fn load(config: &PipelineConfig) -> Result<MappingSet, Vec<MappingError>> {
        let mut problems = Vec::new();
        let mut specs = Vec::new();
        for path in &config.mappings {
            match MappingSpec::load(path) {
                Ok(mut s) => {
                    // A center's identifiers must not collide with another center's on the
                    // shared service: systems may name the CCN.
                    s.identifier_system = s.identifier_system.replace("{ccn}", &config.center.ccn);
                    specs.push(s)
                }
                Err(mut e) => problems.append(&mut e),
            }
        }
        let mut names = HashMap::new();
        for s in &specs {
            if let Some(first) = names.insert(s.name.clone(), s.file.clone()) {
                problems.push(MappingError::Invalid {
                    path: s.file.clone(),
                    key: "name".into(),
                    message: format!(
                        "mapping name {:?} is already used by {}",
                        s.name,
                        first.display()
                    ),
                });
            }
            if !config.sources.contains_key(&s.source) {
                problems.push(MappingError::Invalid {
                    path: s.file.clone(),
                    key: "source".into(),
                    message: format!(
                        "no source {:?} in {} (known: {})",
                        s.source,
                        config.file.display(),
                        config
                            .sources
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        let mut lookups = Lookups::default();
        for s in &specs {
            for (name, path) in &s.lookups {
                if let Err(e) = lookups.add(name, path) {
                    problems.push(e);
                }
            }
        }
        let lookups = Arc::new(lookups);
        let mut env = new_environment(lookups.clone());
        let mut loaded: HashMap<String, PathBuf> = HashMap::new();
        let mut dirs: Vec<PathBuf> = specs.iter().map(MappingSpec::template_dir).collect();
        dirs.dedup();
        for dir in &dirs {
            if let Err(mut e) = add_templates(&mut env, dir, &mut loaded) {
                problems.append(&mut e);
            }
        }
        for s in &specs {
            for (key, name) in [
                ("template", Some(&s.template)),
                ("crid_template", s.crid_template.as_ref()),
            ] {
                if let Some(name) = name
                    && !loaded.contains_key(name.as_str())
                {
                    {
                        problems.push(MappingError::Invalid {
                            path: s.file.clone(),
                            key: key.into(),
                            message: format!(
                                "no template {name:?} under {}",
                                s.template_dir().display()
                            ),
                        });
                    }
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let fingerprint = fingerprint(config, &specs, &loaded);
        let mappings = specs
            .into_iter()
            .map(|spec| {
                let timezone = config
                    .sources
                    .get(&spec.source)
                    .and_then(|s| s.timezone.clone())
                    .or_else(|| config.defaults.timezone.clone())
                    .unwrap_or_else(|| "UTC".to_string());
                Mapping {
                    identifier_system: JValue::from(spec.identifier_system.as_str()),
                    name_value: JValue::from(spec.name.as_str()),
                    timezone_value: JValue::from(timezone.as_str()),
                    spec,
                    timezone,
                }
            })
            .collect();
        let rules = CibmtrRules::new(
            &config.center.ccn,
            &config.fhir.security_system,
            &config.fhir.crid_system,
        );
        let center = JsonMap::value([
            ("ccn", JValue::from(config.center.ccn.as_str())),
            (
                "security_system",
                JValue::from(config.fhir.security_system.as_str()),
            ),
            ("security_code", JValue::from(config.security_code())),
            (
                "crid_system",
                JValue::from(config.fhir.crid_system.as_str()),
            ),
            ("crid_pending", JValue::from(crate::resource::CRID_PENDING)),
        ]);
        Ok(MappingSet {
            env,
            mappings,
            lookups,
            rules,
            center,
            fingerprint,
        })
    }

    /// A row's hash under mapping `index` (hex sha256): the same row through the same mappings,
    /// templates, lookup tables, center settings and fhirlift version always renders the same
    /// resources, so an equal hash means an equal result. Cheap next to rendering.
    pub fn source_hash(&self, index: usize, row: &Row) -> String {
        use sha2::Digest;
        let mut h = HashWrite(sha2::Sha256::new());
        h.0.update(self.fingerprint);
        h.0.update((index as u64).to_le_bytes());
        for (column, value) in row.header.columns.iter().zip(&row.values) {
            h.0.update((column.len() as u64).to_le_bytes());
            h.0.update(column.as_bytes());
            // Debug text is unambiguous (strings quoted and escaped, the variant named).
            let _ = std::fmt::Write::write_fmt(&mut h, format_args!("{value:?}\u{1f}"));
        }
        hex::encode(h.0.finalize())
    }

    /// The ledger records a row of a resource mapping would produce, from its keys alone (no
    /// rendering). `None` for patient mappings, and for a row the mapping would reject anyway
    /// (cell errors, an empty key): those always take the full path.
    /// Returns the row's patient key with them.
    pub fn record_refs(
        &self,
        index: usize,
        row: &Row,
    ) -> Option<(String, Vec<crate::ledger::RecordRef>)> {
        let m = &self.mappings[index];
        if m.spec.kind != MappingKind::Resource || row.has_errors() {
            return None;
        }
        let patient_key = key_of(row, &m.spec.patient_key, "patient key").ok()?;
        let record_key = key_of(row, &m.spec.record_key, "record key").ok()?;
        let rtype = &m.spec.resource_type;
        if m.spec.wide.is_empty() {
            return Some((
                patient_key,
                vec![crate::ledger::RecordRef::new(rtype.as_str(), record_key)],
            ));
        }
        Some((
            patient_key,
            m.spec
                .wide
                .iter()
                .filter(|w| row.get(&w.column).is_some_and(|v| !v.is_null()))
                .map(|w| {
                    crate::ledger::RecordRef::new(
                        rtype.as_str(),
                        format!("{record_key}{KEY_SEPARATOR}{}", w.code),
                    )
                })
                .collect(),
        ))
    }

    pub fn mappings(&self) -> &[Mapping] {
        &self.mappings
    }

    /// A mapping's index by name.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.mappings.iter().position(|m| m.spec.name == name)
    }

    pub fn lookups(&self) -> &Lookups {
        &self.lookups
    }

    pub fn rules(&self) -> &CibmtrRules {
        &self.rules
    }

    /// Every source column mapping `index` names: in its file (keys, CRID column, wide columns)
    /// and as `row.<column>` in its templates. Sorted by column, each with every place that names
    /// it, so that fixing one template does not reveal the same column in the next.
    pub fn columns_used(&self, index: usize) -> Vec<ColumnUse> {
        let m = &self.mappings[index];
        // Column → (places, named in the mapping file itself).
        let mut uses: BTreeMap<String, (BTreeSet<String>, bool)> = BTreeMap::new();
        for (key, column) in m.spec.named_columns() {
            let entry = uses.entry(column.to_string()).or_default();
            entry.0.insert(key.to_string());
            entry.1 = true;
        }
        for t in std::iter::once(&m.spec.template).chain(m.spec.crid_template.as_ref()) {
            if let Ok(tmpl) = self.env.get_template(t) {
                for var in tmpl.undeclared_variables(true) {
                    if let Some(col) = var.strip_prefix("row.") {
                        let entry = uses.entry(col.to_string()).or_default();
                        entry.0.insert(format!("template {t}"));
                    }
                }
            }
        }
        uses.into_iter()
            .map(|(column, (places, in_file))| ColumnUse {
                column,
                places: places.into_iter().collect(),
                templates_only: !in_file,
            })
            .collect()
    }

    /// Opens each mapping's source (header only) and checks that every column it names exists.
    /// For `fhirlift validate`; reads no data row.
    ///
    /// A column missing from the header is an error, except one that only a wide mapping's
    /// template reads: a template may serve both layouts (the shipped lab template does), and
    /// reads the long layout's columns only for long rows, so there it is a warning.
    pub fn check_columns(&self, config: &PipelineConfig) -> ColumnCheck {
        let mut check = ColumnCheck::default();
        for (i, m) in self.mappings.iter().enumerate() {
            let Some(cfg) = config.sources.get(&m.spec.source) else {
                continue;
            };
            let reader = match crate::source::open(&m.spec.source, cfg, &config.defaults) {
                Ok(r) => r,
                Err(e) => {
                    check.errors.push(MappingError::Invalid {
                        path: m.spec.file.clone(),
                        key: "source".into(),
                        message: format!("cannot open source {:?}: {e}", m.spec.source),
                    });
                    continue;
                }
            };
            let header = reader.header().clone();
            let columns = || {
                header
                    .columns
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            for used in self.columns_used(i) {
                if header.index_of(&used.column).is_some() {
                    continue;
                }
                let place = used.places.join(", ");
                let missing = format!(
                    "column {:?} is not in source {:?}",
                    used.column, m.spec.source
                );
                if !m.spec.wide.is_empty() && used.templates_only {
                    check.warnings.push(MappingError::Invalid {
                        path: m.spec.file.clone(),
                        key: place,
                        message: format!(
                            "{missing}; this mapping is wide, so its template may read it only for \
                             long rows, but a wide row that reaches it is rejected"
                        ),
                    });
                } else {
                    check.errors.push(MappingError::Invalid {
                        path: m.spec.file.clone(),
                        key: place,
                        message: format!("{missing} (columns: {})", columns()),
                    });
                }
            }
        }
        check
    }

    /// The template context a row gets (without `item`), for `render` to show.
    pub fn context(&self, index: usize, row: &Row) -> Result<JValue, RowError> {
        let m = &self.mappings[index];
        let patient_key = key_of(row, &m.spec.patient_key, "patient key")?;
        let record_key = key_of(row, &m.spec.record_key, "record key")?;
        Ok(self.base_context(m, RowValues::value(row), &patient_key, &record_key, None))
    }

    /// Maps one row through mapping `index`. Pure: the same row always gives the same result.
    pub fn map_row(&self, index: usize, row: &Row) -> Result<MappedRow, RowError> {
        let m = &self.mappings[index];
        if row.has_errors() {
            return Err(RowError::Cells(row.errors.clone()));
        }
        let patient_key = key_of(row, &m.spec.patient_key, "patient key")?;
        let record_key = key_of(row, &m.spec.record_key, "record key")?;
        let mut warnings = Vec::new();
        let mapped = match m.spec.kind {
            MappingKind::Patient => {
                let identifier = BusinessIdentifier {
                    system: m.spec.identifier_system.clone(),
                    value: patient_key.clone(),
                };
                let ctx =
                    self.base_context(m, RowValues::value(row), &patient_key, &record_key, None);
                let body = self.render_resource(m, row, &ctx, &identifier, &mut warnings)?;
                let crid_demographics = match &m.spec.crid_template {
                    Some(t) => Some(self.render_crid(m, row, t, &ctx)?),
                    None => None,
                };
                let known_crid = m
                    .spec
                    .crid_column
                    .as_deref()
                    .and_then(|c| row.get(c))
                    .filter(|v| !v.is_null())
                    .map(|v| v.to_string());
                Mapped::Patient(Box::new(MappedPatient {
                    resource: MappedResource {
                        location: row.location.clone(),
                        mapping: m.spec.name.clone(),
                        resource_type: m.spec.resource_type.clone(),
                        patient_key: patient_key.clone(),
                        identifier,
                        body,
                    },
                    crid_demographics,
                    known_crid,
                }))
            }
            MappingKind::Resource if m.spec.wide.is_empty() => {
                let identifier = BusinessIdentifier {
                    system: m.spec.identifier_system.clone(),
                    value: record_key.clone(),
                };
                let ctx =
                    self.base_context(m, RowValues::value(row), &patient_key, &record_key, None);
                let body = self.render_resource(m, row, &ctx, &identifier, &mut warnings)?;
                Mapped::Resources(vec![MappedResource {
                    location: row.location.clone(),
                    mapping: m.spec.name.clone(),
                    resource_type: m.spec.resource_type.clone(),
                    patient_key: patient_key.clone(),
                    identifier,
                    body,
                }])
            }
            MappingKind::Resource => {
                let mut out = Vec::new();
                let rv = RowValues::value(row);
                for w in &m.spec.wide {
                    let value = match row.get(&w.column) {
                        Some(v) if !v.is_null() => v,
                        _ => continue,
                    };
                    let identifier = BusinessIdentifier {
                        system: m.spec.identifier_system.clone(),
                        value: format!("{record_key}{KEY_SEPARATOR}{}", w.code),
                    };
                    let ctx = self.base_context(
                        m,
                        rv.clone(),
                        &patient_key,
                        &identifier.value,
                        Some(wide_item(w, value)),
                    );
                    let body = self
                        .render_resource(m, row, &ctx, &identifier, &mut warnings)
                        .map_err(|e| e.in_column(&w.column))?;
                    out.push(MappedResource {
                        location: row.location.clone(),
                        mapping: m.spec.name.clone(),
                        resource_type: m.spec.resource_type.clone(),
                        patient_key: patient_key.clone(),
                        identifier,
                        body,
                    });
                }
                Mapped::Resources(out)
            }
        };
        Ok(MappedRow {
            patient_key,
            mapped,
            warnings,
        })
    }

    fn base_context(
        &self,
        m: &Mapping,
        row_value: JValue,
        patient_key: &str,
        record_key: &str,
        item: Option<JValue>,
    ) -> JValue {
        let identifier_value = match item {
            Some(_) => record_key,
            None if m.spec.kind == MappingKind::Patient => patient_key,
            None => record_key,
        };
        JValue::from_object(RowContext {
            row: row_value,
            patient_key: JValue::from(patient_key),
            record_key: JValue::from(record_key),
            identifier: JsonMap::value([
                ("system", m.identifier_system.clone()),
                ("value", JValue::from(identifier_value)),
            ]),
            patient_ref: placeholder_value(patient_key),
            center: self.center.clone(),
            mapping: m.name_value.clone(),
            timezone: m.timezone_value.clone(),
            item,
        })
    }

    /// Renders a template to text (for `render` and the tests).
    fn render_text(
        &self,
        m: &Mapping,
        row: &Row,
        template: &str,
        ctx: &JValue,
    ) -> Result<String, RowError> {
        let t = self
            .env
            .get_template(template)
            .map_err(|e| self.template_error(m, row, &e))?;
        t.render(ctx).map_err(|e| self.template_error(m, row, &e))
    }

    /// Parses a template's output into a JSON tree with its nulls stripped.
    fn parse_output<'t>(
        &self,
        row: &Row,
        template: &str,
        text: &'t str,
    ) -> Result<json_doc::Node<'t>, RowError> {
        let mut tree = json_doc::parse(text).map_err(|e| RowError::Json {
            location: row.location.clone(),
            template: template.to_string(),
            // The message names the position in the output, never the output itself.
            message: e.to_string(),
        })?;
        json_doc::strip_nulls(&mut tree);
        Ok(tree)
    }

    /// Renders, parses, strips and validates one resource; the result is its compact JSON.
    fn render_resource(
        &self,
        m: &Mapping,
        row: &Row,
        ctx: &JValue,
        identifier: &BusinessIdentifier,
        warnings: &mut Vec<(String, Issue)>,
    ) -> Result<Body, RowError> {
        let template = &m.spec.template;
        let text = self.render_text(m, row, template, ctx)?;
        let body = self.parse_output(row, template, &text)?;
        let rt = &m.spec.resource_type;
        let mut issues = Vec::new();
        match body.get("resourceType").and_then(|v| v.as_str()) {
            Some(t) if t == rt => {}
            other => issues.push(Issue {
                severity: Severity::Error,
                path: format!("{rt}.resourceType"),
                message: format!("the template rendered {other:?}, the mapping declares {rt:?}"),
            }),
        }
        if m.spec.kind == MappingKind::Resource && !has_identifier(&body, identifier) {
            issues.push(Issue {
                severity: Severity::Error,
                path: format!("{rt}.identifier"),
                message: format!(
                    "must carry the business identifier {}|{} (write {{{{ identifier }}}} in the template)",
                    identifier.system, identifier.value
                ),
            });
        }
        issues.extend(crate::validate::validate_node(&body, &self.rules));
        if issues.iter().any(|i| i.severity == Severity::Error) {
            return Err(RowError::Invalid {
                location: row.location.clone(),
                resource_type: rt.clone(),
                issues,
            });
        }
        warnings.extend(issues.into_iter().map(|i| (rt.clone(), i)));
        Ok(Body::from_node(&body))
    }

    fn render_crid(
        &self,
        m: &Mapping,
        row: &Row,
        template: &str,
        ctx: &JValue,
    ) -> Result<serde_json::Map<String, serde_json::Value>, RowError> {
        let text = self.render_text(m, row, template, ctx)?;
        let tree = self.parse_output(row, template, &text)?;
        let mut compact = String::new();
        json_doc::write_compact(&mut compact, &tree);
        match serde_json::from_str(&compact) {
            Ok(serde_json::Value::Object(map)) => {
                let issues = crate::validate::validate_crid_patient(&map);
                if issues.is_empty() {
                    Ok(map)
                } else {
                    Err(RowError::Invalid {
                        location: row.location.clone(),
                        resource_type: "CRID request".into(),
                        issues,
                    })
                }
            }
            _ => Err(RowError::Json {
                location: row.location.clone(),
                template: template.to_string(),
                message: "the CRID template must render a JSON object".into(),
            }),
        }
    }

    /// Turns a minijinja error into the row error it stands for: an unmapped code and a missing
    /// required value get their own variants; anything else keeps the template's caret view.
    fn template_error(&self, m: &Mapping, row: &Row, err: &minijinja::Error) -> RowError {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = cur {
            if let Some(u) = e.downcast_ref::<filters::UnmappedCode>() {
                let column = row
                    .header
                    .columns
                    .iter()
                    .zip(&row.values)
                    .find(|(_, v)| matches!(v, Value::Text(s) if s.trim() == u.code))
                    .map(|(c, _)| c.to_string());
                return RowError::Unmapped {
                    location: row.location.clone(),
                    column,
                    table: u.table.clone(),
                    code: u.code.clone(),
                };
            }
            if let Some(u) = e.downcast_ref::<filters::UnitMismatch>() {
                return RowError::Unit {
                    location: row.location.clone(),
                    column: None,
                    unit: u.unit.clone(),
                    expected: u.expected.clone(),
                };
            }
            if let Some(r) = e.downcast_ref::<filters::RequiredMissing>() {
                return RowError::Required {
                    location: row.location.clone(),
                    column: r.column.clone(),
                };
            }
            cur = e.source();
        }
        RowError::Template {
            location: row.location.clone(),
            mapping: m.spec.name.clone(),
            column: None,
            failure: Box::new(TemplateFailure::from_minijinja(err)),
        }
    }

    /// Renders one row for `fhirlift render`: the raw rendered text of each resource template
    /// (so a broken template can be seen as it came out), one per filled wide column with the
    /// `item` it saw; then the full mapping result.
    pub fn render_debug(&self, index: usize, row: &Row) -> Result<Vec<DebugOutput>, RowError> {
        let m = &self.mappings[index];
        let patient_key = key_of(row, &m.spec.patient_key, "patient key")?;
        let record_key = key_of(row, &m.spec.record_key, "record key")?;
        let mut out = Vec::new();
        if m.spec.wide.is_empty() {
            let ctx = self.base_context(m, RowValues::value(row), &patient_key, &record_key, None);
            out.push(DebugOutput {
                item: None,
                text: self.render_text(m, row, &m.spec.template, &ctx),
            });
        } else {
            for w in &m.spec.wide {
                let Some(value) = row.get(&w.column).filter(|v| !v.is_null()) else {
                    continue;
                };
                let key = format!("{record_key}{KEY_SEPARATOR}{}", w.code);
                let item = wide_item(w, value);
                let shown = serde_json::to_value(&item).ok();
                let ctx =
                    self.base_context(m, RowValues::value(row), &patient_key, &key, Some(item));
                out.push(DebugOutput {
                    item: shown,
                    text: self
                        .render_text(m, row, &m.spec.template, &ctx)
                        .map_err(|e| e.in_column(&w.column)),
                });
            }
        }
        Ok(out)
    }
}

/// One template output for `fhirlift render`.
pub struct DebugOutput {
    /// The `item` a wide column gave the template.
    pub item: Option<serde_json::Value>,
    /// The rendered text, or why rendering failed.
    pub text: Result<String, RowError>,
}

/// The `item` a wide column's cell gets in its template: `column`, `code`, `value`, `unit`.
fn wide_item(w: &spec::WideColumn, value: &Value) -> JValue {
    JValue::from_iter([
        ("column", JValue::from(w.column.as_str())),
        ("code", JValue::from(w.code.as_str())),
        ("value", cell_value(value)),
        (
            "unit",
            w.unit.as_deref().map_or(JValue::from(()), JValue::from),
        ),
    ])
}

fn has_identifier(body: &json_doc::Node<'_>, id: &BusinessIdentifier) -> bool {
    body.get("identifier")
        .and_then(|v| v.as_array())
        .is_some_and(|ids| {
            ids.iter().any(|i| {
                i.get("system").and_then(|s| s.as_str()) == Some(id.system.as_str())
                    && i.get("value").and_then(|s| s.as_str()) == Some(id.value.as_str())
            })
        })
}

/// [`crate::resource::patient_placeholder`] as a template value. A patient's rows are many, so
/// each worker thread keeps the placeholders it made (a bounded number, then it starts over).
fn placeholder_value(patient_key: &str) -> JValue {
    const KEEP: usize = 16_384;
    thread_local! {
        static MADE: std::cell::RefCell<HashMap<String, JValue>> =
            std::cell::RefCell::new(HashMap::new());
    }
    MADE.with_borrow_mut(|made| {
        if let Some(v) = made.get(patient_key) {
            return v.clone();
        }
        if made.len() >= KEEP {
            made.clear();
        }
        let v = JValue::from(crate::resource::patient_placeholder(patient_key));
        made.insert(patient_key.to_string(), v.clone());
        v
    })
}

/// A key from its column(s): values joined with [`KEY_SEPARATOR`]; any empty part is an error.
fn key_of(row: &Row, columns: &[String], what: &'static str) -> Result<String, RowError> {
    let mut parts = Vec::with_capacity(columns.len());
    for c in columns {
        let text = row
            .get(c)
            .filter(|v| !v.is_null())
            .map(|v| match v {
                Value::Text(s) => s.trim().to_string(),
                other => other.to_string(),
            })
            .filter(|s| !s.is_empty());
        match text {
            Some(t) => parts.push(t),
            None => {
                return Err(RowError::EmptyKey {
                    location: row.location.clone(),
                    column: c.clone(),
                    key: what,
                });
            }
        }
    }
    Ok(parts.join(KEY_SEPARATOR))
}

/// Feeds formatted text to a hash.
struct HashWrite(sha2::Sha256);

impl std::fmt::Write for HashWrite {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        sha2::Digest::update(&mut self.0, s.as_bytes());
        Ok(())
    }
}

/// What decides a row's resources besides the row: fhirlift's version, the center settings, and
/// the bytes of every mapping file, template and lookup table, with each mapping's time zone.
fn fingerprint(
    config: &PipelineConfig,
    specs: &[MappingSpec],
    templates: &HashMap<String, PathBuf>,
) -> [u8; 32] {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut part = |label: &str, bytes: &[u8]| {
        h.update((label.len() as u64).to_le_bytes());
        h.update(label.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    part("version", env!("CARGO_PKG_VERSION").as_bytes());
    part("ccn", config.center.ccn.as_bytes());
    part("security_code", config.security_code().as_bytes());
    part("security_system", config.fhir.security_system.as_bytes());
    part("crid_system", config.fhir.crid_system.as_bytes());
    let read = |p: &Path| std::fs::read(p).unwrap_or_default();
    for s in specs {
        part("mapping", &read(&s.file));
        part("identifier_system", s.identifier_system.as_bytes());
        let zone = config
            .sources
            .get(&s.source)
            .and_then(|c| c.timezone.clone())
            .or_else(|| config.defaults.timezone.clone())
            .unwrap_or_default();
        part("timezone", zone.as_bytes());
        for (name, path) in &s.lookups {
            part(name, &read(path));
        }
    }
    let mut files: Vec<(&String, &PathBuf)> = templates.iter().collect();
    files.sort();
    for (name, path) in files {
        part(name, &read(path));
    }
    h.finalize().into()
}

/// The shared environment: JSON auto-escaping for `*.json.j2`, strict undefined, a fuel limit,
/// debug info for caret views, our filters, and no loader (templates are added up front, so a
/// template can neither read files nor the process environment).
pub fn new_environment(lookups: Arc<Lookups>) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".json.j2") || name.ends_with(".json") {
            AutoEscape::Json
        } else {
            AutoEscape::None
        }
    });
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.set_debug(true);
    env.set_formatter(json::formatter);
    env.add_filter("date", filters::date);
    env.add_filter("dateTime", filters::date_time);
    env.add_filter("decimal", filters::decimal);
    env.add_filter("quantity", filters::quantity);
    env.add_filter("split_comparator", filters::split_comparator);
    env.add_filter("ssn", filters::ssn);
    env.add_filter("uuid5", filters::uuid5);
    env.add_filter("required", filters::required);
    let l = lookups.clone();
    env.add_filter("lookup", move |key: JValue, table: &str| {
        filters::lookup_in(&l, table, &key)
    });
    let l = lookups.clone();
    env.add_function("lookup", move |table: &str, key: JValue| {
        filters::lookup_in(&l, table, &key)
    });
    type Lf = fn(&Lookups, JValue, Option<String>) -> Result<JValue, minijinja::Error>;
    let table_filters: [(&'static str, Lf); 6] = [
        ("fhir_gender", filters::fhir_gender),
        ("crid_gender", filters::crid_gender),
        ("us_core_race", filters::us_core_race),
        ("us_core_ethnicity", filters::us_core_ethnicity),
        ("crid_race", filters::crid_race),
        ("crid_ethnicity", filters::crid_ethnicity),
    ];
    for (name, f) in table_filters {
        let l = lookups.clone();
        env.add_filter(name, move |v: JValue, table: Option<String>| {
            f(&l, v, table)
        });
    }
    env
}

/// Adds every `*.j2` file under `dir` to the environment, named by its path relative to `dir`
/// with `/` separators. A name already loaded from another folder must have the same text.
fn add_templates(
    env: &mut Environment<'static>,
    dir: &Path,
    loaded: &mut HashMap<String, PathBuf>,
) -> Result<(), Vec<MappingError>> {
    let mut files = Vec::new();
    collect_files(dir, &mut files).map_err(|source| {
        vec![MappingError::Read {
            path: dir.to_path_buf(),
            source,
        }]
    })?;
    files.sort();
    let mut problems = Vec::new();
    let mut texts: BTreeMap<String, String> = BTreeMap::new();
    for file in files {
        if file.extension().and_then(|e| e.to_str()) != Some("j2") {
            continue;
        }
        let Ok(rel) = file.strip_prefix(dir) else {
            continue;
        };
        let name = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(source) => {
                problems.push(MappingError::Read { path: file, source });
                continue;
            }
        };
        if let Some(prev) = loaded.get(&name) {
            if std::fs::read_to_string(prev).ok().as_deref() != Some(text.as_str()) {
                problems.push(MappingError::Invalid {
                    path: file.clone(),
                    key: "template".into(),
                    message: format!("template name {name:?} is also {}", prev.display()),
                });
            }
            continue;
        }
        loaded.insert(name.clone(), file.clone());
        texts.insert(name, text);
    }
    for (name, text) in texts {
        let path = loaded.get(&name).cloned().unwrap_or_default();
        if let Err(e) = env.add_template_owned(name, text) {
            problems.push(MappingError::Template {
                path,
                failure: TemplateFailure::from_minijinja(&e),
            });
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}
