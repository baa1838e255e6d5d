//! The integration tests, one binary. Each module covers one stage or one user-visible flow.

mod it;
