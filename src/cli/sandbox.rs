//! `fhirlift sandbox`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {}

pub fn run(_args: SandboxArgs) -> CommandResult {
    Err("`fhirlift sandbox` is not available in this build yet".into())
}
