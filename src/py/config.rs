//! `SamplerConfig`: the step's settings, validated once when built.
use pyo3::prelude::*;

use crate::py::args;
use pyo3::types::{PyFloat, PyString, PyTuple};

use crate::errors::KernelError;
use crate::kernels::alpha::{AlphaParams, Solver};
use crate::kernels::merge::Missing;
use crate::kernels::step::StepConfig;

#[pyclass(frozen, module = "dualsample_rs", name = "SamplerConfig")]
pub struct SamplerConfig {
    pub inner: StepConfig,
    temperature_t: Option<f64>,
}

pub fn parse_missing(obj: &Bound<'_, PyAny>) -> PyResult<Missing> {
    if let Ok(name) = obj.cast::<PyString>() {
        return Ok(Missing::parse_name(name.to_str()?)?);
    }
    match obj.extract::<f64>() {
        Ok(v) => Ok(Missing::value(v)?),
        Err(_) => Err(KernelError::arg(
            "missing",
            format!(
                "expected \"bound\", \"drop\" or a float, got {}",
                obj.get_type().name()?
            ),
        )
        .into()),
    }
}

fn missing_to_py(py: Python<'_>, m: Missing) -> Py<PyAny> {
    match m {
        Missing::Bound => PyString::new(py, "bound").into_any().unbind(),
        Missing::Drop => PyString::new(py, "drop").into_any().unbind(),
        Missing::Value(v) => PyFloat::new(py, v).into_any().unbind(),
    }
}

#[pymethods]
impl SamplerConfig {
    #[new]
    #[pyo3(signature = (
        method="kl_symmetry".to_owned(), alpha=0.5, alpha_min=0.0, alpha_max=1.0, tol=1e-10, max_iter=100,
        missing=None, temperature=1.0, temperature_t=None, top_p=None, exclude_ids=Vec::new(),
        stability_js_max=None, stability_overlap_min=None, diagnostics=false
    ), text_signature = "(method='kl_symmetry', alpha=0.5, alpha_min=0.0, alpha_max=1.0, tol=1e-10, max_iter=100, \
        missing='bound', temperature=1.0, temperature_t=None, top_p=None, exclude_ids=(), stability_js_max=None, \
        stability_overlap_min=None, diagnostics=False)")]
    fn new(
        #[pyo3(from_py_with = args::method)] method: String,
        #[pyo3(from_py_with = args::alpha)] alpha: f64,
        #[pyo3(from_py_with = args::alpha_min)] alpha_min: f64,
        #[pyo3(from_py_with = args::alpha_max)] alpha_max: f64,
        #[pyo3(from_py_with = args::tol)] tol: f64,
        #[pyo3(from_py_with = args::max_iter)] max_iter: i64,
        missing: Option<&Bound<'_, PyAny>>,
        #[pyo3(from_py_with = args::temperature)] temperature: f64,
        #[pyo3(from_py_with = args::temperature_t)] temperature_t: Option<f64>,
        #[pyo3(from_py_with = args::top_p)] top_p: Option<f64>,
        #[pyo3(from_py_with = args::exclude_ids)] exclude_ids: Vec<i64>,
        #[pyo3(from_py_with = args::stability_js_max)] stability_js_max: Option<f64>,
        #[pyo3(from_py_with = args::stability_overlap_min)] stability_overlap_min: Option<f64>,
        #[pyo3(from_py_with = args::diagnostics)] diagnostics: bool,
    ) -> PyResult<Self> {
        let missing = missing.map_or(Ok(Missing::Bound), parse_missing)?;
        let alpha = AlphaParams::new(&method, alpha, alpha_min, alpha_max, tol, max_iter)?;
        let inner = StepConfig::new(
            alpha,
            missing,
            temperature,
            temperature_t,
            top_p,
            exclude_ids,
            stability_js_max,
            stability_overlap_min,
            diagnostics,
        )?;
        Ok(SamplerConfig { inner, temperature_t })
    }

    #[getter]
    fn method(&self) -> &'static str {
        self.inner.alpha.method.name()
    }
    #[getter]
    fn alpha(&self) -> f64 {
        self.inner.alpha.alpha
    }
    #[getter]
    fn alpha_min(&self) -> f64 {
        self.inner.alpha.alpha_min
    }
    #[getter]
    fn alpha_max(&self) -> f64 {
        self.inner.alpha.alpha_max
    }
    #[getter]
    fn tol(&self) -> f64 {
        self.inner.alpha.tol
    }
    #[getter]
    fn max_iter(&self) -> u32 {
        self.inner.alpha.max_iter
    }
    #[getter]
    fn missing(&self, py: Python<'_>) -> Py<PyAny> {
        missing_to_py(py, self.inner.missing)
    }
    #[getter]
    fn temperature(&self) -> f64 {
        self.inner.temperature
    }
    #[getter]
    fn temperature_t(&self) -> Option<f64> {
        self.temperature_t
    }
    #[getter]
    fn top_p(&self) -> Option<f64> {
        self.inner.top_p
    }
    #[getter]
    fn exclude_ids<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        PyTuple::new(py, &self.inner.exclude_ids)
    }
    #[getter]
    fn stability_js_max(&self) -> Option<f64> {
        self.inner.js_max
    }
    #[getter]
    fn stability_overlap_min(&self) -> Option<f64> {
        self.inner.overlap_min
    }
    #[getter]
    fn diagnostics(&self) -> bool {
        self.inner.diagnostics
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let c = &self.inner;
        let opt = |v: Option<f64>| v.map_or("None".to_string(), |x| format!("{x:?}"));
        Ok(format!(
            "SamplerConfig(method={:?}, alpha={:?}, alpha_min={:?}, alpha_max={:?}, tol={:?}, max_iter={}, \
             missing={}, temperature={:?}, temperature_t={}, top_p={}, exclude_ids={:?}, \
             stability_js_max={}, stability_overlap_min={}, diagnostics={})",
            c.alpha.method.name(),
            c.alpha.alpha,
            c.alpha.alpha_min,
            c.alpha.alpha_max,
            c.alpha.tol,
            c.alpha.max_iter,
            missing_to_py(py, c.missing).bind(py).repr()?,
            c.temperature,
            opt(self.temperature_t),
            opt(c.top_p),
            c.exclude_ids,
            opt(c.js_max),
            opt(c.overlap_min),
            if c.diagnostics { "True" } else { "False" },
        ))
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<SamplerConfig>()
            .is_ok_and(|o| o.get().inner == self.inner && o.get().temperature_t == self.temperature_t)
    }
}

/// A copy of `config` whose α is found by the named root solver (`"halley"`, the
/// default, or `"bisect"`): how the benches time `step` with bisection beside Halley.
/// Not public API, and the copy's repr does not show the solver.
#[pyfunction(name = "_with_alpha_solver")]
pub fn with_alpha_solver_py(config: PyRef<'_, SamplerConfig>, solver: &str) -> PyResult<SamplerConfig> {
    let mut inner = config.inner.clone();
    inner.alpha.solver = Solver::parse(solver)?;
    Ok(SamplerConfig {
        inner,
        temperature_t: config.temperature_t,
    })
}
