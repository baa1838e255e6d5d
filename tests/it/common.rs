//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `Command` for the built `fhirlift` binary.
pub fn fhirlift() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_fhirlift"))
}
