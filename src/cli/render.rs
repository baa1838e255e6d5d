//! `fhirlift render`.

use super::CommandResult;

#[derive(Debug, clap::Args)]
pub struct RenderArgs {}

pub fn run(_args: RenderArgs) -> CommandResult {
    Err("`fhirlift render` is not available in this build yet".into())
}
