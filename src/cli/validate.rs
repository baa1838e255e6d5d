//! `fhirlift validate`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct ValidateArgs {}

pub fn run(_args: ValidateArgs) -> CommandResult {
    Err("`fhirlift validate` is not available in this build yet".into())
}
