//! Reply parsers for the three wire dialects (see `crate::wire`), GIL released.
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyBytesMethods, PyTuple};

use crate::errors::KernelError;
use crate::wire::{completions, generate, sglang, Parsed};

/// `(ids, logp, cached_tokens or None)`.
fn arrays(py: Python<'_>, parsed: Parsed) -> PyResult<Bound<'_, PyTuple>> {
    let cached = match parsed.cached_tokens {
        Some(c) => c.into_pyobject(py)?.into_any(),
        None => py.None().into_bound(py),
    };
    PyTuple::new(
        py,
        [
            parsed.ids.into_pyarray(py).into_any(),
            parsed.logp.into_pyarray(py).into_any(),
            cached,
        ],
    )
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
