//! Logging setup: `tracing` to stderr or a file. Nothing logged above TRACE may carry patient
//! values or secrets; locations (file, row, column, record key) are fine.

use std::path::Path;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `verbose` counts `-v` flags; `RUST_LOG` overrides.
pub fn init(verbose: u8, log_file: Option<&Path>) -> std::io::Result<()> {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true);
    match log_file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init()
                .ok();
        }
        None => {
            // Colours only for a person at a terminal: a scheduler's log file gets plain text.
            use std::io::IsTerminal;
            builder
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .try_init()
                .ok();
        }
    }
    Ok(())
}
