//! The sandbox: a local server implementing the CIBMTR Direct FHIR contract, with real storage
//! and fault injection.
