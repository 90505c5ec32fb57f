//! `mix_teachers`: several teachers' top-k lists as one mixed teacher for `step`.
use ndarray::Axis;
use numpy::IntoPyArray;
use pyo3::prelude::*;
use pyo3::types::{PyString, PyTuple};

use crate::errors::KernelError;
use crate::kernels::merge::Missing;
use crate::kernels::mixture::{mix_teachers_batch, MixWeights};
use crate::py::arrays::{float_input, id_input, FloatInput, IdInput, Rows};
use crate::py::config::parse_missing;

/// The items of a list argument (a string is not a list of arrays).
fn items<'py>(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    let refused = || KernelError::Dtype {
        arg,
        msg: "expected a sequence with one array per teacher".to_owned(),
    };
    if obj.is_instance_of::<PyString>() {
        return Err(refused().into());
    }
    obj.try_iter().map_err(|_| refused())?.collect()
}

/// The shape the caller passed (a 1-D row is held as one row of a batch).
fn shape<T>(rows: &Rows<'_, T>) -> Vec<usize> {
    let (r, k) = rows.data.dim();
    if rows.one_row {
        vec![k]
    } else {
        vec![r, k]
    }
}

fn weights_arg(obj: &Bound<'_, PyAny>) -> PyResult<Vec<f64>> {
    let refused = || KernelError::Dtype {
        arg: "weights",
        msg: "expected a sequence of numbers, one per teacher".to_owned(),
    };
    if obj.is_instance_of::<PyString>() {
        return Err(refused().into());
    }
    obj.try_iter()
        .map_err(|_| refused())?
        .map(|w| w.and_then(|w| w.extract::<f64>()).map_err(|_| refused().into()))
        .collect()
}

#[pyfunction(name = "mix_teachers")]
#[pyo3(
    signature = (ids_list, logp_list, weights, *, missing=None),
    text_signature = "(ids_list, logp_list, weights, *, missing='bound')"
)]
pub fn mix_teachers_py<'py>(
    py: Python<'py>,
    ids_list: &Bound<'py, PyAny>,
    logp_list: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    missing: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyTuple>> {
    let missing = missing.map_or(Ok(Missing::Bound), parse_missing)?;
    let ids_in: Vec<IdInput<'py>> = items(ids_list, "ids_list")?
        .iter()
        .map(|a| id_input(a, "ids_list"))
        .collect::<PyResult<_>>()?;
    let lp_in: Vec<FloatInput<'py>> = items(logp_list, "logp_list")?
        .iter()
        .map(|a| float_input(a, "logp_list"))
        .collect::<PyResult<_>>()?;
    if lp_in.len() != ids_in.len() {
        return Err(KernelError::arg(
            "logp_list",
            format!("has {} arrays but ids_list has {}", lp_in.len(), ids_in.len()),
        )
        .into());
    }
    let weights = MixWeights::new(weights_arg(weights)?, ids_in.len())?;
    let ids = ids_in
        .iter()
        .map(|a| a.rows("ids_list"))
        .collect::<Result<Vec<_>, _>>()?;
    let lps = lp_in
        .iter()
        .map(|a| a.rows("logp_list"))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, (a, b)) in ids.iter().zip(&lps).enumerate() {
        if a.data.dim() != b.data.dim() || a.one_row != b.one_row {
            return Err(KernelError::arg(
                "logp_list",
                format!(
                    "teacher {i}: shape {:?} does not match ids_list's {:?}",
                    shape(b),
                    shape(a)
                ),
            )
            .into());
        }
    }
    let one_row = ids[0].one_row;
    if ids.iter().any(|a| a.one_row != one_row) {
        return Err(KernelError::arg("ids_list", "mixes 1-D rows and 2-D batches").into());
    }
    let views: Vec<_> = ids.iter().map(|a| a.data.view()).collect();
    let lp_views: Vec<_> = lps.iter().map(|a| a.data.view()).collect();
    let (out_ids, out_lp) = py.detach(|| mix_teachers_batch(&views, &lp_views, &weights, missing))?;
    if one_row {
        PyTuple::new(
            py,
            [
                out_ids.index_axis_move(Axis(0), 0).into_pyarray(py).into_any(),
                out_lp.index_axis_move(Axis(0), 0).into_pyarray(py).into_any(),
            ],
        )
    } else {
        PyTuple::new(
            py,
            [out_ids.into_pyarray(py).into_any(), out_lp.into_pyarray(py).into_any()],
        )
    }
}
