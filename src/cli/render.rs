//! `fhirlift render`: one row through one mapping, shown step by step for a template author —
//! the row's context, the template's raw output, the resources after clean-up, the CRID request
//! and the validation outcome. It prints the row's values to stdout by design (it is the
//! author's own terminal); nothing is logged.

use std::path::PathBuf;

use super::{CommandResult, Outcome};
use crate::mapping::{Mapped, json};
use crate::pipeline::{ConfigSources, SourceItem, Sources};

#[derive(Debug, clap::Args)]
pub struct RenderArgs {
    /// The pipeline config (TOML).
    pub config: PathBuf,
    /// The mapping's name (`name = …` in its file).
    #[arg(long, value_name = "NAME")]
    pub mapping: String,
    /// The row as the file numbers it: the spreadsheet row, or the CSV line (header included).
    #[arg(long, value_name = "N")]
    pub row: u64,
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

pub fn run(args: RenderArgs) -> CommandResult {
    let (config, set) = match super::run::load(&args.config) {
        Ok(x) => x,
        Err(outcome) => return Ok(outcome),
    };
    let Some(index) = set.index_of(&args.mapping) else {
        let names: Vec<&str> = set.mappings().iter().map(|m| m.name()).collect();
        return Err(format!(
            "no mapping {:?} (mappings: {})",
            args.mapping,
            names.join(", ")
        )
        .into());
    };
    let source = set.mappings()[index].spec.source.clone();
    let mut sources = ConfigSources { config: &config };
    let stream = sources.open(&source)?;
    let mut found = None;
    for item in stream {
        let item = item?;
        let row = match &item {
            SourceItem::Row(r) => r.location.row,
            SourceItem::Reject(r) => r.location.row,
        };
        if row == args.row {
            found = Some(item);
            break;
        }
        if row > args.row {
            break;
        }
    }
    let row = match found {
        None => {
            return Err(format!("source {source:?} has no data row {}", args.row).into());
        }
        Some(SourceItem::Reject(r)) => {
            println!("== Row {}", r.location);
            println!("rejected by the reader: {}", r.message);
            return Ok(Outcome::RowsRejected);
        }
        Some(SourceItem::Row(r)) => r,
    };
    println!("== Row {} (mapping {})", row.location, args.mapping);
    match set.context(index, &row) {
        Ok(ctx) => {
            let mut text = String::new();
            match json::write_json(&mut text, &ctx) {
                Ok(()) => match serde_json::from_str::<serde_json::Value>(&text) {
                    Ok(v) => println!("{}", pretty(&v)),
                    Err(_) => println!("{text}"),
                },
                Err(e) => println!("(context cannot be shown as JSON: {e})"),
            }
        }
        Err(e) => println!("(no context: {e})"),
    }
    for e in &row.errors {
        println!("cell error: {e}");
    }
    if let Ok(outputs) = set.render_debug(index, &row) {
        for (i, output) in outputs.iter().enumerate() {
            println!(
                "== Template output {} ({})",
                i + 1,
                set.mappings()[index].spec.template
            );
            if let Some(item) = &output.item {
                println!("item: {item}");
            }
            match &output.text {
                Ok(text) => println!("{}", text.trim_end()),
                Err(e) => println!("failed: {}", e.reason()),
            }
        }
    }
    match set.map_row(index, &row) {
        Ok(mapped) => {
            match &mapped.mapped {
                Mapped::Patient(p) => {
                    println!("== Resource: Patient");
                    println!("{}", pretty(&p.resource.body.value()));
                    if let Some(d) = &p.crid_demographics {
                        println!("== CRID request (personal data)");
                        let body = serde_json::json!({"ccn": config.center.ccn, "patient": d});
                        println!("{}", pretty(&body));
                    }
                }
                Mapped::Resources(rs) => {
                    for r in rs {
                        println!("== Resource: {} {}", r.resource_type, r.identifier.value);
                        println!("{}", pretty(&r.body.value()));
                    }
                    if rs.is_empty() {
                        println!("== No resource (no filled column)");
                    }
                }
            }
            println!("== Validation: passed");
            for (rt, w) in &mapped.warnings {
                println!("warning: {rt}: {w}");
            }
            Ok(Outcome::Success)
        }
        Err(e) => {
            println!("== Rejected");
            println!("{e}");
            Ok(Outcome::RowsRejected)
        }
    }
}
