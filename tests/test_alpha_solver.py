"""The Halley root solver of α against plain bisection of the same equation: the same
α to within the tolerance, in a small fraction of the sweeps over the candidates.

Bisection is reachable only through the private `_core._solve_alpha_sweeps` (and
`_core._with_alpha_solver` for `step`), which the benches use for their baseline.
"""

from __future__ import annotations

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import _core
from dualsample_rs.synthetic import topk_pair

NEG = -np.inf


def _random_rows(rows: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of every kind the solver meets: random scales, peaked rows, nearly equal
    rows, nearly disjoint supports (-inf in one model), identical rows and padding."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((rows, n)) * rng.uniform(0.1, 30.0, size=(rows, 1))
    b = rng.standard_normal((rows, n)) * rng.uniform(0.1, 30.0, size=(rows, 1))
    kind = rng.integers(0, 6, size=rows)
    for r in range(rows):
        if kind[r] == 1:  # peaked: one candidate holds nearly all the mass of one model
            a[r, rng.integers(n)] += 60.0
        elif kind[r] == 2:  # nearly equal rows: an ill-conditioned root
            b[r] = a[r] + rng.standard_normal(n) * rng.uniform(1e-3, 0.3)
        elif kind[r] == 3:  # nearly disjoint: the two share two or three candidates
            shared = rng.choice(n, size=min(n, int(rng.integers(2, 4))), replace=False)
            only_a = rng.random(n) < 0.5
            only_a[shared] = False
            a[r, ~only_a & ~np.isin(np.arange(n), shared)] = NEG
            b[r, only_a] = NEG
        elif kind[r] == 4:  # identical rows: every α gives the same law
            b[r] = a[r]
        elif kind[r] == 5:  # padding at the end (-inf in both)
            cut = int(rng.integers(1, n))
            a[r, cut:] = NEG
            b[r, cut:] = NEG
    return a, b


def _ess_root_noise(a: np.ndarray, b: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Per row, how far rounding alone moves the root of `ess_balance`'s equation
    f(α) = A(-α) - A(2-α): f's rounding (a few ulps of the log-partitions and of the
    largest exponent in them) over its slope E_{2-α}[d] - E_{-α}[d]."""
    out = np.zeros(len(alphas))
    for r, x in enumerate(alphas):
        both = np.isfinite(a[r]) & np.isfinite(b[r])
        if not both.any():
            continue
        la = a[r][both] - np.logaddexp.reduce(a[r][np.isfinite(a[r])])
        d = b[r][both] - np.logaddexp.reduce(b[r][np.isfinite(b[r])]) - la
        parts, means = [], []
        for beta in (-x, 2.0 - x):
            e = la + beta * d
            w = np.exp(e - e.max())
            parts.append(abs(e.max() + np.log(w.sum())) + np.abs(e).max())
            means.append(float((w * d).sum() / w.sum()))
        slope = means[1] - means[0]
        # No slope: d is constant, a case both solvers settle without a root.
        out[r] = 0.0 if slope <= 0 else 8 * np.finfo(float).eps * sum(parts) / slope
    return out


def _both(a: np.ndarray, b: np.ndarray, **kw: object) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    ah, nh = _core._solve_alpha_sweeps(a, b, solver="halley", **kw)
    ab, nb = _core._solve_alpha_sweeps(a, b, solver="bisect", **kw)
    return ah, nh, ab, nb


@pytest.mark.parametrize("method", ["kl_symmetry", "ess_balance"])
@pytest.mark.parametrize("n", [2, 7, 20, 100])
def test_halley_and_bisection_agree(method: str, n: int) -> None:
    a, b = _random_rows(600, n, seed=n)
    # At a tolerance of 1e-13 both pin the root to 1e-12 (bisection's midpoint is within
    # tol / 2 of it, the Halley step well within tol). Except where `ess_balance`'s root
    # is ill-conditioned (nearly equal rows, above all): its equation A(-α) - A(2-α) is a
    # difference of log-partitions whose rounding can outweigh its slope, and then the
    # root is only known to that noise over the slope, which neither solver can beat.
    ah, _, ab, _ = _both(a, b, method=method, tol=1e-13)
    assert np.all((ah >= 0.0) & (ah <= 1.0))
    noise = _ess_root_noise(a, b, ab) if method == "ess_balance" else np.zeros(len(ab))
    sure = noise <= 1e-13
    if method == "kl_symmetry":
        assert sure.all()
    assert sure.mean() > 0.6
    np.testing.assert_allclose(ah[sure], ab[sure], rtol=0.0, atol=1e-12)
    # At the default tolerance they agree to within it, and the public function is the
    # Halley solver.
    ah, _, ab, _ = _both(a, b, method=method)
    np.testing.assert_allclose(ah[sure], ab[sure], rtol=0.0, atol=1e-10)
    np.testing.assert_array_equal(ah, ds.solve_alpha(a, b, method=method))


def test_the_clamps_and_the_ends_are_the_same_for_both() -> None:
    a, b = _random_rows(300, 20, seed=9)
    ah, _, ab, _ = _both(a, b, alpha_min=0.2, alpha_max=0.6)
    np.testing.assert_allclose(ah, ab, rtol=0.0, atol=1e-10)
    assert np.any(ah == 0.2) and np.any(ah == 0.6)
    np.testing.assert_array_equal(ah == 0.2, ab == 0.2)
    np.testing.assert_array_equal(ah == 0.6, ab == 0.6)
    # Identical rows: α is 0.5 with no sweep at all.
    row = np.log([[0.5, 0.3, 0.2]])
    for solver in ("halley", "bisect"):
        alphas, sweeps = _core._solve_alpha_sweeps(row, row, solver=solver)
        assert alphas[0] == 0.5 and sweeps[0] == 0


def test_halley_takes_a_fraction_of_the_sweeps() -> None:
    _, a, b = ds.merge_topk(*topk_pair(512, 100, vocab=8192, seed=3))
    ah, nh, ab, nb = _both(a, b)
    np.testing.assert_allclose(ah, ab, rtol=0.0, atol=1e-10)
    inside = (ah > 0.0) & (ah < 1.0)
    assert inside.sum() > 400
    # Bisection halves [0, 1] down to 1e-10: ceil(log2(1e10)) = 34 sweeps per row.
    assert np.all(nb[inside] == 34)
    assert nh[inside].mean() <= 3.0 and nh[inside].max() <= 6
    a, b = _random_rows(600, 40, seed=1)
    ah, nh, _, nb = _both(a, b)
    inside = (ah > 0.0) & (ah < 1.0) & (nb > 0)
    assert nh[inside].mean() <= 0.15 * nb[inside].mean()


def test_step_with_bisection_draws_the_same_tokens() -> None:
    data = topk_pair(256, 50, vocab=4096, seed=8)
    config = ds.SamplerConfig(diagnostics=True)
    bisect = _core._with_alpha_solver(config, "bisect")
    assert bisect != config and bisect.tol == config.tol
    pos = np.arange(256)
    h = ds.step(*data, config=config, seed=2, positions=pos)
    s = ds.step(*data, config=bisect, seed=2, positions=pos)
    np.testing.assert_allclose(h.alpha, s.alpha, rtol=0.0, atol=1e-10)
    np.testing.assert_array_equal(h.token_id, s.token_id)
    np.testing.assert_allclose(h.logq, s.logq, rtol=0.0, atol=1e-8)
    assert _core._with_alpha_solver(bisect, "halley") == config


def test_unknown_solver_is_refused() -> None:
    with pytest.raises(ValueError, match="solver"):
        _core._solve_alpha_sweeps(np.zeros(2), np.zeros(2), solver="newton")
    with pytest.raises(ValueError, match="solver"):
        _core._with_alpha_solver(ds.SamplerConfig(), "brent")
