mod common;
mod hardening;
mod ledger;
mod loader;
mod mapping;
mod readers;
mod sandbox;
