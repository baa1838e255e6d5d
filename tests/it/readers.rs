//! Integration tests: readers.
