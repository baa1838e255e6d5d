//! The state ledger: what was submitted where, for incremental, resumable runs.
