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
use crate::errors::{KernelError, KernelResult};
use crate::kernels::logspace::entropy;

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

/// Validated settings of the α rule.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlphaParams {
    pub method: Method,
    pub alpha: f64,
    pub alpha_min: f64,
    pub alpha_max: f64,
    pub tol: f64,
    pub max_iter: u32,
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
        }
    }
}

/// Log-partition and moments of d under q_β ∝ exp(a + β d) on the common support.
#[derive(Clone, Copy, Debug)]
struct Moments {
    lse: f64,
    mean: f64,
    var: f64,
}

/// The common support of the two models: a and d = b − a where both are finite.
#[derive(Default, Debug)]
pub struct Support {
    a: Vec<f64>,
    d: Vec<f64>,
}

impl Support {
    /// Fill from normalised log probabilities over the same candidates.
    pub fn fill(&mut self, a: &[f64], b: &[f64]) {
        self.a.clear();
        self.d.clear();
        for (&x, &y) in a.iter().zip(b) {
            if x > f64::NEG_INFINITY && y > f64::NEG_INFINITY {
                self.a.push(x);
                self.d.push(y - x);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.a.is_empty()
    }

    fn moments(&self, beta: f64, shift: f64) -> Moments {
        let m = self
            .a
            .iter()
            .zip(&self.d)
            .fold(f64::NEG_INFINITY, |m, (&a, &d)| m.max(a + beta * d));
        let (mut w_sum, mut s1, mut s2) = (0.0, 0.0, 0.0);
        for (&a, &d) in self.a.iter().zip(&self.d) {
            let w = (a + beta * d - m).exp();
            let c = d - shift;
            w_sum += w;
            s1 += w * c;
            s2 += w * c * c;
        }
        let mean_c = s1 / w_sum;
        Moments {
            lse: m + w_sum.ln(),
            mean: shift + mean_c,
            var: (s2 / w_sum - mean_c * mean_c).max(0.0),
        }
    }

    /// The value of d when it is the same on every candidate (up to rounding).
    fn constant_d(&self) -> Option<f64> {
        let (lo, hi) = self.d.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &d| {
            (lo.min(d), hi.max(d))
        });
        let scale = 1.0 + self.a.iter().fold(0.0f64, |s, &a| s.max(a.abs()));
        (hi - lo <= 1e-12 * scale).then_some(0.5 * (lo + hi))
    }
}

/// Root of an increasing function on [0, 1] given its values at the ends (f0 < 0 < f1),
/// by Newton steps kept inside the bracket, bisecting when a step would leave it.
fn newton_in_bracket(mut f: impl FnMut(f64) -> (f64, f64), f0: f64, f1: f64, tol: f64, max_iter: u32) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    let mut x = (-f0 / (f1 - f0)).clamp(0.0, 1.0);
    for _ in 0..max_iter {
        let (fx, dfx) = f(x);
        if fx == 0.0 {
            return x;
        }
        if fx < 0.0 {
            lo = x;
        } else {
            hi = x;
        }
        let newton = x - fx / dfx;
        // A converged Newton step is taken even when rounding puts it on the bracket's edge.
        if (newton - x).abs() <= tol {
            return newton.clamp(lo, hi);
        }
        let next = if newton > lo && newton < hi { newton } else { 0.5 * (lo + hi) };
        if hi - lo <= tol {
            return next;
        }
        x = next;
    }
    x
}

fn kl_symmetry(s: &Support, p: &AlphaParams) -> f64 {
    let m0 = s.moments(0.0, 0.0);
    if m0.mean >= 0.0 {
        return 0.0;
    }
    let m1 = s.moments(1.0, m0.mean);
    if m1.mean <= 0.0 {
        return 1.0;
    }
    let mut shift = m0.mean;
    newton_in_bracket(
        |x| {
            let m = s.moments(x, shift);
            shift = m.mean;
            (m.mean, m.var)
        },
        m0.mean,
        m1.mean,
        p.tol,
        p.max_iter,
    )
}

fn ess_balance(s: &Support, p: &AlphaParams) -> f64 {
    // f(α) = A(−α) − A(2−α) is increasing; f ≤ 0 where ESS_θ ≥ ESS_t.
    let f = |x: f64| {
        let below = s.moments(-x, 0.0);
        let above = s.moments(2.0 - x, 0.0);
        (below.lse - above.lse, above.mean - below.mean)
    };
    let (f0, _) = f(0.0);
    if f0 >= 0.0 {
        return 0.0;
    }
    let (f1, _) = f(1.0);
    if f1 <= 0.0 {
        return 1.0;
    }
    newton_in_bracket(f, f0, f1, p.tol, p.max_iter)
}

fn entropy_rule(a: &[f64], b: &[f64]) -> f64 {
    let (ha, hb) = (entropy(a), entropy(b));
    if ha + hb > 0.0 {
        ha / (ha + hb)
    } else {
        0.5
    }
}

/// α by the configured rule, clamped to [alpha_min, alpha_max].
///
/// `a` and `b` are log probabilities normalised over the same candidates; entries that
/// are −inf in both are padding. `support` is scratch space.
pub fn solve(a: &[f64], b: &[f64], p: &AlphaParams, support: &mut Support) -> f64 {
    let raw = match p.method {
        Method::Fixed => p.alpha,
        Method::Entropy => entropy_rule(a, b),
        Method::KlSymmetry | Method::EssBalance => {
            support.fill(a, b);
            if support.is_empty() {
                0.5
            } else if let Some(c) = support.constant_d() {
                // Every α gives the same distribution on the common support.
                if c.abs() <= 1e-12 {
                    0.5
                } else if c > 0.0 {
                    0.0
                } else {
                    1.0
                }
            } else if p.method == Method::KlSymmetry {
                kl_symmetry(support, p)
            } else {
                ess_balance(support, p)
            }
        }
    };
    raw.clamp(p.alpha_min, p.alpha_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::logspace::{geometric, kl, normalise};

    fn norm(xs: &[f64]) -> Vec<f64> {
        let mut v = xs.to_vec();
        normalise(&mut v);
        v
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
        let alpha = solve(&a, &b, &AlphaParams::default(), &mut Support::default());
        assert!(alpha > 0.0 && alpha < 1.0);
        let q = q_at(&a, &b, alpha);
        let (k1, k2) = (kl(&q, &a), kl(&q, &b));
        assert!((k1 - k2).abs() <= 1e-9 * k1.max(k2).max(1.0), "{k1} {k2}");
    }

    #[test]
    fn identical_rows_give_half() {
        let a = norm(&[-0.5, -1.0, -2.0]);
        assert_eq!(solve(&a, &a, &AlphaParams::default(), &mut Support::default()), 0.5);
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
        let alpha = solve(&a, &b, &p, &mut Support::default());
        let q = q_at(&a, &b, alpha);
        assert!((ess(&a, &q) - ess(&b, &q)).abs() < 1e-9);
    }

    #[test]
    fn clamps_and_validates() {
        let a = norm(&[0.0, -5.0]);
        let b = norm(&[-5.0, 0.0]);
        let p = AlphaParams::new("kl_symmetry", 0.5, 0.0, 0.3, 1e-10, 100).unwrap();
        assert_eq!(solve(&a, &b, &p, &mut Support::default()), 0.3);
        assert!(AlphaParams::new("nope", 0.5, 0.0, 1.0, 1e-10, 100).is_err());
        assert!(AlphaParams::new("fixed", 0.5, 0.6, 0.5, 1e-10, 100).is_err());
        assert!(AlphaParams::new("fixed", 0.5, 0.0, 1.0, 0.0, 100).is_err());
        assert!(AlphaParams::new("fixed", 0.5, 0.0, 1.0, 1e-10, 0).is_err());
    }
}
