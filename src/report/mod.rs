//! Run reports: per-row outcomes, rejects, unmapped codes, and the run summary.
