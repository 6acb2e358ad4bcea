//! A stand-in `std` with only what the check needs: the prelude's `compile_error!` (the
//! compiler's own built-in, declared as core declares it). See check.sh beside it.
#![feature(no_core, rustc_attrs)]
#![no_core]
#[rustc_builtin_macro]
#[macro_export]
macro_rules! compile_error { ($msg:expr $(,)?) => {{ }}; }
pub mod prelude {
    pub mod rust_2024 {
        pub use crate::compile_error;
    }
}
