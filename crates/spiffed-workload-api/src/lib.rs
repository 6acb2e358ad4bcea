//! WAPI.
#![forbid(unsafe_code)]
