//! Authority.
#![forbid(unsafe_code)]
