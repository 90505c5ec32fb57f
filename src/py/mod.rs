//! Python bindings: extract and check arguments, release the GIL, call a kernel,
//! build the result. Compiled only with the `python` feature.
pub mod args;
pub mod arrays;
pub mod config;
pub mod errors;
pub mod functions;
pub mod mixture;
pub mod step;
pub mod wire;

/// The extension module, `dualsample_rs._core`.
#[pyo3::pymodule(gil_used = false)]
mod _core {
    use pyo3::prelude::*;

    #[pymodule_export]
    use crate::py::config::{with_alpha_solver_py, SamplerConfig};
    #[pymodule_export]
    use crate::py::functions::{merge_topk_py, mix_py, solve_alpha_py, solve_alpha_sweeps_py, unlisted_bound_py};
    #[pymodule_export]
    use crate::py::mixture::mix_teachers_py;
    #[pymodule_export]
    use crate::py::step::{step_py, StepResult};
    #[pymodule_export]
    use crate::py::wire::{
        parse_completions_topk, parse_generate_positions, parse_generate_topk, parse_sglang_positions,
        parse_sglang_topk,
    };

    #[pymodule_init]
    fn init(m: &Bound<'_, PyModule>) -> PyResult<()> {
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add(
            "build_profile",
            if cfg!(debug_assertions) { "debug" } else { "release" },
        )?;
        Ok(())
    }
}
