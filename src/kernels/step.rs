//! The fused step for one row: merge, exclude, temperature, normalise, stability check,
//! support constraint, α, q*, draw (design.md, steps 1–9).
use std::cmp::Ordering;

use numpy::ndarray::ArrayView2;

use crate::errors::{KernelError, KernelResult};
use crate::kernels::alpha::{self, AlphaParams, Support};
use crate::kernels::logspace::{entropy, ess, geometric, js, kl, normalise};
use crate::kernels::merge::{merge, read_list, List, Merged, Missing};
use crate::kernels::parallel::map_rows;
use crate::kernels::rng::uniform;

/// Validated settings of the step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepConfig {
    pub alpha: AlphaParams,
    pub missing: Missing,
    pub temperature: f64,
    pub temperature_t: f64,
    pub top_p: Option<f64>,
    /// Sorted and unique.
    pub exclude_ids: Vec<i64>,
    pub js_max: Option<f64>,
    pub overlap_min: Option<f64>,
    pub diagnostics: bool,
}

fn positive(arg: &'static str, v: f64) -> KernelResult<f64> {
    if v > 0.0 && v.is_finite() {
        Ok(v)
    } else {
        Err(KernelError::arg(
            arg,
            format!("must be a positive finite number, got {v}"),
        ))
    }
}

impl StepConfig {
    pub fn new(
        alpha: AlphaParams,
        missing: Missing,
        temperature: f64,
        temperature_t: Option<f64>,
        top_p: Option<f64>,
        mut exclude_ids: Vec<i64>,
        js_max: Option<f64>,
        overlap_min: Option<f64>,
        diagnostics: bool,
    ) -> KernelResult<Self> {
        let temperature = positive("temperature", temperature)?;
        let temperature_t = positive("temperature_t", temperature_t.unwrap_or(temperature))?;
        if let Some(p) = top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(KernelError::arg("top_p", format!("must lie in (0, 1], got {p}")));
            }
        }
        if let Some(&id) = exclude_ids.iter().find(|&&id| id < 0) {
            return Err(KernelError::arg(
                "exclude_ids",
                format!("token ids are non-negative, got {id}"),
            ));
        }
        exclude_ids.sort_unstable();
        exclude_ids.dedup();
        if let Some(v) = js_max {
            if !(v >= 0.0) {
                return Err(KernelError::arg("stability_js_max", format!("must be >= 0, got {v}")));
            }
        }
        if let Some(v) = overlap_min {
            if !(0.0..=1.0).contains(&v) {
                return Err(KernelError::arg(
                    "stability_overlap_min",
                    format!("must lie in [0, 1], got {v}"),
                ));
            }
        }
        Ok(StepConfig {
            alpha,
            missing,
            temperature,
            temperature_t,
            top_p,
            exclude_ids,
            js_max,
            overlap_min,
            diagnostics,
        })
    }
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            alpha: AlphaParams::default(),
            missing: Missing::Bound,
            temperature: 1.0,
            temperature_t: 1.0,
            top_p: None,
            exclude_ids: Vec::new(),
            js_max: None,
            overlap_min: None,
            diagnostics: false,
        }
    }
}

/// A batch of rows: each model's top-k lists plus the per-row draw keys.
pub struct Batch<'a> {
    pub ids_theta: ArrayView2<'a, i64>,
    pub logp_theta: ArrayView2<'a, f64>,
    pub ids_t: ArrayView2<'a, i64>,
    pub logp_t: ArrayView2<'a, f64>,
    pub row_keys: &'a [u64],
    pub positions: &'a [u64],
    pub force_teacher: &'a [bool],
    pub seed: u64,
}

/// Per-token divergences, on request.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Diagnostics {
    pub kl_theta: f64,
    pub kl_t: f64,
    pub ess_theta: f64,
    pub ess_t: f64,
    pub entropy: f64,
    pub js: f64,
}

/// What one row's step reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct RowOutput {
    pub token_id: i64,
    pub alpha: f64,
    pub logq: f64,
    pub logp_theta: f64,
    pub logp_t: f64,
    pub observed_theta: bool,
    pub observed_t: bool,
    pub fallback: bool,
    pub no_overlap: bool,
    pub n_candidates: i32,
    pub diagnostics: Diagnostics,
}

/// Buffers reused across the rows one worker handles.
#[derive(Default)]
pub struct Scratch {
    theta: List,
    t: List,
    merged: Merged,
    order: Vec<usize>,
    logq: Vec<f64>,
    support: Support,
}

/// Mass a normalised log distribution puts on the tokens both models listed.
fn common_mass(logp: &[f64], m: &Merged) -> f64 {
    logp.iter()
        .zip(m.obs_a.iter().zip(&m.obs_b))
        .filter(|(_, (&x, &y))| x && y)
        .map(|(&lp, _)| lp.exp())
        .sum()
}

/// Keep the teacher's most probable candidates until their mass reaches `top_p`
/// (the one crossing it included); ties go to the lower id.
fn constrain_top_p(m: &mut Merged, order: &mut Vec<usize>, top_p: f64) {
    order.clear();
    order.extend(0..m.len());
    let b = &m.b;
    order.sort_by(|&i, &j| b[j].partial_cmp(&b[i]).unwrap_or(Ordering::Equal));
    let mut keep = vec![false; m.len()];
    let mut mass = 0.0;
    for &i in order.iter() {
        // Sorted by descending probability, so the rest have none either.
        if mass >= top_p || b[i] == f64::NEG_INFINITY {
            break;
        }
        keep[i] = true;
        mass += b[i].exp();
    }
    m.retain(|i, _| keep[i]);
}

/// Inverse-CDF draw over the candidates in order; never returns a zero-probability one.
fn draw(logq: &[f64], u: f64) -> usize {
    let total: f64 = logq.iter().map(|&x| x.exp()).sum();
    let target = u * total;
    let mut cum = 0.0;
    let mut last_positive = 0;
    for (i, &x) in logq.iter().enumerate() {
        let p = x.exp();
        if p > 0.0 {
            last_positive = i;
        }
        cum += p;
        if cum > target {
            return i;
        }
    }
    last_positive
}

pub fn step_row(batch: &Batch<'_>, cfg: &StepConfig, row: usize, s: &mut Scratch) -> KernelResult<RowOutput> {
    read_list(
        batch.ids_theta.row(row),
        batch.logp_theta.row(row),
        ("ids_theta", "logp_theta"),
        row,
        &mut s.theta,
    )?;
    read_list(
        batch.ids_t.row(row),
        batch.logp_t.row(row),
        ("ids_t", "logp_t"),
        row,
        &mut s.t,
    )?;
    let m = &mut s.merged;
    merge(&s.theta, &s.t, cfg.missing, m);
    if m.is_empty() {
        return Err(KernelError::row(
            "ids_theta",
            row,
            "both models' lists are empty (all padding)",
        ));
    }
    if !cfg.exclude_ids.is_empty() {
        m.retain(|_, id| cfg.exclude_ids.binary_search(&id).is_err());
        if m.is_empty() {
            return Err(KernelError::row(
                "exclude_ids",
                row,
                "every candidate of this row is excluded",
            ));
        }
    }
    if cfg.temperature != 1.0 {
        m.a.iter_mut().for_each(|x| *x /= cfg.temperature);
    }
    if cfg.temperature_t != 1.0 {
        m.b.iter_mut().for_each(|x| *x /= cfg.temperature_t);
    }
    let za = normalise(&mut m.a);
    let zb = normalise(&mut m.b);
    // A model with no mass on any candidate cannot take part: use the other one.
    let mut forced = match (za.is_finite(), zb.is_finite()) {
        (false, false) => {
            return Err(KernelError::row(
                "logp_theta",
                row,
                "no candidate has positive probability under either model",
            ))
        }
        (false, true) => Some(1.0),
        (true, false) => Some(0.0),
        (true, true) => None,
    };
    if forced.is_none() {
        let unstable_js = cfg.js_max.is_some_and(|max| js(&m.a, &m.b) > max);
        let unstable_overlap = cfg
            .overlap_min
            .is_some_and(|min| common_mass(&m.a, m).min(common_mass(&m.b, m)) < min);
        if unstable_js || unstable_overlap {
            forced = Some(1.0);
        }
    }
    if let (Some(top_p), true) = (cfg.top_p, zb.is_finite()) {
        constrain_top_p(m, &mut s.order, top_p);
        normalise(&mut m.b);
        if !normalise(&mut m.a).is_finite() && forced.is_none() {
            forced = Some(1.0);
        }
    }
    let mut fallback = forced.is_some();
    let mut alpha = match forced {
        Some(f) => f,
        None if batch.force_teacher[row] => 1.0,
        None => alpha::solve(&m.a, &m.b, &cfg.alpha, &mut s.support),
    };
    s.logq.clear();
    s.logq
        .extend(m.a.iter().zip(&m.b).map(|(&a, &b)| geometric(a, b, alpha)));
    // At α = 0 or 1, q* is one of the (already normalised) models, exactly.
    let interior = alpha > 0.0 && alpha < 1.0;
    if interior && !normalise(&mut s.logq).is_finite() {
        // The two models share no candidate: only the teacher's side is usable.
        fallback = true;
        alpha = 1.0;
        s.logq.clear();
        s.logq.extend_from_slice(&m.b);
    }
    let u = uniform(batch.seed, batch.row_keys[row], batch.positions[row]);
    let k = draw(&s.logq, u);
    let diagnostics = if cfg.diagnostics {
        Diagnostics {
            kl_theta: kl(&s.logq, &m.a),
            kl_t: kl(&s.logq, &m.b),
            ess_theta: ess(&m.a, &s.logq),
            ess_t: ess(&m.b, &s.logq),
            entropy: entropy(&s.logq),
            js: js(&m.a, &m.b),
        }
    } else {
        Diagnostics::default()
    };
    Ok(RowOutput {
        token_id: m.ids[k],
        alpha,
        logq: s.logq[k],
        logp_theta: m.a[k],
        logp_t: m.b[k],
        observed_theta: m.obs_a[k],
        observed_t: m.obs_b[k],
        fallback,
        no_overlap: m.no_overlap,
        n_candidates: i32::try_from(m.len()).unwrap_or(i32::MAX),
        diagnostics,
    })
}

/// The step for every row of the batch.
pub fn step_batch(batch: &Batch<'_>, cfg: &StepConfig) -> KernelResult<Vec<RowOutput>> {
    let width = batch.ids_theta.ncols() + batch.ids_t.ncols();
    map_rows(batch.ids_theta.nrows(), width, |s: &mut Scratch, r| {
        step_row(batch, cfg, r, s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use numpy::ndarray::{arr2, Array2};

    fn run(
        ids_a: &Array2<i64>,
        lp_a: &Array2<f64>,
        ids_b: &Array2<i64>,
        lp_b: &Array2<f64>,
        cfg: &StepConfig,
        pos: u64,
    ) -> RowOutput {
        let batch = Batch {
            ids_theta: ids_a.view(),
            logp_theta: lp_a.view(),
            ids_t: ids_b.view(),
            logp_t: lp_b.view(),
            row_keys: &[0],
            positions: &[pos],
            force_teacher: &[false],
            seed: 1,
        };
        step_batch(&batch, cfg).unwrap()[0]
    }

    #[test]
    fn top_p_keeps_crossing_candidate_and_excludes() {
        let ids_a = arr2(&[[1i64, 2, 3]]);
        let lp_a = arr2(&[[0.2f64.ln(), 0.3f64.ln(), 0.5f64.ln()]]);
        let ids_b = arr2(&[[1i64, 2, 3]]);
        let lp_b = arr2(&[[0.6f64.ln(), 0.3f64.ln(), 0.1f64.ln()]]);
        let cfg = StepConfig {
            top_p: Some(0.7),
            exclude_ids: vec![],
            ..StepConfig::default()
        };
        for pos in 0..200 {
            let out = run(&ids_a, &lp_a, &ids_b, &lp_b, &cfg, pos);
            assert_eq!(out.n_candidates, 2);
            assert_ne!(out.token_id, 3);
        }
        let cfg = StepConfig {
            exclude_ids: vec![1],
            ..StepConfig::default()
        };
        for pos in 0..200 {
            assert_ne!(run(&ids_a, &lp_a, &ids_b, &lp_b, &cfg, pos).token_id, 1);
        }
    }

    #[test]
    fn one_hot_and_extremes_stay_finite() {
        let ids = arr2(&[[0i64, 1]]);
        let lp_a = arr2(&[[0.0, f64::NEG_INFINITY]]);
        let lp_b = arr2(&[[-1e4, 0.0]]);
        let out = run(&ids, &lp_a, &ids, &lp_b, &StepConfig::default(), 0);
        assert!(out.alpha.is_finite() && out.logq.is_finite());
    }
}
