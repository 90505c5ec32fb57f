//! dualsample_rs: sampling from the geometric mixture of a base and a teacher model.
//!
//! The kernels (`kernels`), the wire readers (`wire`) and their errors (`errors`) are plain
//! Rust; the Python extension (`py`, with the `_core` module) is built only with the
//! default `python` feature, so `cargo test --no-default-features` needs no libpython.
pub mod errors;
pub mod kernels;
#[cfg(feature = "python")]
mod py;
pub mod wire;
