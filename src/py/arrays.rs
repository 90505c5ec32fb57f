//! Turning Python arguments into 2-D views the kernels read.
//!
//! float64/int64 arrays of any layout are read in place; float32/int32 are widened once;
//! lists and other safe numeric dtypes go through `numpy.asarray` first. Everything else
//! is refused with the dtype that was expected.
use ndarray::{Axis, CowArray, Ix2};
use numpy::{Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::{KernelError, KernelResult};

/// A 2-D batch and whether the caller passed a single 1-D row.
pub struct Rows<'a, T> {
    pub data: CowArray<'a, T, Ix2>,
    pub one_row: bool,
}

pub enum FloatInput<'py> {
    F64(PyReadonlyArrayDyn<'py, f64>),
    F32(PyReadonlyArrayDyn<'py, f32>),
}

pub enum IdInput<'py> {
    I64(PyReadonlyArrayDyn<'py, i64>),
    I32(PyReadonlyArrayDyn<'py, i32>),
}

fn borrow_err(arg: &'static str, err: impl std::fmt::Display) -> KernelError {
    KernelError::arg(arg, format!("cannot read the array: {err}"))
}

/// `numpy.asarray(obj)` when `obj`'s dtype kind is one of `kinds`, cast to `dtype`.
/// `exact`: unsigned values must fit the signed target (token ids; row keys may wrap).
fn convert<'py>(
    obj: &Bound<'py, PyAny>,
    arg: &'static str,
    (kinds, dtype, expected): (&str, &str, &str),
    exact: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let np = obj.py().import("numpy")?;
    let arr = np.call_method1("asarray", (obj,)).map_err(|e| KernelError::Dtype {
        arg,
        msg: format!("expected {expected}, got an object numpy cannot read as an array ({e})"),
    })?;
    let dt = arr.getattr("dtype")?;
    let kind: String = dt.getattr("kind")?.extract()?;
    if exact && kind == "u" && arr.getattr("size")?.extract::<usize>()? > 0 {
        // uint64 values past i64::MAX would wrap to negatives (and -1 is padding).
        let largest: u64 = arr.call_method0("max")?.extract()?;
        if largest > i64::MAX as u64 {
            return Err(KernelError::arg(arg, format!("{largest} does not fit in a signed 64-bit integer")).into());
        }
    }
    if kinds.contains(kind.as_str()) {
        return arr.call_method1("astype", (dtype,));
    }
    Err(KernelError::Dtype {
        arg,
        msg: format!("expected {expected}, got dtype {}", dt.str()?),
    }
    .into())
}

pub fn float_input<'py>(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<FloatInput<'py>> {
    if let Ok(a) = obj.cast::<PyArrayDyn<f64>>() {
        return Ok(FloatInput::F64(a.try_readonly().map_err(|e| borrow_err(arg, e))?));
    }
    if let Ok(a) = obj.cast::<PyArrayDyn<f32>>() {
        return Ok(FloatInput::F32(a.try_readonly().map_err(|e| borrow_err(arg, e))?));
    }
    let conv = convert(
        obj,
        arg,
        ("fiu", "float64", "float32 or float64 log probabilities"),
        false,
    )?;
    let a = conv.cast_into::<PyArrayDyn<f64>>()?;
    Ok(FloatInput::F64(a.try_readonly().map_err(|e| borrow_err(arg, e))?))
}

pub fn id_input<'py>(obj: &Bound<'py, PyAny>, arg: &'static str) -> PyResult<IdInput<'py>> {
    if let Ok(a) = obj.cast::<PyArrayDyn<i64>>() {
        return Ok(IdInput::I64(a.try_readonly().map_err(|e| borrow_err(arg, e))?));
    }
    if let Ok(a) = obj.cast::<PyArrayDyn<i32>>() {
        return Ok(IdInput::I32(a.try_readonly().map_err(|e| borrow_err(arg, e))?));
    }
    let conv = convert(obj, arg, ("iu", "int64", "int32 or int64 token ids"), true)?;
    let a = conv.cast_into::<PyArrayDyn<i64>>()?;
    Ok(IdInput::I64(a.try_readonly().map_err(|e| borrow_err(arg, e))?))
}

fn to_rows<'a, T: Clone>(data: CowArray<'a, T, ndarray::IxDyn>, arg: &'static str) -> KernelResult<Rows<'a, T>> {
    let one_row = match data.ndim() {
        1 => true,
        2 => false,
        n => {
            return Err(KernelError::arg(
                arg,
                format!("expected a 1-D row or a 2-D batch (one row per sequence), got {n} dimensions"),
            ))
        }
    };
    let data = if one_row { data.insert_axis(Axis(0)) } else { data };
    let data = data
        .into_dimensionality::<Ix2>()
        .map_err(|e| KernelError::arg(arg, e.to_string()))?;
    Ok(Rows { data, one_row })
}

impl FloatInput<'_> {
    pub fn rows(&self, arg: &'static str) -> KernelResult<Rows<'_, f64>> {
        match self {
            FloatInput::F64(a) => to_rows(CowArray::from(a.as_array()), arg),
            FloatInput::F32(a) => to_rows(CowArray::from(a.as_array().mapv(f64::from)), arg),
        }
    }
}

impl IdInput<'_> {
    pub fn rows(&self, arg: &'static str) -> KernelResult<Rows<'_, i64>> {
        match self {
            IdInput::I64(a) => to_rows(CowArray::from(a.as_array()), arg),
            IdInput::I32(a) => to_rows(CowArray::from(a.as_array().mapv(i64::from)), arg),
        }
    }
}

/// Check that two arrays have the same shape (and are both rows or both batches).
pub fn same_shape<A, B>(
    ids: &Rows<'_, A>,
    logp: &Rows<'_, B>,
    names: (&'static str, &'static str),
) -> KernelResult<()> {
    if ids.data.dim() == logp.data.dim() && ids.one_row == logp.one_row {
        Ok(())
    } else {
        Err(KernelError::arg(
            names.1,
            format!(
                "shape {:?} does not match {}'s {:?}",
                logp.data.shape(),
                names.0,
                ids.data.shape()
            ),
        ))
    }
}

/// A per-row array argument as a `Vec`: `T` arrays are read directly, others converted
/// by numpy when their dtype kind is in `kinds`.
fn per_row<T: Element + Copy>(
    obj: &Bound<'_, PyAny>,
    arg: &'static str,
    rows: usize,
    (kinds, dtype, expected): (&str, &str, &str),
) -> PyResult<Vec<T>> {
    let arr = match obj.cast::<PyArrayDyn<T>>() {
        Ok(a) => a.clone(),
        Err(_) => convert(obj, arg, (kinds, dtype, expected), false)?.cast_into::<PyArrayDyn<T>>()?,
    };
    check_len(arr.shape(), arg, rows)?;
    let ro = arr.try_readonly().map_err(|e| borrow_err(arg, e))?;
    Ok(ro.as_array().iter().copied().collect())
}

/// An optional per-row count (positions): non-negative integers.
pub fn per_row_counts(obj: Option<&Bound<'_, PyAny>>, arg: &'static str, rows: usize) -> PyResult<Vec<u64>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(vec![0; rows]),
        Some(obj) => {
            let values = per_row::<i64>(obj, arg, rows, ("iu", "int64", "non-negative integers, one per row"))?;
            if let Some((r, v)) = values.iter().enumerate().find(|(_, &v)| v < 0) {
                return Err(KernelError::row(arg, r, format!("must be >= 0, got {v}")).into());
            }
            Ok(values.into_iter().map(|v| v as u64).collect())
        }
    }
}

/// An optional per-row integer argument (row keys), as raw 64-bit keys.
pub fn per_row_keys(
    obj: Option<&Bound<'_, PyAny>>,
    arg: &'static str,
    rows: usize,
    default: impl Fn(usize) -> u64,
) -> PyResult<Vec<u64>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok((0..rows).map(default).collect()),
        Some(obj) => Ok(
            per_row::<i64>(obj, arg, rows, ("iu", "int64", "integers, one per row"))?
                .into_iter()
                .map(|v| v as u64)
                .collect(),
        ),
    }
}

/// Optional drafted tokens, one per row (-1: none); empty when not given.
pub fn per_row_drafts(obj: Option<&Bound<'_, PyAny>>, rows: usize) -> PyResult<Vec<i64>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(Vec::new()),
        Some(obj) => {
            let values = per_row::<i64>(obj, "drafts", rows, ("iu", "int64", "token ids or -1, one per row"))?;
            if let Some((r, v)) = values.iter().enumerate().find(|(_, &v)| v < -1) {
                return Err(KernelError::row("drafts", r, format!("must be a token id or -1, got {v}")).into());
            }
            Ok(values)
        }
    }
}

/// An optional per-row integer (the engine's top_k of q*); empty when not given.
pub fn optional_per_row_ints(obj: Option<&Bound<'_, PyAny>>, arg: &'static str, rows: usize) -> PyResult<Vec<i64>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(Vec::new()),
        Some(obj) => per_row(obj, arg, rows, ("iu", "int64", "integers, one per row")),
    }
}

/// An optional per-row float (the engine's top_p or min_p of q*); empty when not given.
/// The values are the kernel's to check.
pub fn optional_per_row_floats(obj: Option<&Bound<'_, PyAny>>, arg: &'static str, rows: usize) -> PyResult<Vec<f64>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(Vec::new()),
        Some(obj) => per_row(obj, arg, rows, ("fiu", "float64", "floats, one per row")),
    }
}

/// An optional per-row flag.
pub fn per_row_flags(obj: Option<&Bound<'_, PyAny>>, arg: &'static str, rows: usize) -> PyResult<Vec<bool>> {
    match obj.filter(|o| !o.is_none()) {
        None => Ok(vec![false; rows]),
        Some(obj) => per_row(obj, arg, rows, ("biu", "bool", "booleans, one per row")),
    }
}

/// A per-row float (a scalar applies to every row).
pub fn per_row_floats(obj: &Bound<'_, PyAny>, arg: &'static str, rows: usize) -> PyResult<Vec<f64>> {
    if let Ok(v) = obj.extract::<f64>() {
        return Ok(vec![v; rows]);
    }
    per_row(obj, arg, rows, ("fiu", "float64", "a float or one float per row"))
}

/// Both models' top-k arguments, extracted once; `rows` checks their shapes agree.
pub struct TopkInputs<'py> {
    ids_a: IdInput<'py>,
    lp_a: FloatInput<'py>,
    ids_b: IdInput<'py>,
    lp_b: FloatInput<'py>,
}

/// Views of `TopkInputs`: (ids_theta, logp_theta, ids_t, logp_t).
pub type TopkRows<'a> = (Rows<'a, i64>, Rows<'a, f64>, Rows<'a, i64>, Rows<'a, f64>);

impl<'py> TopkInputs<'py> {
    pub fn extract(
        ids_theta: &Bound<'py, PyAny>,
        logp_theta: &Bound<'py, PyAny>,
        ids_t: &Bound<'py, PyAny>,
        logp_t: &Bound<'py, PyAny>,
    ) -> PyResult<Self> {
        Ok(TopkInputs {
            ids_a: id_input(ids_theta, "ids_theta")?,
            lp_a: float_input(logp_theta, "logp_theta")?,
            ids_b: id_input(ids_t, "ids_t")?,
            lp_b: float_input(logp_t, "logp_t")?,
        })
    }

    pub fn rows(&self) -> KernelResult<TopkRows<'_>> {
        let ia = self.ids_a.rows("ids_theta")?;
        let la = self.lp_a.rows("logp_theta")?;
        let ib = self.ids_b.rows("ids_t")?;
        let lb = self.lp_b.rows("logp_t")?;
        same_shape(&ia, &la, ("ids_theta", "logp_theta"))?;
        same_shape(&ib, &lb, ("ids_t", "logp_t"))?;
        if ib.data.nrows() != ia.data.nrows() || ia.one_row != ib.one_row {
            return Err(KernelError::arg(
                "ids_t",
                format!("has {} rows but ids_theta has {}", ib.data.nrows(), ia.data.nrows()),
            ));
        }
        Ok((ia, la, ib, lb))
    }
}

fn check_len(shape: &[usize], arg: &'static str, rows: usize) -> KernelResult<()> {
    if shape.len() == 1 && shape[0] == rows || (shape.is_empty() && rows == 1) {
        Ok(())
    } else {
        Err(KernelError::arg(
            arg,
            format!("expected one entry per row ({rows}), got shape {shape:?}"),
        ))
    }
}
