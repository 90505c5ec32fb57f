//! Reply parsers for the three wire dialects (see `crate::wire`), GIL released.
use numpy::ndarray::Array2;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyBytesMethods, PyTuple};

use crate::errors::KernelError;
use crate::wire::{completions, generate, sglang};

fn arrays(py: Python<'_>, (ids, logp): (Array2<i64>, Array2<f64>)) -> PyResult<Bound<'_, PyTuple>> {
    PyTuple::new(py, [ids.into_pyarray(py).into_any(), logp.into_pyarray(py).into_any()])
}

/// `(ids, logp)` of shape (rows, width) from a batched vLLM completions reply.
#[pyfunction]
pub fn parse_completions_topk<'py>(
    py: Python<'py>,
    body: &[u8],
    rows: usize,
    width: usize,
) -> PyResult<Bound<'py, PyTuple>> {
    let parsed = py.detach(|| completions::parse_topk(body, rows, width))?;
    arrays(py, parsed)
}

/// `(ids, logp)` of shape (len(bodies), width) from one vLLM generate reply per row.
#[pyfunction]
pub fn parse_generate_topk<'py>(
    py: Python<'py>,
    bodies: Vec<Bound<'py, PyBytes>>,
    width: usize,
) -> PyResult<Bound<'py, PyTuple>> {
    let slices: Vec<&[u8]> = bodies.iter().map(PyBytesMethods::as_bytes).collect();
    let parsed = generate::parse_topk(&slices, width)?;
    arrays(py, parsed)
}

/// `(ids, logp)` of shape (rows, width) from a batched SGLang `/generate` reply;
/// `field` is `"top"` (`output_top_logprobs`) or `"token_ids"` (`output_token_ids_logprobs`).
#[pyfunction]
pub fn parse_sglang_topk<'py>(
    py: Python<'py>,
    body: &[u8],
    rows: usize,
    width: usize,
    field: &str,
) -> PyResult<Bound<'py, PyTuple>> {
    let field = match field {
        "top" => sglang::Field::Top,
        "token_ids" => sglang::Field::TokenIds,
        _ => return Err(KernelError::arg("field", format!("expected \"top\" or \"token_ids\", got {field:?}")).into()),
    };
    let parsed = py.detach(|| sglang::parse_topk(body, rows, width, field))?;
    arrays(py, parsed)
}
