//! The fused step for one row: merge, exclude, temperature, normalise, stability check,
//! support constraint, α, q*, draw (docs/design.md, steps 1–9).
use std::cmp::Ordering;

use ndarray::ArrayView2;

use crate::errors::{KernelError, KernelResult};
use crate::kernels::alpha::{self, AlphaParams, Support};
use crate::kernels::logspace::{entropy, ess, geometric, js, kl, normalise_reusing, normalise_with_probs};
use crate::kernels::merge::{merge, IdTable, Merged, Missing, RowBuffers};
use crate::kernels::parallel::map_rows_into;
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

/// An inference engine's truncation of q* for one row, as vLLM's sampler applies it to
/// its distribution. Each part is off at its neutral value: `top_k` <= 0, `top_p` 1,
/// `min_p` 0.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Truncation {
    pub top_k: i64,
    pub top_p: f64,
    pub min_p: f64,
}

impl Truncation {
    pub const OFF: Truncation = Truncation {
        top_k: 0,
        top_p: 1.0,
        min_p: 0.0,
    };

    #[inline(always)]
    fn is_off(&self) -> bool {
        self.top_k <= 0 && self.top_p >= 1.0 && self.min_p <= 0.0
    }
}

/// What the caller asks of q* beyond the config: per-row truncation (each slice empty
/// when not given, else one entry per row) and how many alternatives to report.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sampling<'a> {
    pub top_k: &'a [i64],
    pub top_p: &'a [f64],
    pub min_p: &'a [f64],
    /// Per row, this many most probable candidates of the final law (0: none).
    pub alternatives: usize,
}

fn one_per_row(arg: &'static str, len: usize, rows: usize) -> KernelResult<()> {
    if len == 0 || len == rows {
        Ok(())
    } else {
        Err(KernelError::arg(
            arg,
            format!("expected one entry per row ({rows}), got {len}"),
        ))
    }
}

/// The first row whose value fails `ok`, as the argument's error.
fn each_row(arg: &'static str, values: &[f64], ok: impl Fn(f64) -> bool, range: &str) -> KernelResult<()> {
    match values.iter().position(|&v| !ok(v)) {
        Some(r) => Err(KernelError::row(
            arg,
            r,
            format!("must lie in {range}, got {}", values[r]),
        )),
        None => Ok(()),
    }
}

impl Sampling<'_> {
    /// Lengths and ranges; NaN and infinities fail the range checks.
    pub fn check(&self, rows: usize) -> KernelResult<()> {
        one_per_row("q_top_k", self.top_k.len(), rows)?;
        one_per_row("q_top_p", self.top_p.len(), rows)?;
        one_per_row("q_min_p", self.min_p.len(), rows)?;
        each_row("q_top_p", self.top_p, |p| p > 0.0 && p <= 1.0, "(0, 1]")?;
        each_row("q_min_p", self.min_p, |p| (0.0..=1.0).contains(&p), "[0, 1]")
    }

    #[inline(always)]
    fn truncation(&self, row: usize) -> Truncation {
        let off = Truncation::OFF;
        Truncation {
            top_k: self.top_k.get(row).copied().unwrap_or(off.top_k),
            top_p: self.top_p.get(row).copied().unwrap_or(off.top_p),
            min_p: self.min_p.get(row).copied().unwrap_or(off.min_p),
        }
    }
}

/// One of a row's most probable candidates under the law its token was drawn from.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Alternative {
    pub id: i64,
    pub logq: f64,
}

impl Alternative {
    /// The filler where a row has fewer candidates of positive probability than asked.
    pub const PAD: Alternative = Alternative {
        id: -1,
        logq: f64::NEG_INFINITY,
    };
}

/// The step's result: one `RowOutput` per row, and `alternatives` entries per row
/// (row-major, `Alternative::PAD` where a row has fewer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    pub rows: Vec<RowOutput>,
    pub alternatives: Vec<Alternative>,
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

/// Candidates by descending log probability, ties to the lower token id (ids are
/// unique within a row, so the order is total).
#[inline(always)]
fn more_probable<'a>(logq: &'a [f64], ids: &'a [i64]) -> impl Fn(&usize, &usize) -> Ordering + 'a {
    move |&i, &j| {
        logq[j]
            .partial_cmp(&logq[i])
            .unwrap_or(Ordering::Equal)
            .then(ids[i].cmp(&ids[j]))
    }
}

/// Keep the `n` first of `order` by `more_probable`, sorted: a selection first, so
/// that only those `n` are sorted.
#[inline(always)]
fn first_sorted(order: &mut Vec<usize>, n: usize, logq: &[f64], ids: &[i64]) {
    let by = more_probable(logq, ids);
    if n == 0 {
        order.clear();
        return;
    }
    if n < order.len() {
        order.select_nth_unstable_by(n - 1, &by);
        order.truncate(n);
    }
    order.sort_unstable_by(&by);
}

/// min_p: keep the candidates with q >= min_p · max q.
#[inline(always)]
fn keep_min_p(q: &[f64], keep: &mut [bool], min_p: f64) {
    let floor = min_p * q.iter().fold(0.0, |m: f64, &p| if p > m { p } else { m });
    for (k, &p) in keep.iter_mut().zip(q) {
        *k &= p >= floor;
    }
}

/// top_k over the kept candidates in `order`: drop what is below the k-th largest;
/// candidates tied with it all stay, and with k or fewer kept nothing goes. `order`
/// is left holding the kept candidates, in no particular order.
#[inline(always)]
fn keep_top_k(logq: &[f64], ids: &[i64], order: &mut Vec<usize>, keep: &mut [bool], top_k: i64) {
    let k = usize::try_from(top_k).unwrap_or(usize::MAX);
    if k >= order.len() {
        return;
    }
    let (_, &mut kth, _) = order.select_nth_unstable_by(k.saturating_sub(1), more_probable(logq, ids));
    let bar = logq[kth];
    for (kept, &x) in keep.iter_mut().zip(logq) {
        *kept &= x >= bar;
    }
    order.retain(|&i| keep[i]);
}

/// top_p on the kept candidates renormalised, `order` holding them most probable first:
/// from the least probable up (at equal probability the higher id first), drop each
/// while the kept mass up to and including it is at most (1 − top_p) of the kept total;
/// the most probable is never dropped.
#[inline(always)]
fn keep_top_p(q: &[f64], order: &[usize], keep: &mut [bool], top_p: f64) {
    let Some((&top, rest)) = order.split_first() else {
        return;
    };
    // Summed least probable first, the order the cumulative sums below take.
    let total: f64 = order.iter().rev().map(|&i| q[i]).sum();
    let bar = (1.0 - top_p) * total;
    let mut cum = 0.0;
    for &i in rest.iter().rev() {
        cum += q[i];
        if cum > bar {
            break;
        }
        keep[i] = false;
    }
    debug_assert!(keep[top]);
}

/// The engine's truncation of q*, in vLLM v1's order: min_p, then top_k, then top_p.
/// Dropped candidates get probability 0 and the rest are renormalised; a row that loses
/// no candidate is left exactly as it was. Only what top_k keeps is sorted (for top_p).
///
/// vLLM's source read for this (vllm-project/vllm, v1 sampler): `vllm/v1/sample/sampler.py`
/// applies temperature, then the argmax-invariant logits processors, of which min_p is
/// one (`vllm/v1/sample/logits_processor/builtin.py`: a token goes when its probability
/// is below min_p times the row's largest), then top-k and top-p together
/// (`vllm/v1/sample/ops/topk_topp_sampler.py`, `apply_top_k_top_p`): top-k masks every
/// logit below the k-th largest, so ties at the k-th value survive; top-p then takes
/// the softmax of what is left, sorted ascending, and masks the tokens whose cumulative
/// probability is at most 1 − p, always keeping the largest. Its sort is not stable, so
/// vLLM leaves the order among equal probabilities open; here it is fixed (higher id
/// dropped first) so that the twin and every run agree.
#[inline(always)]
fn truncate(s: &mut Scratch, t: Truncation) {
    let (logq, q, ids) = (&mut s.logq, &mut s.q, &s.merged.ids);
    let (order, keep) = (&mut s.order, &mut s.keep);
    keep.clear();
    keep.resize(logq.len(), true);
    if t.min_p > 0.0 {
        keep_min_p(q, keep, t.min_p);
    }
    order.clear();
    order.extend((0..logq.len()).filter(|&i| keep[i]));
    if t.top_k > 0 {
        keep_top_k(logq, ids, order, keep, t.top_k);
    }
    if t.top_p < 1.0 {
        order.sort_unstable_by(more_probable(logq, ids));
        keep_top_p(q, order, keep, t.top_p);
    }
    if keep.iter().all(|&k| k) {
        return;
    }
    for (x, &k) in logq.iter_mut().zip(keep.iter()) {
        if !k {
            *x = f64::NEG_INFINITY;
        }
    }
    // The most probable candidate is always kept, so the normaliser is finite.
    normalise_with_probs(logq, q);
}

/// The row's `out.len()` most probable candidates under the final law; candidates of
/// probability zero are not listed (`out` stays padded there).
#[inline(always)]
fn fill_alternatives(s: &mut Scratch, out: &mut [Alternative]) {
    let (logq, ids, order) = (&s.logq, &s.merged.ids, &mut s.order);
    order.clear();
    order.extend((0..logq.len()).filter(|&i| logq[i] > f64::NEG_INFINITY));
    first_sorted(order, out.len(), logq, ids);
    for (slot, &i) in out.iter_mut().zip(order.iter()) {
        *slot = Alternative {
            id: ids[i],
            logq: logq[i],
        };
    }
}

/// Steps 8b and 8c: the caller's truncation of q*, then the alternatives under the law
/// the token will be drawn from. Rows that ask for neither touch nothing.
#[inline(always)]
fn truncate_and_list(s: &mut Scratch, t: Truncation, alts: &mut [Alternative]) {
    if !t.is_off() {
        truncate(s, t);
    }
    if !alts.is_empty() {
        fill_alternatives(s, alts);
    }
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
        m.shift_a = None;
    }
    if cfg.temperature_t != 1.0 {
        m.b.iter_mut().for_each(|x| *x /= cfg.temperature_t);
        m.shift_b = None;
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
    // The merge's exponentials where still valid: the same values, half the exponentials.
    let za = normalise_reusing(&mut m.a, pa, &m.exp_a, m.shift_a);
    let zb = normalise_reusing(&mut m.b, pb, &m.exp_b, m.shift_b);
    m.forget_exps();
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

/// One row, stage by stage as in docs/design.md (section 2); `alts` receives the row's
/// alternatives (empty: none asked for).
#[inline(always)]
pub fn step_row(
    batch: &Batch<'_>,
    cfg: &StepConfig,
    sampling: &Sampling<'_>,
    row: usize,
    s: &mut Scratch,
    alts: &mut [Alternative],
) -> KernelResult<RowOutput> {
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
    // The divergences describe q* itself: before the caller's truncation and the draw
    // (a rejected draft zeroes its entry of q).
    let diagnostics = if cfg.diagnostics {
        diagnostics(s)
    } else {
        Diagnostics::default()
    };
    truncate_and_list(s, sampling.truncation(row), alts);
    let m = &s.merged;
    let (key, pos) = (batch.row_keys[row], batch.positions[row]);
    let u = uniform(batch.seed, key, pos);
    // Drafts are tested against the truncated law: a drafted token it drops has q 0 and
    // is never accepted.
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
        diagnostics,
    })
}

with_avx2_twin!(step_row_best, step_row_avx2, step_row, (batch: &Batch<'_>, cfg: &StepConfig, sampling: &Sampling<'_>, row: usize, s: &mut Scratch, alts: &mut [Alternative]) -> KernelResult<RowOutput>);

/// `rows` × `n` padding, refused rather than aborting when it cannot be allocated.
fn padded_alternatives(rows: usize, n: usize) -> KernelResult<Vec<Alternative>> {
    let too_many = || {
        KernelError::arg(
            "alternatives",
            format!("{rows} rows × {n} alternatives do not fit in memory"),
        )
    };
    let len = rows.checked_mul(n).ok_or_else(too_many)?;
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| too_many())?;
    out.resize(len, Alternative::PAD);
    Ok(out)
}

/// The step for every row of the batch, with the caller's truncation of q* and its
/// alternatives.
pub fn step_batch_with(batch: &Batch<'_>, cfg: &StepConfig, sampling: &Sampling<'_>) -> KernelResult<StepOutput> {
    let rows = batch.ids_theta.nrows();
    sampling.check(rows)?;
    let n = sampling.alternatives;
    let mut alternatives = padded_alternatives(rows, n)?;
    let width = batch.ids_theta.ncols() + batch.ids_t.ncols();
    let rows = map_rows_into(rows, width, n, &mut alternatives, |s: &mut Scratch, r, alts| {
        step_row_best(batch, cfg, sampling, r, s, alts)
    })?;
    Ok(StepOutput { rows, alternatives })
}

/// The step for every row of the batch, q* untruncated.
pub fn step_batch(batch: &Batch<'_>, cfg: &StepConfig) -> KernelResult<Vec<RowOutput>> {
    step_batch_with(batch, cfg, &Sampling::default()).map(|out| out.rows)
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

    /// Teacher probabilities for ids 1..=4; α is forced to 1, so q* is exactly these.
    const TEACHER: [f64; 4] = [0.5, 0.3, 0.15, 0.05];

    fn teacher_row() -> (Array2<i64>, Array2<f64>, Array2<f64>) {
        let ids = arr2(&[[1i64, 2, 3, 4]]);
        let lp_b = Array2::from_shape_fn((1, 4), |(_, j)| TEACHER[j].ln());
        let lp_a = arr2(&[[0.1f64.ln(), 0.2f64.ln(), 0.3f64.ln(), 0.4f64.ln()]]);
        (ids, lp_a, lp_b)
    }

    fn run_sampling(
        (ids, lp_a, lp_b): &(Array2<i64>, Array2<f64>, Array2<f64>),
        sampling: &Sampling<'_>,
        drafts: &[i64],
        pos: u64,
    ) -> KernelResult<StepOutput> {
        let rows = ids.nrows();
        let keys: Vec<u64> = (0..rows as u64).collect();
        let batch = Batch {
            ids_theta: ids.view(),
            logp_theta: lp_a.view(),
            ids_t: ids.view(),
            logp_t: lp_b.view(),
            row_keys: &keys,
            positions: &vec![pos; rows],
            force_teacher: &vec![true; rows],
            drafts,
            seed: 11,
        };
        step_batch_with(&batch, &StepConfig::default(), sampling)
    }

    fn alternatives_of(t: Truncation) -> Vec<Alternative> {
        let sampling = Sampling {
            top_k: &[t.top_k],
            top_p: &[t.top_p],
            min_p: &[t.min_p],
            alternatives: 5,
        };
        run_sampling(&teacher_row(), &sampling, &[], 0).unwrap().alternatives
    }

    fn assert_law(alts: &[Alternative], law: &[(i64, f64)]) {
        for (i, a) in alts.iter().enumerate() {
            match law.get(i) {
                Some(&(id, p)) => {
                    assert_eq!(a.id, id, "{alts:?}");
                    assert!((a.logq - p.ln()).abs() < 1e-12, "{alts:?} against {law:?}");
                }
                None => assert_eq!(*a, Alternative::PAD, "{alts:?}"),
            }
        }
    }

    #[test]
    fn truncation_by_hand() {
        let t = Truncation::OFF;
        // top_k 2 keeps 0.5 and 0.3, renormalised to 5/8 and 3/8.
        let two = [(1, 0.625), (2, 0.375)];
        assert_law(&alternatives_of(Truncation { top_k: 2, ..t }), &two);
        // min_p 0.35: the floor is 0.175, so 0.15 and 0.05 go.
        assert_law(&alternatives_of(Truncation { min_p: 0.35, ..t }), &two);
        // top_p 0.7: from the bottom, 0.05 (0.05 <= 0.3) and 0.15 (0.2 <= 0.3) go, 0.3 stays.
        assert_law(&alternatives_of(Truncation { top_p: 0.7, ..t }), &two);
        // All three, in order: min_p 0.2 drops 0.05 (floor 0.1); top_k 3 then keeps the
        // rest; top_p 0.9 over them renormalised keeps 0.15/0.95 > 0.1.
        let all = Truncation {
            top_k: 3,
            top_p: 0.9,
            min_p: 0.2,
        };
        assert_law(
            &alternatives_of(all),
            &[(1, 0.5 / 0.95), (2, 0.3 / 0.95), (3, 0.15 / 0.95)],
        );
        // top_p after top_k acts on the renormalised survivors: top_k 3 leaves
        // 0.5/0.95, 0.3/0.95, 0.15/0.95; top_p 0.8 then drops 0.158 <= 0.2.
        assert_law(
            &alternatives_of(Truncation {
                top_k: 3,
                top_p: 0.8,
                ..t
            }),
            &two,
        );
        // Untruncated, the alternatives are q* itself, padded past the 4 candidates.
        assert_law(&alternatives_of(t), &[(1, 0.5), (2, 0.3), (3, 0.15), (4, 0.05)]);
    }

    #[test]
    fn ties_follow_vllm_and_the_lower_id() {
        let ids = arr2(&[[5i64, 9, 7, 8]]);
        let lp_b = arr2(&[[0.4f64.ln(), 0.2f64.ln(), 0.2f64.ln(), 0.2f64.ln()]]);
        let row = (ids.clone(), lp_b.clone(), lp_b);
        let alts = |t: Truncation| {
            let sampling = Sampling {
                top_k: &[t.top_k],
                top_p: &[t.top_p],
                min_p: &[t.min_p],
                alternatives: 4,
            };
            run_sampling(&row, &sampling, &[], 0).unwrap().alternatives
        };
        let t = Truncation::OFF;
        // Equal probabilities listed by lower id.
        let ids_of = |a: &[Alternative]| a.iter().map(|a| a.id).collect::<Vec<_>>();
        assert_eq!(ids_of(&alts(t)), [5, 7, 8, 9]);
        // top_k 2: the three tied at the 2nd value all stay (nothing dropped).
        assert_eq!(alts(Truncation { top_k: 2, ..t }), alts(t));
        // top_p 0.7: one 0.2 must go (0.2 <= 0.3 < 0.4); the highest id goes first.
        assert_eq!(ids_of(&alts(Truncation { top_p: 0.7, ..t })), [5, 7, 8, -1]);
        // top_p 1e-17 (1 − top_p rounds to 1) keeps only the most probable, which is
        // never dropped.
        assert_eq!(ids_of(&alts(Truncation { top_p: 1e-17, ..t })), [5, -1, -1, -1]);
        assert_eq!(alts(Truncation { top_p: 1e-17, ..t })[0].logq, 0.0);
        // min_p 1 keeps what ties with the largest: here only id 5.
        assert_eq!(ids_of(&alts(Truncation { min_p: 1.0, ..t })), [5, -1, -1, -1]);
    }

    #[test]
    fn neutral_values_are_bit_identical_to_none() {
        let ids = arr2(&[[1i64, 2, 3, 4], [4, 3, 2, 1], [7, 8, -1, -1]]);
        let lp_a = arr2(&[
            [-0.3, -1.7, -2.2, -4.0],
            [-0.9, -1.1, -1.3, -3.5],
            [-0.2, -2.5, f64::NEG_INFINITY, f64::NEG_INFINITY],
        ]);
        let lp_b = arr2(&[
            [-1.2, -0.6, -2.0, -2.9],
            [-0.4, -2.1, -1.9, -3.0],
            [-1.0, -0.5, f64::NEG_INFINITY, f64::NEG_INFINITY],
        ]);
        let neutral = Sampling {
            top_k: &[0, -1, -5],
            top_p: &[1.0; 3],
            min_p: &[0.0; 3],
            alternatives: 0,
        };
        for pos in 0..50 {
            let batch = Batch {
                ids_theta: ids.view(),
                logp_theta: lp_a.view(),
                ids_t: ids.view(),
                logp_t: lp_b.view(),
                row_keys: &[0, 1, 2],
                positions: &[pos; 3],
                force_teacher: &[false; 3],
                drafts: &[2, -1, 8],
                seed: 4,
            };
            let cfg = StepConfig {
                diagnostics: true,
                ..StepConfig::default()
            };
            let plain = step_batch(&batch, &cfg).unwrap();
            let with = step_batch_with(&batch, &cfg, &neutral).unwrap();
            assert!(with.alternatives.is_empty());
            for (x, y) in plain.iter().zip(&with.rows) {
                assert_eq!(format!("{x:?}"), format!("{y:?}"));
                assert_eq!(x.logq.to_bits(), y.logq.to_bits());
                assert_eq!(x.alpha.to_bits(), y.alpha.to_bits());
            }
        }
    }

    #[test]
    fn drafts_meet_the_truncated_law() {
        // top_k 2 leaves ids 1 and 2 at 5/8 and 3/8.
        let row = teacher_row();
        let sampling = Sampling {
            top_k: &[2],
            ..Sampling::default()
        };
        let n = 100_000u64;
        for draft in [-1i64, 1, 3] {
            let mut counts = [0u64; 4];
            let mut accepted = 0u64;
            for pos in 0..n {
                let out = run_sampling(&row, &sampling, &[draft], pos).unwrap().rows[0];
                counts[(out.token_id - 1) as usize] += 1;
                accepted += u64::from(out.accepted);
                let p: f64 = if out.token_id == 1 { 0.625 } else { 0.375 };
                assert!((out.logq - p.ln()).abs() < 1e-12);
            }
            assert_eq!(counts[2] + counts[3], 0, "draft {draft}: {counts:?}");
            let sd = (n as f64 * 0.625 * 0.375).sqrt();
            assert!(
                (counts[0] as f64 - n as f64 * 0.625).abs() < 6.0 * sd,
                "draft {draft}: {counts:?}"
            );
            // A drafted token truncation dropped is never accepted; id 1 is, at q(1) = 5/8.
            let expected = if draft == 1 { 0.625 } else { 0.0 };
            assert!(
                (accepted as f64 - n as f64 * expected).abs() < 6.0 * sd,
                "draft {draft}: {accepted}"
            );
        }
    }

    #[test]
    fn bad_truncation_names_the_argument() {
        let row = teacher_row();
        let err = |sampling: Sampling<'_>| match run_sampling(&row, &sampling, &[], 0) {
            Err(KernelError::Input { arg, row, .. }) => (arg, row),
            other => panic!("{other:?}"),
        };
        let none = Sampling::default();
        assert_eq!(err(Sampling { top_k: &[1, 2], ..none }), ("q_top_k", None));
        assert_eq!(err(Sampling { top_p: &[0.0], ..none }), ("q_top_p", Some(0)));
        assert_eq!(
            err(Sampling {
                top_p: &[f64::NAN],
                ..none
            }),
            ("q_top_p", Some(0))
        );
        assert_eq!(err(Sampling { top_p: &[1.5], ..none }), ("q_top_p", Some(0)));
        assert_eq!(err(Sampling { min_p: &[1.5], ..none }), ("q_min_p", Some(0)));
        assert_eq!(err(Sampling { min_p: &[-0.1], ..none }), ("q_min_p", Some(0)));
        assert_eq!(
            err(Sampling {
                min_p: &[f64::INFINITY],
                ..none
            }),
            ("q_min_p", Some(0))
        );
        assert_eq!(
            err(Sampling {
                alternatives: usize::MAX,
                ..none
            }),
            ("alternatives", None)
        );
    }

    #[test]
    fn a_batch_row_is_its_own_run() {
        // Enough rows for the parallel path: each row's output and alternatives are what
        // that row alone gives.
        let rows = 2500;
        let ids = Array2::from_shape_fn((rows, 8), |(r, j)| ((r * 7 + j * 3) % 40) as i64);
        let lp = Array2::from_shape_fn((rows, 8), |(r, j)| -0.3 * (j as f64 + 1.0) - 0.01 * (r % 13) as f64);
        let top_k: Vec<i64> = (0..rows as i64).map(|r| r % 5).collect();
        let top_p: Vec<f64> = (0..rows).map(|r| 1.0 - (r % 4) as f64 * 0.2).collect();
        let sampling = Sampling {
            top_k: &top_k,
            top_p: &top_p,
            min_p: &[],
            alternatives: 3,
        };
        let all = run_sampling(&(ids.clone(), lp.clone(), lp.clone()), &sampling, &[], 3).unwrap();
        for r in (0..rows).step_by(97) {
            let one = (
                ids.slice(ndarray::s![r..=r, ..]).to_owned(),
                lp.slice(ndarray::s![r..=r, ..]).to_owned(),
                lp.slice(ndarray::s![r..=r, ..]).to_owned(),
            );
            let alone = Sampling {
                top_k: &top_k[r..=r],
                top_p: &top_p[r..=r],
                min_p: &[],
                alternatives: 3,
            };
            let batch = Batch {
                ids_theta: one.0.view(),
                logp_theta: one.1.view(),
                ids_t: one.0.view(),
                logp_t: one.2.view(),
                row_keys: &[r as u64],
                positions: &[3],
                force_teacher: &[true],
                drafts: &[],
                seed: 11,
            };
            let single = step_batch_with(&batch, &StepConfig::default(), &alone).unwrap();
            assert_eq!(single.rows[0], all.rows[r]);
            assert_eq!(single.alternatives[..], all.alternatives[3 * r..3 * r + 3]);
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
