//! The mapping stage's errors: [`MappingError`] stops the run before any row (a bad mapping file,
//! template or lookup table); [`RowError`] rejects one row and says where and why.
//!
//! No error here may carry a patient value. Codes that failed a lookup are shown (they are local
//! codes, and the report's unmapped-codes section lists them by design); names, dates and free
//! text never are.

use std::fmt;
use std::path::PathBuf;

use crate::source::{CellError, RowLocation};
use crate::validate::Issue;

/// A problem with the mapping files, templates or lookup tables: nothing has been read yet.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error("{}: cannot read: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(Box<crate::config::ConfigError>),
    #[error("{}: {key}: {message}", .path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{}{}: {message}", .path.display(), .line.map(|l| format!(":{l}")).unwrap_or_default())]
    Lookup {
        path: PathBuf,
        line: Option<u64>,
        message: String,
    },
    #[error("{}: {failure}", .path.display())]
    Template {
        path: PathBuf,
        failure: TemplateFailure,
    },
}

/// A template error as a template author needs it: the template's name, the line, and the source
/// with a caret under the failing expression. Built from minijinja's error by hand rather than
/// with its `{:#}` view, because that view also dumps the referenced variables, which hold patient
/// values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateFailure {
    pub template: Option<String>,
    pub line: Option<usize>,
    /// What went wrong (minijinja's kind and detail, or our filter's message).
    pub message: String,
    /// A few source lines with a caret line under the failing span; empty when unknown.
    pub snippet: String,
}

impl TemplateFailure {
    pub fn from_minijinja(err: &minijinja::Error) -> TemplateFailure {
        let message = match err.detail() {
            Some(d) => format!("{}: {d}", err.kind()),
            None => err.kind().to_string(),
        };
        TemplateFailure {
            template: err.name().map(str::to_string),
            line: err.line(),
            message,
            snippet: snippet(err),
        }
    }
}

impl fmt::Display for TemplateFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        match (&self.template, self.line) {
            (Some(t), Some(l)) => write!(f, " (in {t}:{l})")?,
            (Some(t), None) => write!(f, " (in {t})")?,
            _ => {}
        }
        if !self.snippet.is_empty() {
            write!(f, "\n{}", self.snippet.trim_end())?;
        }
        Ok(())
    }
}

/// Up to two lines before the failing line, the line itself, and a caret line under the span.
fn snippet(err: &minijinja::Error) -> String {
    let (Some(source), Some(line)) = (err.template_source(), err.line()) else {
        return String::new();
    };
    let lines: Vec<&str> = source.lines().collect();
    if line == 0 || line > lines.len() {
        return String::new();
    }
    let width = line.to_string().len();
    let mut out = String::new();
    let first = line.saturating_sub(2).max(1);
    for n in first..=line {
        out.push_str(&format!("{n:>width$} | {}\n", lines[n - 1]));
    }
    // The span is in bytes of the whole source; turn it into columns of the failing line.
    if let Some(range) = err.range() {
        let line_start: usize = lines[..line - 1].iter().map(|l| l.len() + 1).sum();
        if range.start >= line_start {
            let text = lines[line - 1];
            let start = (range.start - line_start).min(text.len());
            let end =
                (range.end.saturating_sub(line_start)).clamp(start + 1, text.len().max(start + 1));
            let pad = text.get(..start).map_or(start, |s| s.chars().count());
            let len = text
                .get(start..end.min(text.len()))
                .map_or(1, |s| s.chars().count().max(1));
            out.push_str(&format!(
                "{:>width$} | {}{}\n",
                "",
                " ".repeat(pad),
                "^".repeat(len)
            ));
        }
    }
    out
}

/// Why one row was rejected. Every variant knows its row; [`RowError::column`] names the column
/// when one is to blame.
#[derive(Clone, Debug, PartialEq)]
pub enum RowError {
    /// Cells that could not be read as their declared type (from the readers).
    Cells(Vec<CellError>),
    /// A row-level read error (from the readers): the row could not be split into cells.
    Read {
        location: RowLocation,
        message: String,
    },
    /// A key column is empty.
    EmptyKey {
        location: RowLocation,
        column: String,
        key: &'static str,
    },
    /// A code with no entry in a lookup table.
    Unmapped {
        location: RowLocation,
        column: Option<String>,
        table: String,
        code: String,
    },
    /// `required` failed.
    Required {
        location: RowLocation,
        column: String,
    },
    /// A result in another unit than its code is measured in (`quantity(…, expected=…)`).
    Unit {
        location: RowLocation,
        column: Option<String>,
        unit: String,
        expected: String,
    },
    /// Any other template failure; `column` is the wide column being rendered, if any.
    Template {
        location: RowLocation,
        mapping: String,
        column: Option<String>,
        failure: Box<TemplateFailure>,
    },
    /// The template's output is not JSON.
    Json {
        location: RowLocation,
        template: String,
        message: String,
    },
    /// The rendered resource failed validation (errors only).
    Invalid {
        location: RowLocation,
        resource_type: String,
        issues: Vec<Issue>,
    },
    /// The row's patient key names no patient mapped in this run.
    UnknownPatient {
        location: RowLocation,
        column: String,
        key: String,
        /// A mapped patient's key that differs only in leading zeros, case or spaces.
        similar: Option<String>,
        /// Where the patient's own row was rejected, when it was.
        rejected_at: Option<Box<RowLocation>>,
    },
    /// A second row with the same patient key.
    DuplicatePatient {
        location: RowLocation,
        column: String,
        key: String,
        first: Box<RowLocation>,
    },
    /// The sink refused the resource (e.g. the target's OperationOutcome).
    Sink {
        location: RowLocation,
        resource_type: String,
        message: String,
    },
}

impl RowError {
    /// Blames `column` (a wide column being rendered) when the error names no column yet.
    pub fn in_column(mut self, wide: &str) -> RowError {
        match &mut self {
            RowError::Unit { column, .. }
            | RowError::Template { column, .. }
            | RowError::Unmapped { column, .. }
                if column.is_none() =>
            {
                *column = Some(wide.to_string());
            }
            _ => {}
        }
        self
    }

    /// The row this error is about.
    pub fn location(&self) -> RowLocation {
        match self {
            RowError::Cells(cells) => cells
                .first()
                .map(|c| c.location.row.clone())
                .unwrap_or_else(|| RowLocation {
                    file: "".into(),
                    sheet: None,
                    row: 0,
                }),
            RowError::Read { location, .. }
            | RowError::EmptyKey { location, .. }
            | RowError::Unmapped { location, .. }
            | RowError::Required { location, .. }
            | RowError::Unit { location, .. }
            | RowError::Template { location, .. }
            | RowError::Json { location, .. }
            | RowError::Invalid { location, .. }
            | RowError::UnknownPatient { location, .. }
            | RowError::DuplicatePatient { location, .. }
            | RowError::Sink { location, .. } => location.clone(),
        }
    }

    /// The column to blame, when there is one.
    pub fn column(&self) -> Option<&str> {
        match self {
            RowError::Cells(cells) => cells.first().map(|c| &*c.location.column),
            RowError::EmptyKey { column, .. }
            | RowError::Required { column, .. }
            | RowError::UnknownPatient { column, .. }
            | RowError::DuplicatePatient { column, .. } => Some(column),
            RowError::Unmapped { column, .. }
            | RowError::Unit { column, .. }
            | RowError::Template { column, .. } => column.as_deref(),
            _ => None,
        }
    }

    /// A short, stable name of the kind of error (the report groups by it).
    pub fn kind(&self) -> &'static str {
        match self {
            RowError::Cells(_) => "cell",
            RowError::Read { .. } => "read",
            RowError::EmptyKey { .. } => "empty_key",
            RowError::Unmapped { .. } => "unmapped_code",
            RowError::Required { .. } => "required",
            RowError::Unit { .. } => "unit",
            RowError::Template { .. } => "template",
            RowError::Json { .. } => "json",
            RowError::Invalid { .. } => "invalid_resource",
            RowError::UnknownPatient {
                rejected_at: None, ..
            } => "unknown_patient",
            RowError::UnknownPatient { .. } => "patient_rejected",
            RowError::DuplicatePatient { .. } => "duplicate_patient",
            RowError::Sink { .. } => "sink",
        }
    }

    /// The message without the row location (the rejects file has the location in its own
    /// column); the column, when known, leads.
    pub fn reason(&self) -> String {
        let col = |c: &str| format!("{c}: ");
        match self {
            RowError::Cells(cells) => cells
                .iter()
                .map(|c| format!("{}{}", col(&c.location.column), c.reason))
                .collect::<Vec<_>>()
                .join("; "),
            RowError::Read { message, .. } => message.clone(),
            RowError::EmptyKey { column, key, .. } => {
                format!("{}the {key} is empty", col(column))
            }
            RowError::Unmapped {
                column,
                table,
                code,
                ..
            } => format!(
                "{}no entry for code {code:?} in lookup table {table}",
                column.as_deref().map(col).unwrap_or_default()
            ),
            RowError::Required { column, .. } => {
                format!("{}a required value is empty", col(column))
            }
            RowError::Unit {
                column,
                unit,
                expected,
                ..
            } => format!(
                "{}unit {unit:?} is not {expected:?}, the unit the lookup table gives for this \
                 test's code: results in other units need a code of their own (with the LOINC \
                 code for those units)",
                column.as_deref().map(col).unwrap_or_default()
            ),
            RowError::Template {
                mapping,
                column,
                failure,
                ..
            } => format!(
                "{}mapping {mapping}: {failure}",
                column.as_deref().map(col).unwrap_or_default()
            ),
            RowError::Json {
                template, message, ..
            } => format!("template {template} rendered invalid JSON: {message}"),
            RowError::Invalid {
                resource_type,
                issues,
                ..
            } => {
                let errors: Vec<String> = crate::validate::errors(issues)
                    .map(|i| i.to_string())
                    .collect();
                format!("invalid {resource_type}: {}", errors.join("; "))
            }
            RowError::UnknownPatient {
                column,
                key,
                similar,
                rejected_at: None,
                ..
            } => format!(
                "{}patient {key:?} is not among the patients mapped in this run{}",
                col(column),
                similar
                    .as_deref()
                    .map(|s| format!(
                        "; patient {s:?} is: are leading zeros lost in one of the files? \
                         (`pad_zeros = N` on a key column restores them)"
                    ))
                    .unwrap_or_default()
            ),
            RowError::UnknownPatient {
                column,
                key,
                rejected_at: Some(at),
                ..
            } => format!(
                "{}patient {key:?} was rejected at {at}, so its resources cannot be sent",
                col(column)
            ),
            RowError::DuplicatePatient {
                column, key, first, ..
            } => format!(
                "{}patient {key:?} was already mapped from {first}",
                col(column)
            ),
            RowError::Sink {
                resource_type,
                message,
                ..
            } => format!("{resource_type} refused: {message}"),
        }
    }
}

impl fmt::Display for RowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Cell errors print their own full locations.
            RowError::Cells(cells) => {
                let parts: Vec<String> = cells.iter().map(|c| c.to_string()).collect();
                f.write_str(&parts.join("; "))
            }
            _ => write!(f, "{}: {}", self.location(), self.reason()),
        }
    }
}

impl std::error::Error for RowError {}
