//! Reply parsers for the three wire dialects (see `crate::wire`), GIL released.
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyBytesMethods, PyTuple};

use crate::errors::KernelError;
use crate::wire::positions::{self, Positions};
use crate::wire::{completions, generate, sglang, Echo, Parsed};

/// What the reply must echo (see `wire::Echo`), from the optional keyword arguments.
fn echo(request_id: Option<String>, prompt_tokens: Option<Vec<u64>>) -> Echo {
    Echo {
        request_id,
        prompt_tokens,
    }
}

/// `(ids, logp, cached_tokens or None)`.
fn arrays(py: Python<'_>, parsed: Parsed) -> PyResult<Bound<'_, PyTuple>> {
    let cached = parsed.cached_tokens.into_pyobject(py)?.into_any();
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
#[pyo3(signature = (body, rows, width, request_id=None, prompt_tokens=None))]
pub fn parse_completions_topk<'py>(
    py: Python<'py>,
    body: &[u8],
    rows: usize,
    width: usize,
    request_id: Option<String>,
    prompt_tokens: Option<Vec<u64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let echo = echo(request_id, prompt_tokens);
    let parsed = py.detach(|| completions::parse_topk(body, rows, width, &echo))?;
    arrays(py, parsed)
}

/// `(ids, logp)` of shape (len(bodies), width) from one vLLM generate reply per row.
#[pyfunction]
#[pyo3(signature = (bodies, width, request_id=None, prompt_tokens=None))]
pub fn parse_generate_topk<'py>(
    py: Python<'py>,
    bodies: Vec<Bound<'py, PyBytes>>,
    width: usize,
    request_id: Option<String>,
    prompt_tokens: Option<Vec<u64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let slices: Vec<&[u8]> = bodies.iter().map(PyBytesMethods::as_bytes).collect();
    let parsed = generate::parse_topk(&slices, width, &echo(request_id, prompt_tokens))?;
    arrays(py, parsed)
}

/// `"top"` (the top-k lists) or `"token_ids"` (the given ids' lists).
fn sglang_field(field: &str) -> PyResult<sglang::Field> {
    match field {
        "top" => Ok(sglang::Field::Top),
        "token_ids" => Ok(sglang::Field::TokenIds),
        _ => Err(KernelError::arg("field", format!("expected \"top\" or \"token_ids\", got {field:?}")).into()),
    }
}

/// `(ids, logp)` of shape (rows, width) from a batched SGLang `/generate` reply;
/// `field` is `"top"` (`output_top_logprobs`) or `"token_ids"` (`output_token_ids_logprobs`).
#[pyfunction]
#[pyo3(signature = (body, rows, width, field, request_id=None, prompt_tokens=None))]
pub fn parse_sglang_topk<'py>(
    py: Python<'py>,
    body: &[u8],
    rows: usize,
    width: usize,
    field: &str,
    request_id: Option<String>,
    prompt_tokens: Option<Vec<u64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let field = sglang_field(field)?;
    let echo = echo(request_id, prompt_tokens);
    let parsed = py.detach(|| sglang::parse_topk(body, rows, width, field, &echo))?;
    arrays(py, parsed)
}

/// `(tokens, ids, logp, lengths, cached_tokens or None)`: one row per position.
fn position_arrays(py: Python<'_>, p: Positions) -> PyResult<Bound<'_, PyTuple>> {
    let cached = p.cached_tokens.into_pyobject(py)?.into_any();
    PyTuple::new(
        py,
        [
            p.tokens.into_pyarray(py).into_any(),
            p.ids.into_pyarray(py).into_any(),
            p.logp.into_pyarray(py).into_any(),
            p.lengths.into_pyarray(py).into_any(),
            cached,
        ],
    )
}

/// Every generated position of one vLLM generate reply per sequence (see
/// `wire::generate::parse_positions`).
#[pyfunction]
#[pyo3(signature = (bodies, width, top_k=None, request_id=None, prompt_tokens=None, lengths=None, tokens=None))]
#[allow(clippy::too_many_arguments)]
pub fn parse_generate_positions<'py>(
    py: Python<'py>,
    bodies: Vec<Bound<'py, PyBytes>>,
    width: usize,
    top_k: Option<usize>,
    request_id: Option<String>,
    prompt_tokens: Option<Vec<u64>>,
    lengths: Option<Vec<i64>>,
    tokens: Option<Vec<i64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let slices: Vec<&[u8]> = bodies.iter().map(PyBytesMethods::as_bytes).collect();
    let parsed = generate::parse_positions(&slices, width, top_k, &echo(request_id, prompt_tokens))?;
    parsed.expect(lengths.as_deref(), tokens.as_deref())?;
    position_arrays(py, parsed)
}

/// Every position of each item of a batched SGLang reply: a draft, or (`scored`) the
/// scoring of given continuations (see `wire::positions::parse_sglang`).
#[pyfunction]
#[pyo3(signature = (body, rows, width, field, scored, request_id=None, prompt_tokens=None, lengths=None))]
#[allow(clippy::too_many_arguments)]
pub fn parse_sglang_positions<'py>(
    py: Python<'py>,
    body: &[u8],
    rows: usize,
    width: usize,
    field: &str,
    scored: bool,
    request_id: Option<String>,
    prompt_tokens: Option<Vec<u64>>,
    lengths: Option<Vec<i64>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let field = sglang_field(field)?;
    let echo = echo(request_id, prompt_tokens);
    let parsed = py.detach(|| positions::parse_sglang(body, rows, width, field, scored, &echo))?;
    parsed.expect(lengths.as_deref(), None)?;
    position_arrays(py, parsed)
}
