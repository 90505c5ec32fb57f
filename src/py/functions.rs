//! `solve_alpha`, `mix`, `merge_topk` and `unlisted_bound`: the step's building blocks on their own.
use ndarray::Axis;
use numpy::{IntoPyArray, PyArray1};
use pyo3::prelude::*;
use pyo3::types::{PyFloat, PyTuple};

use crate::kernels::alpha::{AlphaParams, Solver};
use crate::kernels::batch::{
    merge_batch, mix_batch, solve_alpha_batch, solve_alpha_batch_counted, unlisted_bound_batch,
};
use crate::kernels::merge::Missing;
use crate::py::args;
use crate::py::arrays::{float_input, id_input, per_row_floats, same_shape, TopkInputs};
use crate::py::config::parse_missing;

#[pyfunction(name = "solve_alpha")]
#[pyo3(
    signature = (logp_theta, logp_t, *, method="kl_symmetry".to_owned(), alpha=0.5, alpha_min=0.0, alpha_max=1.0, tol=1e-10, max_iter=100),
    text_signature = "(logp_theta, logp_t, *, method='kl_symmetry', alpha=0.5, alpha_min=0.0, alpha_max=1.0, tol=1e-10, max_iter=100)"
)]
pub fn solve_alpha_py(
    py: Python<'_>,
    logp_theta: &Bound<'_, PyAny>,
    logp_t: &Bound<'_, PyAny>,
    #[pyo3(from_py_with = args::method)] method: String,
    #[pyo3(from_py_with = args::alpha)] alpha: f64,
    #[pyo3(from_py_with = args::alpha_min)] alpha_min: f64,
    #[pyo3(from_py_with = args::alpha_max)] alpha_max: f64,
    #[pyo3(from_py_with = args::tol)] tol: f64,
    #[pyo3(from_py_with = args::max_iter)] max_iter: i64,
) -> PyResult<Py<PyAny>> {
    let params = AlphaParams::new(&method, alpha, alpha_min, alpha_max, tol, max_iter)?;
    let (a_in, b_in) = (float_input(logp_theta, "logp_theta")?, float_input(logp_t, "logp_t")?);
    let (a, b) = (a_in.rows("logp_theta")?, b_in.rows("logp_t")?);
    same_shape(&a, &b, ("logp_theta", "logp_t"))?;
    let (va, vb) = (a.data.view(), b.data.view());
    let alphas = py.detach(|| solve_alpha_batch(va, vb, &params))?;
    if a.one_row {
        Ok(alphas[0].into_pyobject(py)?.into_any().unbind())
    } else {
        Ok(PyArray1::from_vec(py, alphas).into_any().unbind())
    }
}

/// `solve_alpha` by the named root solver, with each row's sweep count: for the benches
/// and tests that put the Halley solver beside plain bisection. Not public API.
#[pyfunction(name = "_solve_alpha_sweeps")]
#[pyo3(
    signature = (logp_theta, logp_t, *, solver, method="kl_symmetry".to_owned(), alpha=0.5, alpha_min=0.0, alpha_max=1.0, tol=1e-10, max_iter=100),
    text_signature = "(logp_theta, logp_t, *, solver, method='kl_symmetry', alpha=0.5, alpha_min=0.0, alpha_max=1.0, tol=1e-10, max_iter=100)"
)]
pub fn solve_alpha_sweeps_py<'py>(
    py: Python<'py>,
    logp_theta: &Bound<'py, PyAny>,
    logp_t: &Bound<'py, PyAny>,
    solver: &str,
    #[pyo3(from_py_with = args::method)] method: String,
    #[pyo3(from_py_with = args::alpha)] alpha: f64,
    #[pyo3(from_py_with = args::alpha_min)] alpha_min: f64,
    #[pyo3(from_py_with = args::alpha_max)] alpha_max: f64,
    #[pyo3(from_py_with = args::tol)] tol: f64,
    #[pyo3(from_py_with = args::max_iter)] max_iter: i64,
) -> PyResult<Bound<'py, PyTuple>> {
    let params = AlphaParams {
        solver: Solver::parse(solver)?,
        ..AlphaParams::new(&method, alpha, alpha_min, alpha_max, tol, max_iter)?
    };
    let (a_in, b_in) = (float_input(logp_theta, "logp_theta")?, float_input(logp_t, "logp_t")?);
    let (a, b) = (a_in.rows("logp_theta")?, b_in.rows("logp_t")?);
    same_shape(&a, &b, ("logp_theta", "logp_t"))?;
    let (va, vb) = (a.data.view(), b.data.view());
    let rows = py.detach(|| solve_alpha_batch_counted(va, vb, &params))?;
    let alphas: Vec<f64> = rows.iter().map(|&(x, _)| x).collect();
    let sweeps: Vec<i64> = rows.iter().map(|&(_, n)| i64::from(n)).collect();
    PyTuple::new(
        py,
        [
            PyArray1::from_vec(py, alphas).into_any(),
            PyArray1::from_vec(py, sweeps).into_any(),
        ],
    )
}

#[pyfunction(name = "mix")]
pub fn mix_py(
    py: Python<'_>,
    logp_theta: &Bound<'_, PyAny>,
    logp_t: &Bound<'_, PyAny>,
    alpha: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let (a_in, b_in) = (float_input(logp_theta, "logp_theta")?, float_input(logp_t, "logp_t")?);
    let (a, b) = (a_in.rows("logp_theta")?, b_in.rows("logp_t")?);
    same_shape(&a, &b, ("logp_theta", "logp_t"))?;
    let alphas = per_row_floats(alpha, "alpha", a.data.nrows())?;
    let (va, vb) = (a.data.view(), b.data.view());
    let q = py.detach(|| mix_batch(va, vb, &alphas))?;
    if a.one_row {
        Ok(q.index_axis_move(Axis(0), 0).into_pyarray(py).into_any().unbind())
    } else {
        Ok(q.into_pyarray(py).into_any().unbind())
    }
}

#[pyfunction(name = "merge_topk")]
#[pyo3(
    signature = (ids_theta, logp_theta, ids_t, logp_t, *, missing=None),
    text_signature = "(ids_theta, logp_theta, ids_t, logp_t, *, missing='bound')"
)]
pub fn merge_topk_py<'py>(
    py: Python<'py>,
    ids_theta: &Bound<'py, PyAny>,
    logp_theta: &Bound<'py, PyAny>,
    ids_t: &Bound<'py, PyAny>,
    logp_t: &Bound<'py, PyAny>,
    missing: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let missing = missing.map_or(Ok(Missing::Bound), parse_missing)?;
    let inputs = TopkInputs::extract(ids_theta, logp_theta, ids_t, logp_t)?;
    let (ia, la, ib, lb) = inputs.rows()?;
    let (via, vla, vib, vlb) = (ia.data.view(), la.data.view(), ib.data.view(), lb.data.view());
    let m = py.detach(|| merge_batch(via, vla, vib, vlb, missing))?;
    if ia.one_row {
        PyTuple::new(
            py,
            [
                m.ids.index_axis_move(Axis(0), 0).into_pyarray(py).into_any(),
                m.logp_theta.index_axis_move(Axis(0), 0).into_pyarray(py).into_any(),
                m.logp_t.index_axis_move(Axis(0), 0).into_pyarray(py).into_any(),
            ],
        )
    } else {
        PyTuple::new(
            py,
            [
                m.ids.into_pyarray(py).into_any(),
                m.logp_theta.into_pyarray(py).into_any(),
                m.logp_t.into_pyarray(py).into_any(),
            ],
        )
    }
}

#[pyfunction(name = "unlisted_bound")]
#[pyo3(signature = (ids, logp), text_signature = "(ids, logp)")]
pub fn unlisted_bound_py(py: Python<'_>, ids: &Bound<'_, PyAny>, logp: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    let (ids_in, lp_in) = (id_input(ids, "ids")?, float_input(logp, "logp")?);
    let (i, l) = (ids_in.rows("ids")?, lp_in.rows("logp")?);
    same_shape(&i, &l, ("ids", "logp"))?;
    let (vi, vl) = (i.data.view(), l.data.view());
    let values = py.detach(|| unlisted_bound_batch(vi, vl))?;
    if i.one_row {
        Ok(PyFloat::new(py, values[0]).into_any().unbind())
    } else {
        Ok(values.into_pyarray(py).into_any().unbind())
    }
}
