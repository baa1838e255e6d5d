mod common;
mod loader;
mod mapping;
mod readers;
mod sandbox;
