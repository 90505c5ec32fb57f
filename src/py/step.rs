//! `step`: the fused sampling step over a batch, and its `StepResult`.
use ndarray::Array2;
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;

use crate::errors::KernelError;
use crate::kernels::step::{step_batch_with, Alternative, Batch, RowOutput, Sampling, StepConfig, StepOutput};
use crate::py::arrays::{
    optional_per_row_floats, optional_per_row_ints, per_row_counts, per_row_drafts, per_row_flags, per_row_keys,
    TopkInputs,
};
use crate::py::config::SamplerConfig;

/// One entry per row; diagnostics are None unless the config asked for them.
#[pyclass(frozen, module = "dualsample_rs", name = "StepResult")]
pub struct StepResult {
    #[pyo3(get)]
    token_id: Py<PyAny>,
    #[pyo3(get)]
    alpha: Py<PyAny>,
    #[pyo3(get)]
    logq: Py<PyAny>,
    #[pyo3(get)]
    logp_theta: Py<PyAny>,
    #[pyo3(get)]
    logp_t: Py<PyAny>,
    #[pyo3(get)]
    observed_theta: Py<PyAny>,
    #[pyo3(get)]
    observed_t: Py<PyAny>,
    #[pyo3(get)]
    fallback: Py<PyAny>,
    #[pyo3(get)]
    accepted: Py<PyAny>,
    #[pyo3(get)]
    no_overlap: Py<PyAny>,
    #[pyo3(get)]
    n_candidates: Py<PyAny>,
    #[pyo3(get)]
    n_merged: Py<PyAny>,
    #[pyo3(get)]
    kl_theta: Option<Py<PyAny>>,
    #[pyo3(get)]
    kl_t: Option<Py<PyAny>>,
    #[pyo3(get)]
    ess_theta: Option<Py<PyAny>>,
    #[pyo3(get)]
    ess_t: Option<Py<PyAny>>,
    #[pyo3(get)]
    entropy: Option<Py<PyAny>>,
    #[pyo3(get)]
    js: Option<Py<PyAny>>,
    #[pyo3(get)]
    top_ids: Option<Py<PyAny>>,
    #[pyo3(get)]
    top_logq: Option<Py<PyAny>>,
}

fn config_arg<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<PyRef<'py, SamplerConfig>>> {
    if obj.is_none() {
        return Ok(None);
    }
    obj.extract::<PyRef<'py, SamplerConfig>>().map(Some).map_err(|_| {
        KernelError::Dtype {
            arg: "config",
            msg: "expected a SamplerConfig or None".to_owned(),
        }
        .into()
    })
}

fn column<T: numpy::Element>(py: Python<'_>, rows: &[RowOutput], f: impl Fn(&RowOutput) -> T) -> Py<PyAny> {
    PyArray1::from_vec(py, rows.iter().map(f).collect()).into_any().unbind()
}

/// One field of the alternatives as a (rows, n) array.
fn alternatives_column<T: numpy::Element>(
    py: Python<'_>,
    out: &StepOutput,
    n: usize,
    f: impl Fn(&Alternative) -> T,
) -> PyResult<Py<PyAny>> {
    let values = Array2::from_shape_vec((out.rows.len(), n), out.alternatives.iter().map(f).collect())
        .map_err(|e| KernelError::arg("alternatives", e.to_string()))?;
    Ok(values.into_pyarray(py).into_any().unbind())
}

impl StepResult {
    fn new(py: Python<'_>, out: &StepOutput, diagnostics: bool, alternatives: usize) -> PyResult<Self> {
        let rows = &out.rows;
        let diag = |f: fn(&RowOutput) -> f64| diagnostics.then(|| column(py, rows, f));
        let (top_ids, top_logq) = if alternatives > 0 {
            (
                Some(alternatives_column(py, out, alternatives, |a| a.id)?),
                Some(alternatives_column(py, out, alternatives, |a| a.logq)?),
            )
        } else {
            (None, None)
        };
        Ok(StepResult {
            token_id: column(py, rows, |r| r.token_id),
            alpha: column(py, rows, |r| r.alpha),
            logq: column(py, rows, |r| r.logq),
            logp_theta: column(py, rows, |r| r.logp_theta),
            logp_t: column(py, rows, |r| r.logp_t),
            observed_theta: column(py, rows, |r| r.observed_theta),
            observed_t: column(py, rows, |r| r.observed_t),
            fallback: column(py, rows, |r| r.fallback),
            accepted: column(py, rows, |r| r.accepted),
            no_overlap: column(py, rows, |r| r.no_overlap),
            n_candidates: column(py, rows, |r| r.n_candidates),
            n_merged: column(py, rows, |r| r.n_merged),
            kl_theta: diag(|r| r.diagnostics.kl_theta),
            kl_t: diag(|r| r.diagnostics.kl_t),
            ess_theta: diag(|r| r.diagnostics.ess_theta),
            ess_t: diag(|r| r.diagnostics.ess_t),
            entropy: diag(|r| r.diagnostics.entropy),
            js: diag(|r| r.diagnostics.js),
            top_ids,
            top_logq,
        })
    }
}

#[pymethods]
impl StepResult {
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        self.token_id.bind(py).len()
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!(
            "StepResult(token_id={}, alpha={})",
            self.token_id.bind(py).repr()?,
            self.alpha.bind(py).repr()?
        ))
    }
}

fn seed_bits(seed: &Bound<'_, PyAny>) -> PyResult<u64> {
    if let Ok(v) = seed.extract::<u64>() {
        return Ok(v);
    }
    seed.extract::<i64>()
        .map(|v| v as u64)
        .map_err(|_| KernelError::arg("seed", "must be an integer in [-2**63, 2**64)").into())
}

#[pyfunction(name = "step")]
#[pyo3(
    signature = (ids_theta, logp_theta, ids_t, logp_t, *, config=None, seed=None, positions=None, row_keys=None, force_teacher=None, drafts=None, q_top_k=None, q_top_p=None, q_min_p=None, alternatives=0),
    text_signature = "(ids_theta, logp_theta, ids_t, logp_t, *, config=None, seed=0, positions=None, row_keys=None, force_teacher=None, drafts=None, q_top_k=None, q_top_p=None, q_min_p=None, alternatives=0)"
)]
pub fn step_py(
    py: Python<'_>,
    ids_theta: &Bound<'_, PyAny>,
    logp_theta: &Bound<'_, PyAny>,
    ids_t: &Bound<'_, PyAny>,
    logp_t: &Bound<'_, PyAny>,
    #[pyo3(from_py_with = config_arg)] config: Option<PyRef<'_, SamplerConfig>>,
    seed: Option<&Bound<'_, PyAny>>,
    positions: Option<&Bound<'_, PyAny>>,
    row_keys: Option<&Bound<'_, PyAny>>,
    force_teacher: Option<&Bound<'_, PyAny>>,
    drafts: Option<&Bound<'_, PyAny>>,
    q_top_k: Option<&Bound<'_, PyAny>>,
    q_top_p: Option<&Bound<'_, PyAny>>,
    q_min_p: Option<&Bound<'_, PyAny>>,
    alternatives: i64,
) -> PyResult<StepResult> {
    let inputs = TopkInputs::extract(ids_theta, logp_theta, ids_t, logp_t)?;
    let (ids_a, lp_a, ids_b, lp_b) = inputs.rows()?;
    let rows = ids_a.data.nrows();
    let default_cfg;
    let cfg: &StepConfig = if let Some(c) = &config {
        &c.inner
    } else {
        default_cfg = StepConfig::default();
        &default_cfg
    };
    let seed = seed.map_or(Ok(0), seed_bits)?;
    let row_keys = per_row_keys(row_keys, "row_keys", rows, |r| r as u64)?;
    let positions = per_row_counts(positions, "positions", rows)?;
    let force_teacher = per_row_flags(force_teacher, "force_teacher", rows)?;
    let drafts = per_row_drafts(drafts, rows)?;
    let top_k = optional_per_row_ints(q_top_k, "q_top_k", rows)?;
    let top_p = optional_per_row_floats(q_top_p, "q_top_p", rows)?;
    let min_p = optional_per_row_floats(q_min_p, "q_min_p", rows)?;
    let sampling = Sampling {
        top_k: &top_k,
        top_p: &top_p,
        min_p: &min_p,
        alternatives: usize::try_from(alternatives)
            .map_err(|_| KernelError::arg("alternatives", format!("must be >= 0, got {alternatives}")))?,
    };
    let batch = Batch {
        ids_theta: ids_a.data.view(),
        logp_theta: lp_a.data.view(),
        ids_t: ids_b.data.view(),
        logp_t: lp_b.data.view(),
        row_keys: &row_keys,
        positions: &positions,
        force_teacher: &force_teacher,
        drafts: &drafts,
        seed,
    };
    let out = py.detach(|| step_batch_with(&batch, cfg, &sampling))?;
    StepResult::new(py, &out, cfg.diagnostics, sampling.alternatives)
}
