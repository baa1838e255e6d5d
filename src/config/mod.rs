//! The pipeline configuration: what to read, how to type it, which mappings to apply, where to send.
//!
//! The file describes the pipeline; command-line flags describe one run. Loading is pure: it parses
//! and resolves paths but opens no source and touches no network (`validate` does the opening).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub mod problems;

pub use problems::{Problem, Problems};

pub use crate::source::row::ColumnType;

/// Default null tokens: cells holding exactly one of these (after trimming) are empty.
pub const DEFAULT_NULL_TOKENS: &[&str] = &["", "NA", "N/A", "."];

/// The default security-label system (operational docs and every working client use it).
pub const DEFAULT_SECURITY_SYSTEM: &str = "http://cibmtr.org/codesystem/transplant-center";
/// The default CRID identifier system.
pub const DEFAULT_CRID_SYSTEM: &str = "http://cibmtr.org/identifier/CRID";
/// The default OAuth2 scope.
pub const DEFAULT_SCOPE: &str = "api_cibmtr_fhir_ehr_client";

/// A whole pipeline file, after path resolution.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub center: Center,
    /// Where the ledger, reports and the embedded sandbox's store live. Default: `.fhirlift` beside
    /// the config file.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub defaults: Defaults,
    /// Named sources, in name order.
    pub sources: BTreeMap<String, SourceConfig>,
    /// Mapping files (`mappings/*.toml`), applied in this order.
    #[serde(default)]
    pub mappings: Vec<PathBuf>,
    #[serde(default)]
    pub target: TargetConfig,
    #[serde(default)]
    pub fhir: FhirUris,
    /// The folder the config file is in; relative paths were resolved against it.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The config file itself.
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Center {
    /// The CIBMTR center number: five digits, as a string.
    pub ccn: String,
}

/// Values that apply to every source unless it sets its own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// IANA zone for naive date-times (e.g. `America/Chicago`). Default: `UTC`.
    #[serde(default)]
    pub timezone: Option<String>,
    #[serde(default)]
    pub null_tokens: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceFormat {
    Csv,
    Xlsx,
    Xlsm,
    Xls,
    Xlsb,
    Ods,
    Parquet,
}

impl SourceFormat {
    /// The format a file name's extension names, if any.
    pub fn from_path(path: &Path) -> Option<SourceFormat> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "csv" | "tsv" | "txt" | "psv" => SourceFormat::Csv,
            "xlsx" => SourceFormat::Xlsx,
            "xlsm" => SourceFormat::Xlsm,
            "xls" => SourceFormat::Xls,
            "xlsb" => SourceFormat::Xlsb,
            "ods" => SourceFormat::Ods,
            "parquet" | "pq" => SourceFormat::Parquet,
            _ => return None,
        })
    }

    pub fn is_workbook(self) -> bool {
        matches!(
            self,
            SourceFormat::Xlsx
                | SourceFormat::Xlsm
                | SourceFormat::Xls
                | SourceFormat::Xlsb
                | SourceFormat::Ods
        )
    }
}

/// A sheet chosen by name or by 0-based index.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SheetRef {
    Name(String),
    Index(usize),
}

impl fmt::Display for SheetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SheetRef::Name(n) => f.write_str(n),
            SheetRef::Index(i) => write!(f, "#{i}"),
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub path: PathBuf,
    /// Explicit format; by default taken from the file's extension.
    #[serde(default)]
    pub format: Option<SourceFormat>,
    #[serde(default)]
    pub sheet: Option<SheetRef>,
    /// 1-based row (spreadsheet) or line (CSV) holding the header. Default: line 1 of a CSV, the
    /// first non-empty row of a sheet.
    #[serde(default)]
    pub header_row: Option<u64>,
    /// CSV delimiter: one character, or `tab`. Detected when absent.
    #[serde(default)]
    pub delimiter: Option<String>,
    /// CSV text encoding, as the WHATWG Encoding Standard labels it. Default UTF-8.
    #[serde(default)]
    pub encoding: Option<String>,
    #[serde(default)]
    pub null_tokens: Option<Vec<String>>,
    #[serde(default)]
    pub timezone: Option<String>,
    /// Declared column types. Columns not listed keep their source type (text for CSV).
    #[serde(default)]
    pub columns: BTreeMap<String, ColumnSpec>,
}

impl SourceConfig {
    /// A source with nothing but a path: format from the extension, everything else detected or
    /// default. `inspect` starts from this and applies its flags.
    pub fn for_path(path: &Path) -> SourceConfig {
        SourceConfig {
            path: path.to_path_buf(),
            format: None,
            sheet: None,
            header_row: None,
            delimiter: None,
            encoding: None,
            null_tokens: None,
            timezone: None,
            columns: BTreeMap::new(),
        }
    }

    /// The format from `format` or, failing that, the file extension.
    pub fn resolved_format(&self) -> Option<SourceFormat> {
        self.format.or_else(|| SourceFormat::from_path(&self.path))
    }
}

/// One column's declared type and parsing options.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    #[serde(rename = "type")]
    pub kind: ColumnType,
    /// `chrono` formats tried in order for date and datetime columns (e.g. `%m/%d/%Y`).
    /// ISO 8601 is always accepted.
    #[serde(default)]
    pub formats: Vec<String>,
    /// Decimal columns only: text writes its decimals with a comma (`12,5`). A point is then
    /// refused rather than guessed at, since such files use it to group thousands.
    #[serde(default)]
    pub decimal_comma: bool,
    /// String columns only: a value of digits shorter than this gets leading zeros up to it. For
    /// keys like `00042` that some cells of a workbook hold as the number 42.
    #[serde(default)]
    pub pad_zeros: Option<u8>,
}

/// Which endpoint `run` talks to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// The embedded sandbox on an ephemeral loopback port (the default).
    #[default]
    Sandbox,
    Test,
    ProductionTest,
    Production,
    /// A CIBMTR-like service at `base_url` with its token at `token_url`.
    Custom,
    /// A generic FHIR R4 server: `base_url` is the FHIR base, no `PUT /CRID`.
    Fhir,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantType {
    #[default]
    Password,
    ClientCredentials,
    /// No authentication (generic FHIR servers only).
    None,
}

/// How a patient's CRID is obtained.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", deny_unknown_fields)]
pub enum CridMode {
    /// `PUT {base}/CRID` with the mapped demographics.
    #[default]
    Service,
    /// Taken from a column of the patient source.
    Column { column: String },
    /// No CRID at all (generic FHIR servers).
    None,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    #[serde(default)]
    pub kind: TargetKind,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub grant: GrantType,
    #[serde(default)]
    pub crid: CridMode,
    /// Required to send to `production`, together with `--confirm-production`'s equivalent here.
    #[serde(default)]
    pub confirm_production: bool,
    /// PEM file of extra CA certificates to trust.
    #[serde(default)]
    pub ca_bundle: Option<PathBuf>,
    /// A secrets file (TOML: client_id, client_secret, username, password), mode 0600.
    #[serde(default)]
    pub secrets_file: Option<PathBuf>,
}

/// The two URI families (see the API contract); both configurable.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FhirUris {
    #[serde(default = "default_security_system")]
    pub security_system: String,
    #[serde(default = "default_crid_system")]
    pub crid_system: String,
}

impl Default for FhirUris {
    fn default() -> Self {
        FhirUris {
            security_system: default_security_system(),
            crid_system: default_crid_system(),
        }
    }
}

fn default_security_system() -> String {
    DEFAULT_SECURITY_SYSTEM.to_string()
}

fn default_crid_system() -> String {
    DEFAULT_CRID_SYSTEM.to_string()
}

/// A problem with a config file, located as precisely as the parser allows.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}{}: {message}", .path.display(), format_line(*.line, *.column))]
    Parse {
        path: PathBuf,
        line: Option<usize>,
        column: Option<usize>,
        message: String,
    },
    #[error("{}: {key}: {message}", .path.display())]
    Invalid {
        path: PathBuf,
        /// The dotted key the problem is about, e.g. `sources.labs.delimiter`.
        key: String,
        message: String,
    },
}

fn format_line(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

/// Parses a TOML document into `T`, turning serde's error into a located [`ConfigError`]
/// (line and column from the span, 1-based).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

impl PipelineConfig {
    /// Reads and parses a pipeline file, resolves its relative paths against its folder, and
    /// checks the values that need no I/O. Every problem found is returned, not just the first.
    pub fn load(path: &Path) -> Result<PipelineConfig, Vec<ConfigError>> {
        let config = PipelineConfig::load_unchecked(path).map_err(|e| vec![e])?;
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }

    /// Reads, parses and resolves paths, without the value checks of [`PipelineConfig::problems`]:
    /// `validate` uses it to go on checking sources while reporting the value problems too.
    pub fn load_unchecked(path: &Path) -> Result<PipelineConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config: PipelineConfig = parse_toml(path, &text)?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("."));
        config.file = path.to_path_buf();
        for source in config.sources.values_mut() {
            source.path = base_dir.join(&source.path);
        }
        for mapping in &mut config.mappings {
            *mapping = base_dir.join(&*mapping);
        }
        if let Some(dir) = &config.state_dir {
            config.state_dir = Some(base_dir.join(dir));
        }
        if let Some(p) = &config.target.ca_bundle {
            config.target.ca_bundle = Some(base_dir.join(p));
        }
        if let Some(p) = &config.target.secrets_file {
            config.target.secrets_file = Some(base_dir.join(p));
        }
        config.base_dir = base_dir;
        Ok(config)
    }

    /// The state directory: configured, or `.fhirlift` beside the config file.
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| self.base_dir.join(".fhirlift"))
    }

    /// The center's security-label code, `rc_<CCN>`.
    pub fn security_code(&self) -> String {
        format!("rc_{}", self.center.ccn)
    }

    /// Checks that need no I/O; returns every problem.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: String, message: String| {
            problems.push(ConfigError::Invalid {
                path: self.file.clone(),
                key,
                message,
            })
        };
        if !is_ccn(&self.center.ccn) {
            bad(
                "center.ccn".into(),
                "must be exactly five digits, e.g. \"12001\"".into(),
            );
        }
        if let Some(tz) = &self.defaults.timezone
            && tz.parse::<chrono_tz::Tz>().is_err()
        {
            bad(
                "defaults.timezone".into(),
                format!("unknown IANA time zone {tz:?}"),
            );
        }
        for (name, source) in &self.sources {
            if source.resolved_format().is_none() {
                bad(
                    format!("sources.{name}.format"),
                    format!(
                        "cannot tell the format of {}; set format = \"csv\", \"xlsx\", \"parquet\", …",
                        source.path.display()
                    ),
                );
            }
            if let Some(tz) = &source.timezone
                && tz.parse::<chrono_tz::Tz>().is_err()
            {
                bad(
                    format!("sources.{name}.timezone"),
                    format!("unknown IANA time zone {tz:?}"),
                );
            }
            if let Some(label) = &source.encoding
                && encoding_rs::Encoding::for_label(label.as_bytes()).is_none()
            {
                bad(
                    format!("sources.{name}.encoding"),
                    format!("unknown encoding label {label:?}"),
                );
            }
            if let Some(d) = &source.delimiter
                && parse_delimiter(d).is_none()
            {
                bad(
                    format!("sources.{name}.delimiter"),
                    format!("{d:?} is not one ASCII character (or \"tab\")"),
                );
            }
            if source.header_row == Some(0) {
                bad(
                    format!("sources.{name}.header_row"),
                    "rows are numbered from 1".into(),
                );
            }
            for (column, spec) in &source.columns {
                let temporal = matches!(spec.kind, ColumnType::Date | ColumnType::Datetime);
                if !temporal && !spec.formats.is_empty() {
                    bad(
                        format!("sources.{name}.columns.{column}.formats"),
                        format!(
                            "formats apply to date and datetime columns, not {}",
                            spec.kind
                        ),
                    );
                }
                if let Some(width) = spec.pad_zeros {
                    if spec.kind != ColumnType::String {
                        bad(
                            format!("sources.{name}.columns.{column}.pad_zeros"),
                            format!("pad_zeros applies to string columns, not {}", spec.kind),
                        );
                    } else if !(1..=40).contains(&width) {
                        bad(
                            format!("sources.{name}.columns.{column}.pad_zeros"),
                            format!("{width} is not a width from 1 to 40"),
                        );
                    }
                }
                if spec.decimal_comma && spec.kind != ColumnType::Decimal {
                    bad(
                        format!("sources.{name}.columns.{column}.decimal_comma"),
                        format!(
                            "decimal_comma applies to decimal columns, not {}",
                            spec.kind
                        ),
                    );
                }
            }
        }
        match self.target.kind {
            TargetKind::Custom | TargetKind::Fhir if self.target.base_url.is_none() => {
                bad(
                    "target.base_url".into(),
                    format!("required for target kind {:?}", self.target.kind),
                );
            }
            _ => {}
        }
        problems
    }
}

/// `true` for exactly five ASCII digits.
pub fn is_ccn(s: &str) -> bool {
    s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit())
}

/// A delimiter setting as a byte: one ASCII character, or the words `tab`/`\t`.
pub fn parse_delimiter(s: &str) -> Option<u8> {
    match s {
        "tab" | "\\t" | "\t" => Some(b'\t'),
        _ if s.len() == 1 && s.is_ascii() => s.bytes().next(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write test config");
        p
    }

    #[test]
    fn unknown_keys_name_the_key_and_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            "p.toml",
            "[center]\nccn = \"12001\"\n\n[sources.labs]\npath = \"labs.csv\"\ndelimeter = \";\"\n",
        );
        let errs = PipelineConfig::load(&p).expect_err("unknown key must fail");
        let text = errs[0].to_string();
        assert!(text.contains("p.toml:6:1"), "{text}");
        assert!(text.contains("delimeter"), "{text}");
    }

    #[test]
    fn all_value_problems_are_reported_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            "p.toml",
            "[center]\nccn = \"1200\"\n[defaults]\ntimezone = \"Mars/Olympus\"\n[sources.a]\npath = \"a.weird\"\nencoding = \"klingon\"\n",
        );
        let errs = PipelineConfig::load(&p).expect_err("bad values must fail");
        let keys: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert_eq!(errs.len(), 4, "{keys:#?}");
    }

    #[test]
    fn relative_paths_resolve_against_the_config_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            "p.toml",
            "mappings = [\"m/patient.toml\"]\n[center]\nccn = \"12001\"\n[sources.a]\npath = \"data/a.csv\"\n",
        );
        let c = PipelineConfig::load(&p).expect("valid config");
        assert_eq!(c.sources["a"].path, dir.path().join("data/a.csv"));
        assert_eq!(c.mappings[0], dir.path().join("m/patient.toml"));
        assert_eq!(c.state_dir(), dir.path().join(".fhirlift"));
        assert_eq!(c.target.kind, TargetKind::Sandbox);
    }

    #[test]
    fn delimiters() {
        assert_eq!(parse_delimiter(";"), Some(b';'));
        assert_eq!(parse_delimiter("tab"), Some(b'\t'));
        assert_eq!(parse_delimiter("ab"), None);
    }
}
