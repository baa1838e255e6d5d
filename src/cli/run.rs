//! `fhirlift run`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct RunArgs {}

pub fn run(_args: RunArgs) -> CommandResult {
    Err("`fhirlift run` is not available in this build yet".into())
}
