//! A collector for everything wrong with a pipeline, so that `validate` reports all problems at
//! once instead of stopping at the first.
//!
//! Each stage contributes its own checks (sources here and in [`crate::source::check_sources`],
//! mappings and templates in their stages); the collector only records and prints them. It must
//! not hold patient values: a problem names a file, a key, a column or a row, never a cell's value.

use std::fmt;

/// One thing wrong with the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// What the problem is about, as the user would look for it: `sources.labs`,
    /// `mappings/labs.toml`. Absent when the message names it already.
    pub scope: Option<String>,
    /// The whole message, including the error's source chain.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.scope {
            Some(scope) => write!(f, "{scope}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Problems found so far, in the order they were found.
#[derive(Clone, Debug, Default)]
pub struct Problems {
    list: Vec<Problem>,
}

impl Problems {
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Records a problem; the error is printed with its whole source chain.
    pub fn push(&mut self, scope: impl Into<String>, error: &(dyn std::error::Error + 'static)) {
        self.list.push(Problem {
            scope: Some(scope.into()),
            message: crate::cli::error_chain(error),
        });
    }

    /// Records an error that names its own place (a config error carries its file and line).
    pub fn push_error(&mut self, error: &(dyn std::error::Error + 'static)) {
        self.list.push(Problem {
            scope: None,
            message: crate::cli::error_chain(error),
        });
    }

    /// Records a problem given as plain text.
    pub fn push_message(&mut self, scope: impl Into<String>, message: impl Into<String>) {
        self.list.push(Problem {
            scope: Some(scope.into()),
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Problem> {
        self.list.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_keep_order_and_the_error_chain() {
        let mut p = Problems::new();
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        p.push("sources.labs", &io);
        p.push_message("mappings/labs.toml", "missing");
        let text: Vec<String> = p.iter().map(ToString::to_string).collect();
        assert_eq!(
            text,
            ["sources.labs: no such file", "mappings/labs.toml: missing"]
        );
    }
}
