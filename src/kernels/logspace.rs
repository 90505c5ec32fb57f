//! Log-space helpers shared by the kernels.
//!
//! Sums and maxima run over four independent lanes so the compiler can keep them in
//! SIMD registers (a single running float sum cannot be reordered, so it stays scalar).
use crate::kernels::fastexp::exp;

const LANES: usize = 4;

/// Largest element (−inf for an empty slice).
#[inline(always)]
pub fn max(xs: &[f64]) -> f64 {
    let mut acc = [f64::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Σ xs over four lanes.
#[inline(always)]
pub fn sum(xs: &[f64]) -> f64 {
    let mut acc = [0.0; LANES];
    let chunks = xs.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + rest.iter().sum::<f64>()
}

/// exp(x − shift) for each x, into `out` (a plain map, so it vectorises).
#[inline(always)]
pub fn exp_shifted(xs: &[f64], shift: f64, out: &mut Vec<f64>) {
    // An explicit loop rather than `extend`: `extend` is a separate generic function that
    // is not inlined into the AVX2 caller, so it would run as baseline code.
    out.resize(xs.len(), 0.0);
    for (o, &x) in out.iter_mut().zip(xs) {
        *o = exp(x - shift);
    }
}

/// Subtract log Σ exp(x) in place and write the probabilities exp(x) into `probs`;
/// returns the subtracted value (−inf, leaving xs untouched, when every x is −inf).
#[inline(always)]
pub fn normalise_with_probs(xs: &mut [f64], probs: &mut Vec<f64>) -> f64 {
    let m = max(xs);
    if m == f64::NEG_INFINITY {
        probs.clear();
        probs.resize(xs.len(), 0.0);
        return m;
    }
    exp_shifted(xs, m, probs);
    let s = sum(probs);
    let z = m + s.ln();
    let inv = 1.0 / s;
    for (x, p) in xs.iter_mut().zip(probs.iter_mut()) {
        *x -= z;
        *p *= inv;
    }
    z
}

/// `normalise_with_probs`, taking exp(x − shift) from `known` instead of computing it
/// when `shift` is the maximum of `xs` (bit for bit, so the exponentials are the very
/// ones it would take, and the result is the same to the last bit).
#[inline(always)]
pub fn normalise_reusing(xs: &mut [f64], probs: &mut Vec<f64>, known: &[f64], shift: Option<f64>) -> f64 {
    let m = max(xs);
    let reuse = shift.is_some_and(|s| s.to_bits() == m.to_bits()) && known.len() == xs.len();
    if !reuse || m == f64::NEG_INFINITY {
        return normalise_with_probs(xs, probs);
    }
    probs.clear();
    probs.extend_from_slice(known);
    let s = sum(probs);
    let z = m + s.ln();
    let inv = 1.0 / s;
    for (x, p) in xs.iter_mut().zip(probs.iter_mut()) {
        *x -= z;
        *p *= inv;
    }
    z
}

/// Log weight of π_θ^(1−α) π_t^α for one candidate, with 0·(−inf) = 0 so that the
/// endpoints α = 0 and α = 1 are exactly π_θ and π_t.
#[inline(always)]
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

/// `x` clamped at zero, always +0.0 there (and for NaN): `f64::max` may return either
/// zero for −0.0, and which one depends on the build, which records would show.
#[inline]
pub fn non_negative(x: f64) -> f64 {
    if x > 0.0 {
        x
    } else {
        0.0
    }
}

/// Σ p·(log p − log r) over entries with p > 0 (given as logs and probabilities);
/// +inf when r = 0 where p > 0.
pub fn kl(logp: &[f64], p: &[f64], logr: &[f64]) -> f64 {
    let mut total = 0.0;
    for i in 0..logp.len() {
        if logp[i] == f64::NEG_INFINITY {
            continue;
        }
        if logr[i] == f64::NEG_INFINITY {
            return f64::INFINITY;
        }
        total += p[i] * (logp[i] - logr[i]);
    }
    non_negative(total)
}

/// Shannon entropy in nats of a normalised distribution, as logs and probabilities.
pub fn entropy(logp: &[f64], p: &[f64]) -> f64 {
    let h: f64 = logp
        .iter()
        .zip(p)
        .filter(|(&lp, _)| lp > f64::NEG_INFINITY)
        .map(|(&lp, &pi)| -pi * lp)
        .sum();
    non_negative(h)
}

/// Jensen–Shannon divergence in nats between two normalised distributions, given both
/// as logs and as probabilities (the step has both, so no exponential is needed).
pub fn js(a: &[f64], b: &[f64], pa: &[f64], pb: &[f64]) -> f64 {
    let mut total = 0.0;
    for i in 0..a.len() {
        let m = 0.5 * (pa[i] + pb[i]);
        if m <= 0.0 {
            continue;
        }
        let lm = m.ln();
        if pa[i] > 0.0 {
            total += 0.5 * pa[i] * (a[i] - lm);
        }
        if pb[i] > 0.0 {
            total += 0.5 * pb[i] * (b[i] - lm);
        }
    }
    non_negative(total)
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
        s += exp(2.0 * lp - lq);
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
    fn non_negative_is_positive_zero_at_and_below_zero() {
        for x in [-0.0, 0.0, -1e-300, f64::NAN, -f64::INFINITY] {
            assert_eq!(non_negative(x).to_bits(), 0.0f64.to_bits(), "{x}");
        }
        assert_eq!(non_negative(2.5), 2.5);
        assert_eq!(non_negative(f64::INFINITY), f64::INFINITY);
        // entropy of a point mass: every term is -1·0 = -0.0
        assert_eq!(entropy(&[0.0], &[1.0]).to_bits(), 0.0f64.to_bits());
    }

    #[test]
    fn normaliser_handles_extremes() {
        let lse = |xs: &[f64]| normalise_with_probs(&mut xs.to_vec(), &mut Vec::new());
        assert_eq!(lse(&[]), f64::NEG_INFINITY);
        assert_eq!(lse(&[f64::NEG_INFINITY; 3]), f64::NEG_INFINITY);
        assert!((lse(&[-1e4, -1e4]) - (-1e4 + 2f64.ln())).abs() < 1e-9);
        assert!((lse(&[0.0, f64::NEG_INFINITY]) - 0.0).abs() < 1e-15);
        let xs: Vec<f64> = (0..11).map(|i| -f64::from(i) * 0.7).collect();
        let naive = xs.iter().map(|x| x.exp()).sum::<f64>().ln();
        assert!((lse(&xs) - naive).abs() < 1e-14);
    }

    #[test]
    fn probabilities_match_normalised_logs() {
        let mut xs = vec![-0.3, -2.0, f64::NEG_INFINITY, -7.5, -1.0];
        let mut probs = Vec::new();
        normalise_with_probs(&mut xs, &mut probs);
        for (x, p) in xs.iter().zip(&probs) {
            assert!((x.exp() - p).abs() < 1e-15);
        }
        assert!((sum(&probs) - 1.0).abs() < 1e-15);
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
        let probs: Vec<f64> = p.iter().map(|x| x.exp()).collect();
        assert!(kl(&p, &probs, &p).abs() < 1e-15);
        assert!(js(&p, &p, &probs, &probs).abs() < 1e-15);
        assert!((ess(&p, &p) - 1.0).abs() < 1e-12);
        assert!((entropy(&p, &probs) - 1.5 * 2f64.ln()).abs() < 1e-12);
    }
}
