//! Log-space helpers shared by the kernels.

/// log Σ exp(x), −inf for an empty slice or one that is all −inf.
pub fn logsumexp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return m;
    }
    let s: f64 = xs.iter().map(|&x| (x - m).exp()).sum();
    m + s.ln()
}

/// Subtract logsumexp in place; returns the subtracted value (−inf leaves xs untouched).
pub fn normalise(xs: &mut [f64]) -> f64 {
    let z = logsumexp(xs);
    if z.is_finite() {
        for x in xs.iter_mut() {
            *x -= z;
        }
    }
    z
}

/// Log weight of π_θ^(1−α) π_t^α for one candidate, with 0·(−inf) = 0 so that the
/// endpoints α = 0 and α = 1 are exactly π_θ and π_t.
#[inline]
pub fn geometric(a: f64, b: f64, alpha: f64) -> f64 {
    if alpha <= 0.0 {
        a
    } else if alpha >= 1.0 {
        b
    } else if a == f64::NEG_INFINITY || b == f64::NEG_INFINITY {
        f64::NEG_INFINITY
    } else {
        a + alpha * (b - a)
    }
}

/// Σ p·(log p − log r) over entries with p > 0; +inf when r = 0 where p > 0.
pub fn kl(logp: &[f64], logr: &[f64]) -> f64 {
    let mut total = 0.0;
    for (&lp, &lr) in logp.iter().zip(logr) {
        if lp == f64::NEG_INFINITY {
            continue;
        }
        if lr == f64::NEG_INFINITY {
            return f64::INFINITY;
        }
        total += lp.exp() * (lp - lr);
    }
    total.max(0.0)
}

/// Shannon entropy in nats of a normalised log distribution.
pub fn entropy(logp: &[f64]) -> f64 {
    let h: f64 = logp
        .iter()
        .filter(|&&lp| lp > f64::NEG_INFINITY)
        .map(|&lp| -lp.exp() * lp)
        .sum();
    h.max(0.0)
}

/// Jensen–Shannon divergence in nats between two normalised log distributions.
pub fn js(a: &[f64], b: &[f64]) -> f64 {
    let mut total = 0.0;
    for (&la, &lb) in a.iter().zip(b) {
        let (pa, pb) = (la.exp(), lb.exp());
        let m = 0.5 * (pa + pb);
        if m <= 0.0 {
            continue;
        }
        let lm = m.ln();
        if pa > 0.0 {
            total += 0.5 * pa * (la - lm);
        }
        if pb > 0.0 {
            total += 0.5 * pb * (lb - lm);
        }
    }
    total.max(0.0)
}

/// 1 / Σ π²/q: the effective sample size (as a fraction) of q-samples weighted to π.
pub fn ess(logpi: &[f64], logq: &[f64]) -> f64 {
    let mut s = 0.0;
    for (&lp, &lq) in logpi.iter().zip(logq) {
        if lp == f64::NEG_INFINITY {
            continue;
        }
        if lq == f64::NEG_INFINITY {
            return 0.0;
        }
        s += (2.0 * lp - lq).exp();
    }
    if s > 0.0 {
        1.0 / s
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logsumexp_handles_extremes() {
        assert_eq!(logsumexp(&[]), f64::NEG_INFINITY);
        assert_eq!(logsumexp(&[f64::NEG_INFINITY; 3]), f64::NEG_INFINITY);
        assert!((logsumexp(&[-1e4, -1e4]) - (-1e4 + 2f64.ln())).abs() < 1e-9);
        assert!((logsumexp(&[0.0, f64::NEG_INFINITY]) - 0.0).abs() < 1e-15);
    }

    #[test]
    fn geometric_endpoints_are_exact() {
        let ninf = f64::NEG_INFINITY;
        assert_eq!(geometric(-1.0, ninf, 0.0), -1.0);
        assert_eq!(geometric(ninf, -2.0, 1.0), -2.0);
        assert_eq!(geometric(ninf, -2.0, 0.5), ninf);
        assert!((geometric(-1.0, -3.0, 0.25) - (-1.5)).abs() < 1e-15);
    }

    #[test]
    fn divergences_of_identical_are_zero() {
        let p = [0.5f64.ln(), 0.25f64.ln(), 0.25f64.ln()];
        assert!(kl(&p, &p).abs() < 1e-15);
        assert!(js(&p, &p).abs() < 1e-15);
        assert!((ess(&p, &p) - 1.0).abs() < 1e-12);
        assert!((entropy(&p) - 1.5 * 2f64.ln()).abs() < 1e-12);
    }
}
