//! Pure Rust kernels: no Python types here, so `cargo test` exercises them directly.
pub mod alpha;
pub mod batch;
pub mod fastexp;
pub mod logspace;
pub mod merge;
pub mod mixture;
pub mod parallel;
pub mod rng;
pub mod simd;
pub mod step;
