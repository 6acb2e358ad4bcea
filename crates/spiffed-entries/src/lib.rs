//! Entries.
#![forbid(unsafe_code)]
