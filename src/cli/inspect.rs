//! `fhirlift inspect`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {}

pub fn run(_args: InspectArgs) -> CommandResult {
    Err("`fhirlift inspect` is not available in this build yet".into())
}
