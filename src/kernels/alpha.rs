//! Choosing α, the weight on the teacher, for one position.
//!
//! Design notes. On the support S where both models are positive, write d = b − a and
//! A(β) = log Σ_S exp(a + β d). A is convex with A′ = E_q[d] and A″ = Var_q[d], and
//! KL(q‖π_θ) − KL(q‖π_t) = A′(α), so the `kl_symmetry` rule is the root of A′ on [0, 1].
//! Bisection to 1e-10 costs ~34 sweeps over the candidates; Newton from the secant guess
//! KL(π_θ‖π_t) / (KL(π_θ‖π_t) + KL(π_t‖π_θ)), kept inside a shrinking bracket, takes a
//! handful. Each sweep accumulates the weight sum and moments shifted by the previous
//! mean (so the variance does not cancel catastrophically). `ess_balance` reuses the
//! same machinery: ESS_θ(q_α) = exp(−A(α) − A(−α)) and ESS_t(q_α) = exp(−A(α) − A(2−α)),
//! so ESS_θ = ESS_t where A(−α) = A(2−α), a monotone equation in α.
//!
//! Plain bisection on the same function and bracket stays available (`Solver::Bisect`),
//! only as the baseline that benches and tests put beside the Halley solver: both stop
//! once the root is known to `tol`, so they agree to within it.
use crate::errors::{KernelError, KernelResult};
use crate::kernels::fastexp::exp;
use crate::kernels::logspace::{entropy, max, non_negative};

/// The rule that picks α at each position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    KlSymmetry,
    Fixed,
    Entropy,
    EssBalance,
}

impl Method {
    pub fn parse(name: &str) -> KernelResult<Self> {
        match name {
            "kl_symmetry" => Ok(Method::KlSymmetry),
            "fixed" => Ok(Method::Fixed),
            "entropy" => Ok(Method::Entropy),
            "ess_balance" => Ok(Method::EssBalance),
            other => Err(KernelError::arg(
                "method",
                format!("unknown method {other:?}; expected one of \"kl_symmetry\", \"fixed\", \"entropy\", \"ess_balance\""),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::KlSymmetry => "kl_symmetry",
            Method::Fixed => "fixed",
            Method::Entropy => "entropy",
            Method::EssBalance => "ess_balance",
        }
    }
}

/// How the root of the `kl_symmetry` and `ess_balance` equations is found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Solver {
    /// Halley steps from a Hermite guess inside a shrinking bracket (the default).
    #[default]
    Halley,
    /// Plain bisection of [0, 1] to `tol`: ~34 sweeps at 1e-10, the baseline.
    Bisect,
}

impl Solver {
    pub fn parse(name: &str) -> KernelResult<Self> {
        match name {
            "halley" => Ok(Solver::Halley),
            "bisect" => Ok(Solver::Bisect),
            other => Err(KernelError::arg(
                "solver",
                format!("unknown solver {other:?}; expected \"halley\" or \"bisect\""),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Solver::Halley => "halley",
            Solver::Bisect => "bisect",
        }
    }
}

/// Validated settings of the α rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlphaParams {
    pub method: Method,
    pub alpha: f64,
    pub alpha_min: f64,
    pub alpha_max: f64,
    pub tol: f64,
    pub max_iter: u32,
    pub solver: Solver,
}

fn unit_interval(arg: &'static str, value: f64) -> KernelResult<f64> {
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(KernelError::arg(arg, format!("must lie in [0, 1], got {value}")))
    }
}

impl AlphaParams {
    pub fn new(
        method: &str,
        alpha: f64,
        alpha_min: f64,
        alpha_max: f64,
        tol: f64,
        max_iter: i64,
    ) -> KernelResult<Self> {
        let method = Method::parse(method)?;
        let alpha = unit_interval("alpha", alpha)?;
        let alpha_min = unit_interval("alpha_min", alpha_min)?;
        let alpha_max = unit_interval("alpha_max", alpha_max)?;
        if alpha_min > alpha_max {
            return Err(KernelError::arg(
                "alpha_min",
                format!("alpha_min ({alpha_min}) is greater than alpha_max ({alpha_max})"),
            ));
        }
        if !(tol > 0.0 && tol.is_finite()) {
            return Err(KernelError::arg(
                "tol",
                format!("must be a positive finite number, got {tol}"),
            ));
        }
        if max_iter < 1 || max_iter > i64::from(u32::MAX) {
            return Err(KernelError::arg(
                "max_iter",
                format!("must be at least 1, got {max_iter}"),
            ));
        }
        Ok(AlphaParams {
            method,
            alpha,
            alpha_min,
            alpha_max,
            tol,
            max_iter: max_iter as u32,
            solver: Solver::Halley,
        })
    }
}

impl Default for AlphaParams {
    fn default() -> Self {
        AlphaParams {
            method: Method::KlSymmetry,
            alpha: 0.5,
            alpha_min: 0.0,
            alpha_max: 1.0,
            tol: 1e-10,
            max_iter: 100,
            solver: Solver::Halley,
        }
    }
}

/// Log-partition and moments of d under q_β ∝ exp(a + β d) on the common support.
#[derive(Clone, Copy, Debug)]
struct Moments {
    lse: f64,
    mean: f64,
    var: f64,
    /// Third central moment: A‴(β).
    skew: f64,
}

const LANES: usize = 4;

/// The common support of the two models: a and d = b − a where both are positive,
/// with the mean and variance of d under each model there (α = 0 and α = 1).
#[derive(Default, Debug)]
pub struct Support {
    a: Vec<f64>,
    d: Vec<f64>,
    ends: [(f64, f64); 2],
    /// The value of d when it is the same on every candidate.
    constant: Option<f64>,
    w: Vec<f64>,
}

impl Support {
    /// Fill from normalised log probabilities over the same candidates and their
    /// probabilities (so the two ends need no exponentials).
    #[inline(always)]
    pub fn fill(&mut self, a: &[f64], b: &[f64], pa: &[f64], pb: &[f64]) {
        self.a.clear();
        self.d.clear();
        let (mut wa, mut wad, mut wb, mut wbd) = (0.0, 0.0, 0.0, 0.0);
        let (mut dmin, mut dmax, mut amax) = (f64::INFINITY, f64::NEG_INFINITY, 0.0f64);
        for i in 0..a.len() {
            if a[i] > f64::NEG_INFINITY && b[i] > f64::NEG_INFINITY {
                let d = b[i] - a[i];
                self.a.push(a[i]);
                self.d.push(d);
                wa += pa[i];
                wad += pa[i] * d;
                wb += pb[i];
                wbd += pb[i] * d;
                dmin = dmin.min(d);
                dmax = dmax.max(d);
                amax = amax.max(a[i].abs());
            }
        }
        let (ma, mb) = (wad / wa, wbd / wb);
        let (mut va, mut vb) = (0.0, 0.0);
        for i in 0..a.len() {
            if a[i] > f64::NEG_INFINITY && b[i] > f64::NEG_INFINITY {
                let d = b[i] - a[i];
                va += pa[i] * (d - ma) * (d - ma);
                vb += pb[i] * (d - mb) * (d - mb);
            }
        }
        self.ends = [(ma, va / wa), (mb, vb / wb)];
        // d is constant (up to rounding) when every α gives the same distribution.
        self.constant = (dmax - dmin <= 1e-12 * (1.0 + amax)).then_some(0.5 * (dmin + dmax));
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }

    #[inline(always)]
    fn moments(&mut self, beta: f64, shift: f64) -> Moments {
        let w = &mut self.w;
        w.resize(self.a.len(), 0.0);
        for ((o, &a), &d) in w.iter_mut().zip(&self.a).zip(&self.d) {
            *o = a + beta * d;
        }
        let m = max(w);
        for x in w.iter_mut() {
            *x = exp(*x - m);
        }
        let mut acc = [[0.0; LANES]; 4];
        let (wc, dc) = (w.chunks_exact(LANES), self.d.chunks_exact(LANES));
        let (w_rest, d_rest) = (wc.remainder(), dc.remainder());
        for (wq, dq) in wc.zip(dc) {
            for l in 0..LANES {
                let c = dq[l] - shift;
                let x = wq[l] * c;
                acc[0][l] += wq[l];
                acc[1][l] += x;
                acc[2][l] += x * c;
                acc[3][l] += x * c * c;
            }
        }
        let mut s = acc.map(|lanes| (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]));
        for (&wi, &d) in w_rest.iter().zip(d_rest) {
            let c = d - shift;
            s[0] += wi;
            s[1] += wi * c;
            s[2] += wi * c * c;
            s[3] += wi * c * c * c;
        }
        let (e1, e2, e3) = (s[1] / s[0], s[2] / s[0], s[3] / s[0]);
        Moments {
            lse: m + s[0].ln(),
            mean: shift + e1,
            var: non_negative(e2 - e1 * e1),
            skew: e3 - 3.0 * e1 * e2 + 2.0 * e1 * e1 * e1,
        }
    }
}

/// Root in [0, 1] of the cubic that matches g and g′ at both ends (Hermite), a cheap
/// and usually close first guess for the Chernoff point.
fn hermite_guess(g0: f64, v0: f64, g1: f64, v1: f64) -> f64 {
    let h = |t: f64| {
        let (t2, t3) = (t * t, t * t * t);
        let val =
            (2.0 * t3 - 3.0 * t2 + 1.0) * g0 + (t3 - 2.0 * t2 + t) * v0 + (3.0 * t2 - 2.0 * t3) * g1 + (t3 - t2) * v1;
        let der = (6.0 * t2 - 6.0 * t) * (g0 - g1) + (3.0 * t2 - 4.0 * t + 1.0) * v0 + (3.0 * t2 - 2.0 * t) * v1;
        (val, der)
    };
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut t = -g0 / (g1 - g0);
    for _ in 0..40 {
        let (val, der) = h(t);
        if val < 0.0 {
            lo = t;
        } else {
            hi = t;
        }
        let next = t - val / der;
        let next = if next > lo && next < hi { next } else { 0.5 * (lo + hi) };
        // The cubic's root is only a guess, typically 1e-3 from the Chernoff point, so
        // solving it far below that buys nothing: Halley's first step from it lands within
        // ~1e-8 either way. Stopping at 1e-7 (rather than 1e-12) took ~9 Newton steps
        // down to ~3, and no longer runs into the cap where rounding made the last
        // steps cycle (about 2% of rows).
        if (next - t).abs() < 1e-7 {
            return next;
        }
        t = next;
    }
    t
}

/// Root of an increasing function on [0, 1] with f(0) < 0 < f(1), from `x0`, by
/// Halley steps (Newton where Halley's denominator misbehaves) kept inside a shrinking
/// bracket, bisecting when a step would leave it. `f` returns (f, f′, f″).
#[inline(always)]
fn halley_in_bracket(mut f: impl FnMut(f64) -> (f64, f64, f64), x0: f64, tol: f64, max_iter: u32) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut x = x0.clamp(0.0, 1.0);
    let halley_done = 0.01 * tol.cbrt();
    for _ in 0..max_iter {
        let (fx, d1, d2) = f(x);
        if fx == 0.0 {
            return x;
        }
        if fx < 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        let newton = -fx / d1;
        let denom = 2.0 * d1 * d1 - fx * d2;
        let halley = -2.0 * fx * d1 / denom;
        // Trust Halley only where it agrees with Newton (near the root the two steps
        // coincide); on a flat stretch far from the root f′ and f″ are both tiny and
        // Halley's step can be tiny too while Newton's rightly is huge.
        let ratio = halley / newton;
        let use_halley = denom > 0.0 && ratio.is_finite() && (0.5..=2.0).contains(&ratio);
        let step = if use_halley { halley } else { newton };
        let target = x + step;
        // A converged step is taken even when rounding puts it on the bracket's edge.
        // Halley's error after a step of size s is O(s³), so once Newton's step (the
        // distance to the root, to first order) is below 0.01·tol^(1/3) the Halley step
        // lands well within tol without another sweep to confirm it.
        if newton.abs() <= tol || (use_halley && newton.abs() <= halley_done) {
            return target.clamp(lo, hi);
        }
        let next = if target > lo && target < hi {
            target
        } else {
            0.5 * (lo + hi)
        };
        if hi - lo <= tol {
            return next;
        }
        x = next;
    }
    x
}

/// Root of an increasing function on [0, 1] with f(0) < 0 < f(1) by halving the bracket
/// until it is `tol` wide (or `max_iter` halvings), the midpoint of what is left. Only the
/// sign of f is used.
#[inline(always)]
fn bisect(mut f: impl FnMut(f64) -> f64, tol: f64, max_iter: u32) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..max_iter {
        if hi - lo <= tol {
            break;
        }
        let mid = 0.5 * (lo + hi);
        let fx = f(mid);
        if fx == 0.0 {
            return mid;
        }
        if fx < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

#[inline(always)]
fn kl_symmetry(s: &mut Support, p: &AlphaParams, sweeps: &mut u32) -> f64 {
    let [(g0, v0), (g1, v1)] = s.ends;
    if g0 >= 0.0 {
        return 0.0;
    }
    if g1 <= 0.0 {
        return 1.0;
    }
    if p.solver == Solver::Bisect {
        // Centred on the previous mean, as the Halley sweeps are.
        let mut shift = 0.5 * (g0 + g1);
        return bisect(
            #[inline(always)]
            |x| {
                *sweeps += 1;
                let m = s.moments(x, shift);
                shift = m.mean;
                m.mean
            },
            p.tol,
            p.max_iter,
        );
    }
    let mut shift = hermite_guess(g0, v0, g1, v1);
    let x0 = shift;
    shift = g0 + (g1 - g0) * x0; // a rough mean of d at x0, to centre the sums
    halley_in_bracket(
        #[inline(always)]
        |x| {
            *sweeps += 1;
            let m = s.moments(x, shift);
            shift = m.mean;
            (m.mean, m.var, m.skew)
        },
        x0,
        p.tol,
        p.max_iter,
    )
}

/// f(α) = A(−α) − A(2−α) and its two derivatives: increasing, ≤ 0 where ESS_θ ≥ ESS_t.
#[inline(always)]
fn ess_gap(s: &mut Support, x: f64) -> (f64, f64, f64) {
    let below = s.moments(-x, 0.0);
    let above = s.moments(2.0 - x, 0.0);
    (below.lse - above.lse, above.mean - below.mean, below.var - above.var)
}

#[inline(always)]
fn ess_balance(s: &mut Support, p: &AlphaParams, sweeps: &mut u32) -> f64 {
    *sweeps += 1;
    let (f0, ..) = ess_gap(s, 0.0);
    if f0 >= 0.0 {
        return 0.0;
    }
    *sweeps += 1;
    let (f1, ..) = ess_gap(s, 1.0);
    if f1 <= 0.0 {
        return 1.0;
    }
    if p.solver == Solver::Bisect {
        return bisect(
            #[inline(always)]
            |x| {
                *sweeps += 1;
                ess_gap(s, x).0
            },
            p.tol,
            p.max_iter,
        );
    }
    halley_in_bracket(
        #[inline(always)]
        |x| {
            *sweeps += 1;
            ess_gap(s, x)
        },
        -f0 / (f1 - f0),
        p.tol,
        p.max_iter,
    )
}

fn entropy_rule(a: &[f64], b: &[f64], pa: &[f64], pb: &[f64]) -> f64 {
    let (ha, hb) = (entropy(a, pa), entropy(b, pb));
    if ha + hb > 0.0 {
        ha / (ha + hb)
    } else {
        0.5
    }
}

/// α by the configured rule, clamped to [alpha_min, alpha_max].
///
/// `a` and `b` are log probabilities normalised over the same candidates, `pa` and `pb`
/// their exponentials; entries that are −inf in both are padding. `support` is scratch.
#[inline(always)]
pub fn solve(a: &[f64], b: &[f64], pa: &[f64], pb: &[f64], p: &AlphaParams, support: &mut Support) -> f64 {
    solve_counted(a, b, pa, pb, p, support).0
}

/// `solve`, and how many sweeps over the common support it took (one per evaluation of
/// the root's equation; `ess_balance` evaluates two log-partitions in each): what the
/// Halley solver saves over bisection, for tests and benches.
#[inline(always)]
pub fn solve_counted(
    a: &[f64],
    b: &[f64],
    pa: &[f64],
    pb: &[f64],
    p: &AlphaParams,
    support: &mut Support,
) -> (f64, u32) {
    let mut sweeps = 0;
    let raw = match p.method {
        Method::Fixed => p.alpha,
        Method::Entropy => entropy_rule(a, b, pa, pb),
        Method::KlSymmetry | Method::EssBalance => {
            support.fill(a, b, pa, pb);
            if support.is_empty() {
                0.5
            } else if let Some(c) = support.constant {
                // Every α gives the same distribution on the common support.
                if c.abs() <= 1e-12 {
                    0.5
                } else if c > 0.0 {
                    0.0
                } else {
                    1.0
                }
            } else if p.method == Method::KlSymmetry {
                kl_symmetry(support, p, &mut sweeps)
            } else {
                ess_balance(support, p, &mut sweeps)
            }
        }
    };
    (raw.clamp(p.alpha_min, p.alpha_max), sweeps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::logspace::{geometric, kl, normalise_with_probs};

    fn norm(xs: &[f64]) -> Vec<f64> {
        let mut v = xs.to_vec();
        normalise_with_probs(&mut v, &mut Vec::new());
        v
    }

    fn solve_on(a: &[f64], b: &[f64], p: &AlphaParams) -> f64 {
        let pa: Vec<f64> = a.iter().map(|x| x.exp()).collect();
        let pb: Vec<f64> = b.iter().map(|x| x.exp()).collect();
        solve(a, b, &pa, &pb, p, &mut Support::default())
    }

    fn q_at(a: &[f64], b: &[f64], alpha: f64) -> Vec<f64> {
        norm(
            &a.iter()
                .zip(b)
                .map(|(&x, &y)| geometric(x, y, alpha))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn kl_symmetry_equalises_kls() {
        let a = norm(&[-0.1, -2.0, -3.5, -7.0, -1.2]);
        let b = norm(&[-3.0, -0.2, -1.0, -2.0, -9.0]);
        let alpha = solve_on(&a, &b, &AlphaParams::default());
        assert!(alpha > 0.0 && alpha < 1.0);
        let q = q_at(&a, &b, alpha);
        let pq: Vec<f64> = q.iter().map(|x| x.exp()).collect();
        let (k1, k2) = (kl(&q, &pq, &a), kl(&q, &pq, &b));
        assert!((k1 - k2).abs() <= 1e-9 * k1.max(k2).max(1.0), "{k1} {k2}");
    }

    #[test]
    fn identical_rows_give_half() {
        let a = norm(&[-0.5, -1.0, -2.0]);
        assert_eq!(solve_on(&a, &a, &AlphaParams::default()), 0.5);
    }

    #[test]
    fn ess_balance_equalises_ess() {
        use crate::kernels::logspace::ess;
        let a = norm(&[-0.1, -2.0, -3.5, -7.0]);
        let b = norm(&[-3.0, -0.2, -1.0, -2.0]);
        let p = AlphaParams {
            method: Method::EssBalance,
            ..AlphaParams::default()
        };
        let alpha = solve_on(&a, &b, &p);
        let q = q_at(&a, &b, alpha);
        assert!((ess(&a, &q) - ess(&b, &q)).abs() < 1e-9);
    }

    #[test]
    fn halley_agrees_with_bisection_in_far_fewer_sweeps() {
        let (mut halley_sweeps, mut bisect_sweeps) = (0, 0);
        // Deterministic rows of different shapes: a few scales and offsets of two curves.
        for r in 0..200u32 {
            let n = 3 + (r % 40) as usize;
            let scale = 0.2 + f64::from(r % 13);
            let raw_a: Vec<f64> = (0..n)
                .map(|i| -scale * ((i as f64 * 0.7 + f64::from(r)).sin() + 1.0))
                .collect();
            let raw_b: Vec<f64> = (0..n)
                .map(|i| -scale * ((i as f64 * 1.3 - f64::from(r)).cos() + 1.0))
                .collect();
            let (a, b) = (norm(&raw_a), norm(&raw_b));
            let pa: Vec<f64> = a.iter().map(|x| x.exp()).collect();
            let pb: Vec<f64> = b.iter().map(|x| x.exp()).collect();
            for method in [Method::KlSymmetry, Method::EssBalance] {
                let halley = AlphaParams {
                    method,
                    tol: 1e-13,
                    ..AlphaParams::default()
                };
                let bisect = AlphaParams {
                    solver: Solver::Bisect,
                    ..halley
                };
                let mut support = Support::default();
                let (x, nh) = solve_counted(&a, &b, &pa, &pb, &halley, &mut support);
                let (y, nb) = solve_counted(&a, &b, &pa, &pb, &bisect, &mut support);
                assert!((x - y).abs() <= 1e-12, "row {r} {method:?}: {x} against {y}");
                if method == Method::KlSymmetry {
                    halley_sweeps += nh;
                    bisect_sweeps += nb;
                }
            }
        }
        assert!(
            bisect_sweeps > 0 && halley_sweeps * 8 < bisect_sweeps,
            "{halley_sweeps} against {bisect_sweeps}"
        );
        assert!(Solver::parse("brent").is_err());
        assert_eq!(Solver::parse("bisect").map(Solver::name).ok(), Some("bisect"));
    }

    #[test]
    fn clamps_and_validates() {
        let a = norm(&[0.0, -5.0]);
        let b = norm(&[-5.0, 0.0]);
        let p = AlphaParams::new("kl_symmetry", 0.5, 0.0, 0.3, 1e-10, 100).unwrap();
        assert_eq!(solve_on(&a, &b, &p), 0.3);
        assert!(AlphaParams::new("nope", 0.5, 0.0, 1.0, 1e-10, 100).is_err());
        assert!(AlphaParams::new("fixed", 0.5, 0.6, 0.5, 1e-10, 100).is_err());
        assert!(AlphaParams::new("fixed", 0.5, 0.0, 1.0, 0.0, 100).is_err());
        assert!(AlphaParams::new("fixed", 0.5, 0.0, 1.0, 1e-10, 0).is_err());
    }
}
