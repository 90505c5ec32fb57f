//! The fused step for one row: merge, exclude, temperature, normalise, stability check,
//! support constraint, α, q*, draw (docs/design.md, steps 1–9).
use std::cmp::Ordering;

use ndarray::ArrayView2;

use crate::errors::{KernelError, KernelResult};
use crate::kernels::alpha::{self, AlphaParams, Support};
use crate::kernels::logspace::{entropy, ess, geometric, js, kl, normalise_with_probs};
use crate::kernels::merge::{merge, IdTable, Merged, Missing, RowBuffers};
use crate::kernels::parallel::map_rows;
use crate::kernels::rng::{accept_uniform, uniform};
use crate::kernels::simd::with_avx2_twin;

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
            if v.is_nan() || v < 0.0 {
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
    /// Per row, a drafted token to test (-1: none, draw afresh); empty: no drafts.
    pub drafts: &'a [i64],
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
#[allow(clippy::struct_excessive_bools)] // one flag per reported column
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
    /// The row's drafted token passed its acceptance test and is the token.
    pub accepted: bool,
    pub no_overlap: bool,
    pub n_candidates: i32,
    /// Candidates before the support constraint (after the merge and exclusion).
    pub n_merged: i32,
    pub diagnostics: Diagnostics,
}

/// Buffers reused across the rows one worker handles.
#[derive(Default)]
pub struct Scratch {
    rows: RowBuffers,
    table: IdTable,
    merged: Merged,
    pa: Vec<f64>,
    pb: Vec<f64>,
    order: Vec<usize>,
    keep: Vec<bool>,
    logq: Vec<f64>,
    q: Vec<f64>,
    support: Support,
}

/// Mass a distribution puts on the tokens both models listed.
#[inline(always)]
fn common_mass(probs: &[f64], m: &Merged) -> f64 {
    probs
        .iter()
        .zip(m.obs_a.iter().zip(&m.obs_b))
        .filter(|(_, (&x, &y))| x && y)
        .map(|(&p, _)| p)
        .sum()
}

/// Keep the teacher's most probable candidates until their mass reaches `top_p`
/// (the one crossing it included); ties go to the earlier candidate.
#[inline(always)]
fn constrain_top_p(m: &mut Merged, pb: &[f64], order: &mut Vec<usize>, keep: &mut Vec<bool>, top_p: f64) {
    order.clear();
    order.extend(0..m.len());
    order.sort_by(|&i, &j| m.b[j].partial_cmp(&m.b[i]).unwrap_or(Ordering::Equal));
    keep.clear();
    keep.resize(m.len(), false);
    let mut mass = 0.0;
    for &i in order.iter() {
        // Sorted by descending probability, so the rest have none either.
        if mass >= top_p || m.b[i] == f64::NEG_INFINITY {
            break;
        }
        keep[i] = true;
        mass += pb[i];
    }
    m.retain(|c| keep[c.index]);
}

/// Inverse-CDF draw over the candidates in order; never returns a zero-probability one.
#[inline(always)]
fn draw(q: &[f64], u: f64) -> usize {
    let total: f64 = q.iter().sum();
    let target = u * total;
    let mut cum = 0.0;
    let mut last_positive = 0;
    for (i, &p) in q.iter().enumerate() {
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

/// Step 8 for a row with a drafted token `d`, drafted deterministically (a point mass):
/// speculative sampling accepts it with probability min(1, q*(d)/1) = q*(d), and on
/// rejection draws from the residual max(0, q* − δ_d), which is q* without d. The token
/// then has law q* exactly, as if drawn afresh (`u_accept` and `u` are independent).
#[inline(always)]
fn accept_or_residual(q: &mut [f64], ids: &[i64], d: i64, u_accept: f64, u: f64) -> (usize, bool) {
    let total: f64 = q.iter().sum();
    if let Some(j) = ids.iter().position(|&id| id == d) {
        if u_accept * total < q[j] {
            return (j, true);
        }
        q[j] = 0.0;
    }
    (draw(q, u), false)
}

/// log q* and q* over the candidates at `alpha`; false when they share no support.
#[inline(always)]
fn mixture(a: &[f64], b: &[f64], pa: &[f64], pb: &[f64], alpha: f64, logq: &mut Vec<f64>, q: &mut Vec<f64>) -> bool {
    logq.clear();
    q.clear();
    // At α = 0 or 1, q* is one of the (already normalised) models, exactly.
    if alpha <= 0.0 || alpha >= 1.0 {
        let (l, p) = if alpha <= 0.0 { (a, pa) } else { (b, pb) };
        logq.extend_from_slice(l);
        q.extend_from_slice(p);
        return true;
    }
    logq.resize(a.len(), 0.0);
    for ((w, &x), &y) in logq.iter_mut().zip(a).zip(b) {
        *w = geometric(x, y, alpha);
    }
    normalise_with_probs(logq, q).is_finite()
}

/// Step 2: drop the ids the caller keeps out.
#[inline(always)]
fn exclude(m: &mut Merged, exclude_ids: &[i64], row: usize) -> KernelResult<()> {
    if !exclude_ids.is_empty() {
        m.retain(|c| exclude_ids.binary_search(&c.id).is_err());
        if m.is_empty() {
            return Err(KernelError::row(
                "exclude_ids",
                row,
                "every candidate of this row is excluded",
            ));
        }
    }
    Ok(())
}

/// Step 3: each model's temperature.
#[inline(always)]
fn apply_temperature(m: &mut Merged, cfg: &StepConfig) {
    if cfg.temperature != 1.0 {
        m.a.iter_mut().for_each(|x| *x /= cfg.temperature);
    }
    if cfg.temperature_t != 1.0 {
        m.b.iter_mut().for_each(|x| *x /= cfg.temperature_t);
    }
}

/// Step 4: normalise both models over the candidates. A model with no mass on any
/// candidate cannot take part: α is forced to the other one.
#[inline(always)]
fn normalise_both(
    m: &mut Merged,
    pa: &mut Vec<f64>,
    pb: &mut Vec<f64>,
    row: usize,
) -> KernelResult<(Option<f64>, bool)> {
    let za = normalise_with_probs(&mut m.a, pa);
    let zb = normalise_with_probs(&mut m.b, pb);
    let forced = match (za.is_finite(), zb.is_finite()) {
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
    Ok((forced, zb.is_finite()))
}

/// Step 5: where the models disagree too much, fall back to the teacher.
#[inline(always)]
fn unstable(m: &Merged, pa: &[f64], pb: &[f64], cfg: &StepConfig) -> bool {
    let by_js = cfg.js_max.is_some_and(|max| js(&m.a, &m.b, pa, pb) > max);
    let by_overlap = cfg
        .overlap_min
        .is_some_and(|min| common_mass(pa, m).min(common_mass(pb, m)) < min);
    by_js || by_overlap
}

/// Step 6: keep the teacher's top-p support and renormalise both; false when the base
/// has no mass left on it.
#[inline(always)]
fn support_constraint(s: &mut Scratch, top_p: f64) -> bool {
    let m = &mut s.merged;
    constrain_top_p(m, &s.pb, &mut s.order, &mut s.keep, top_p);
    normalise_with_probs(&mut m.b, &mut s.pb);
    normalise_with_probs(&mut m.a, &mut s.pa).is_finite()
}

/// Step 9's optional divergences of q* from both models.
#[inline(always)]
fn diagnostics(s: &Scratch) -> Diagnostics {
    let m = &s.merged;
    Diagnostics {
        kl_theta: kl(&s.logq, &s.q, &m.a),
        kl_t: kl(&s.logq, &s.q, &m.b),
        ess_theta: ess(&m.a, &s.logq),
        ess_t: ess(&m.b, &s.logq),
        entropy: entropy(&s.logq, &s.q),
        js: js(&m.a, &m.b, &s.pa, &s.pb),
    }
}

/// One row, stage by stage as in docs/design.md (section 2).
#[inline(always)]
pub fn step_row(batch: &Batch<'_>, cfg: &StepConfig, row: usize, s: &mut Scratch) -> KernelResult<RowOutput> {
    // 1. merge
    let lists = s
        .rows
        .lists((batch.ids_theta, batch.logp_theta, batch.ids_t, batch.logp_t), row);
    merge(&lists, cfg.missing, row, &mut s.table, &mut s.merged)?;
    let m = &mut s.merged;
    if m.is_empty() {
        return Err(KernelError::row(
            "ids_theta",
            row,
            "both models' lists are empty (all padding)",
        ));
    }
    // 2. exclude, 3. temperature, 4. normalise
    exclude(m, &cfg.exclude_ids, row)?;
    apply_temperature(m, cfg);
    let (mut forced, teacher_has_mass) = normalise_both(m, &mut s.pa, &mut s.pb, row)?;
    let n_merged = i32::try_from(s.merged.len()).unwrap_or(i32::MAX);
    // 5. stability check
    if forced.is_none() && unstable(&s.merged, &s.pa, &s.pb, cfg) {
        forced = Some(1.0);
    }
    // 6. support constraint
    if let (Some(top_p), true) = (cfg.top_p, teacher_has_mass) {
        if !support_constraint(s, top_p) && forced.is_none() {
            forced = Some(1.0);
        }
    }
    let m = &s.merged;
    // 7. α
    let mut fallback = forced.is_some();
    let mut alpha = match forced {
        Some(f) => f,
        None if batch.force_teacher[row] => 1.0,
        None => alpha::solve(&m.a, &m.b, &s.pa, &s.pb, &cfg.alpha, &mut s.support),
    };
    // 8. q* and the draw
    if !mixture(&m.a, &m.b, &s.pa, &s.pb, alpha, &mut s.logq, &mut s.q) {
        // The two models share no candidate: only the teacher's side is usable.
        fallback = true;
        alpha = 1.0;
        mixture(&m.a, &m.b, &s.pa, &s.pb, alpha, &mut s.logq, &mut s.q);
    }
    let (key, pos) = (batch.row_keys[row], batch.positions[row]);
    let u = uniform(batch.seed, key, pos);
    let (k, accepted) = match batch.drafts.get(row) {
        Some(&d) if d >= 0 => accept_or_residual(&mut s.q, &m.ids, d, accept_uniform(batch.seed, key, pos), u),
        _ => (draw(&s.q, u), false),
    };
    // 9. report
    Ok(RowOutput {
        token_id: m.ids[k],
        alpha,
        logq: s.logq[k],
        logp_theta: m.a[k],
        logp_t: m.b[k],
        observed_theta: m.obs_a[k],
        observed_t: m.obs_b[k],
        fallback,
        accepted,
        no_overlap: m.no_overlap,
        n_candidates: i32::try_from(m.len()).unwrap_or(i32::MAX),
        n_merged,
        diagnostics: if cfg.diagnostics {
            diagnostics(s)
        } else {
            Diagnostics::default()
        },
    })
}

with_avx2_twin!(step_row_best, step_row_avx2, step_row, (batch: &Batch<'_>, cfg: &StepConfig, row: usize, s: &mut Scratch) -> KernelResult<RowOutput>);

/// The step for every row of the batch.
pub fn step_batch(batch: &Batch<'_>, cfg: &StepConfig) -> KernelResult<Vec<RowOutput>> {
    let width = batch.ids_theta.ncols() + batch.ids_t.ncols();
    map_rows(batch.ids_theta.nrows(), width, |s: &mut Scratch, r| {
        step_row_best(batch, cfg, r, s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{arr2, Array2};

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
            drafts: &[],
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
    fn a_tested_draft_leaves_the_law_q_star() {
        // q* here is the teacher (α forced to 1): 0.5, 0.3, 0.2 on ids 1, 2, 3.
        let ids = arr2(&[[1i64, 2, 3]]);
        let lp_b = arr2(&[[0.5f64.ln(), 0.3f64.ln(), 0.2f64.ln()]]);
        let lp_a = arr2(&[[0.1f64.ln(), 0.1f64.ln(), 0.8f64.ln()]]);
        let n = 200_000u64;
        for draft in [1i64, 3, 9] {
            let mut counts = [0u64; 3];
            let mut accepted = 0u64;
            for pos in 0..n {
                let batch = Batch {
                    ids_theta: ids.view(),
                    logp_theta: lp_a.view(),
                    ids_t: ids.view(),
                    logp_t: lp_b.view(),
                    row_keys: &[5],
                    positions: &[pos],
                    force_teacher: &[true],
                    drafts: &[draft],
                    seed: 3,
                };
                let out = step_batch(&batch, &StepConfig::default()).unwrap()[0];
                counts[(out.token_id - 1) as usize] += 1;
                accepted += u64::from(out.accepted);
                assert!(!out.accepted || out.token_id == draft);
            }
            for (c, p) in counts.iter().zip([0.5, 0.3, 0.2]) {
                // 6 standard deviations of a binomial count
                let sd = (n as f64 * p * (1.0 - p)).sqrt();
                assert!((*c as f64 - n as f64 * p).abs() < 6.0 * sd, "draft {draft}: {counts:?}");
            }
            let p_accept = match draft {
                1 => 0.5,
                3 => 0.2,
                _ => 0.0,
            };
            let sd = (n as f64 * 0.25).sqrt();
            assert!((accepted as f64 - n as f64 * p_accept).abs() < 6.0 * sd);
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
