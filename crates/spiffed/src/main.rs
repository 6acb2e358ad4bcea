//! spiffed
fn main() {}
