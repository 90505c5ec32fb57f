//! Scalar arguments read with their names in the error: PyO3 puts the name only in a note
//! of the TypeError, which `str(err)` and most logs do not show.
use pyo3::prelude::*;
use pyo3::types::PyAnyMethods;

use crate::errors::KernelError;

fn named<'py, T: FromPyObjectOwned<'py>>(obj: &Bound<'py, PyAny>, arg: &'static str, kind: &str) -> PyResult<T> {
    obj.extract::<T>().map_err(|_| {
        let got = obj.get_type().name().map_or_else(|_| "?".to_owned(), |n| n.to_string());
        KernelError::Dtype {
            arg,
            msg: format!("expected {kind}, got {got}"),
        }
        .into()
    })
}

/// One extractor per argument name, for `#[pyo3(from_py_with = ...)]`.
macro_rules! extractors {
    ($($fname:ident: $ty:ty = $arg:literal, $kind:literal;)*) => {
        $(pub fn $fname(obj: &Bound<'_, PyAny>) -> PyResult<$ty> {
            named(obj, $arg, $kind)
        })*
    };
}

extractors! {
    alpha: f64 = "alpha", "a number";
    alpha_min: f64 = "alpha_min", "a number";
    alpha_max: f64 = "alpha_max", "a number";
    tol: f64 = "tol", "a number";
    max_iter: i64 = "max_iter", "an integer";
    temperature: f64 = "temperature", "a number";
    temperature_t: Option<f64> = "temperature_t", "a number or None";
    top_p: Option<f64> = "top_p", "a number or None";
    exclude_ids: Vec<i64> = "exclude_ids", "a sequence of integer token ids";
    stability_js_max: Option<f64> = "stability_js_max", "a number or None";
    stability_overlap_min: Option<f64> = "stability_overlap_min", "a number or None";
    diagnostics: bool = "diagnostics", "True or False";
    method: String = "method", "a string";
}
