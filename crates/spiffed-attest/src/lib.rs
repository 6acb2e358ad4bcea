//! Attestation.
#![deny(unsafe_code)]
