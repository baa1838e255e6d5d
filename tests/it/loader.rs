//! Integration tests: loader.
