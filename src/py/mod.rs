//! Python bindings: extract and check arguments, release the GIL, call a kernel,
//! build the result.
pub mod args;
pub mod arrays;
pub mod config;
pub mod functions;
pub mod step;
pub mod wire;
