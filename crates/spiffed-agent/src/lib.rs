//! Agent.
#![forbid(unsafe_code)]
