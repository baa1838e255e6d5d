//! `fhirlift status`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct StatusArgs {}

pub fn run(_args: StatusArgs) -> CommandResult {
    Err("`fhirlift status` is not available in this build yet".into())
}
