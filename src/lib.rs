//! fhirlift: registry files in, CIBMTR FHIR submissions out.
//!
//! The modules follow the pipeline: [`source`] reads typed rows, [`mapping`] renders them into FHIR
//! resources, [`validate`] checks each resource, [`sink`] writes files or hands resources to the
//! loader, which talks to a target such as the embedded [`sandbox`]. The [`ledger`] remembers what
//! was sent; [`report`] says what happened.
#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod ledger;
pub mod logging;
pub mod mapping;
pub mod pipeline;
pub mod report;
pub mod resource;
pub mod sandbox;
pub mod sink;
pub mod source;
pub mod validate;
