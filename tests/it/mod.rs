mod common;
mod ledger;
mod loader;
mod mapping;
mod readers;
mod sandbox;
