//! `fhirlift check`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {}

pub fn run(_args: CheckArgs) -> CommandResult {
    Err("`fhirlift check` is not available in this build yet".into())
}
