"""α rules against the math: KL equality at the Chernoff point, ESS balance, edge rows."""

from __future__ import annotations

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs.synthetic import topk_pair
from scipy.optimize import brentq


def _norm(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    return x - (m + np.log(np.exp(x - m).sum()))


def _kls(a: np.ndarray, b: np.ndarray, alpha: float) -> tuple[float, float]:
    q = ds.mix(a, b, alpha)
    p = np.exp(q)
    fin = p > 0
    return float((p[fin] * (q[fin] - _norm(a)[fin])).sum()), float((p[fin] * (q[fin] - _norm(b)[fin])).sum())


def _true_root(a: np.ndarray, b: np.ndarray) -> float:
    """Root of E_q[b − a] by Brent's method in plain numpy, independent of the kernels."""
    a, b = _norm(a), _norm(b)
    d = b - a

    def g(alpha: float) -> float:
        x = a + alpha * d
        w = np.exp(x - x.max())
        return float((w * d).sum() / w.sum())

    return brentq(g, 0.0, 1.0, xtol=1e-15, rtol=4 * np.finfo(float).eps)


def _dense_pairs(rows: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.2, 6.0, size=(rows, 1))
    a = rng.standard_normal((rows, n)) * scale
    b = rng.standard_normal((rows, n)) * scale[::-1]
    return a, b


def test_kl_symmetry_equalises_kls_and_finds_root() -> None:
    a, b = _dense_pairs(300, 40, seed=1)
    alphas = ds.solve_alpha(a, b)
    assert alphas.shape == (300,)
    for i in range(300):
        al = alphas[i]
        assert 0.0 < al < 1.0
        k_theta, k_t = _kls(a[i], b[i], al)
        assert abs(k_theta - k_t) <= 1e-9 * max(1.0, k_theta, k_t)
        assert abs(al - _true_root(a[i], b[i])) <= 1e-10


def test_kl_symmetry_on_merged_topk_lists() -> None:
    ids_a, lp_a, ids_b, lp_b = topk_pair(200, 50, seed=2)
    _, a, b = ds.merge_topk(ids_a, lp_a, ids_b, lp_b)
    alphas = ds.solve_alpha(a, b)
    for i in range(200):
        k_theta, k_t = _kls(a[i], b[i], alphas[i])
        assert abs(k_theta - k_t) <= 1e-9 * max(1.0, k_theta, k_t)


def test_tolerance_is_honoured() -> None:
    a, b = _dense_pairs(50, 30, seed=3)
    loose = ds.solve_alpha(a, b, tol=1e-3)
    for i in range(50):
        assert abs(loose[i] - _true_root(a[i], b[i])) <= 1e-3


def test_identical_rows_give_half() -> None:
    a = np.log(np.array([0.5, 0.3, 0.2]))
    assert ds.solve_alpha(a, a) == 0.5
    assert ds.solve_alpha(a, a + 3.0) == 0.5  # equal after normalisation


def test_clamped() -> None:
    a, b = np.log([0.9, 0.1]), np.log([0.1, 0.9])
    assert ds.solve_alpha(a, b) == pytest.approx(0.5)
    assert ds.solve_alpha(a, b, alpha_max=0.3) == 0.3
    assert ds.solve_alpha(a, b, alpha_min=0.7) == 0.7


@pytest.mark.parametrize(
    "a,b",
    [
        ([0.0, -np.inf, -np.inf], [-1.0, -0.5, -3.0]),  # one-hot base
        ([0.0], [0.0]),  # single candidate
        ([0.0, -1e4, -5e3], [-1e4, 0.0, -2.0]),  # extreme log probabilities
        ([-1e4, -1e4 + 1.0], [-1e4 + 1.0, -1e4]),  # all tiny, shifted
        ([0.0, -np.inf], [-np.inf, 0.0]),  # disjoint supports
    ],
)
@pytest.mark.parametrize("method", ["kl_symmetry", "entropy", "ess_balance", "fixed"])
def test_edge_rows_stay_finite(a: list[float], b: list[float], method: str) -> None:
    al = ds.solve_alpha(np.array(a), np.array(b), method=method)
    assert np.isfinite(al) and 0.0 <= al <= 1.0


def test_float32_inputs() -> None:
    a, b = _dense_pairs(20, 16, seed=4)
    r64 = ds.solve_alpha(a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
    r32 = ds.solve_alpha(a.astype(np.float32), b.astype(np.float32))
    np.testing.assert_array_equal(r32, r64)


def test_entropy_rule() -> None:
    a, b = np.log([0.5, 0.5]), np.log([0.9, 0.1])
    ha, hb = np.log(2), -(0.9 * np.log(0.9) + 0.1 * np.log(0.1))
    assert ds.solve_alpha(a, b, method="entropy") == pytest.approx(ha / (ha + hb), abs=1e-12)
    one_hot = np.array([0.0, -np.inf])
    assert ds.solve_alpha(one_hot, one_hot, method="entropy") == 0.5


def test_ess_balance_equalises_ess() -> None:
    a, b = _dense_pairs(100, 20, seed=5)
    alphas = ds.solve_alpha(a, b, method="ess_balance")
    for i in range(100):
        q = ds.mix(a[i], b[i], alphas[i])
        ess_a = 1.0 / np.exp(2 * _norm(a[i]) - q).sum()
        ess_b = 1.0 / np.exp(2 * _norm(b[i]) - q).sum()
        if 0.0 < alphas[i] < 1.0:
            assert ess_a == pytest.approx(ess_b, rel=1e-8)


def test_fixed_rule_and_mix_endpoints() -> None:
    a, b = np.log([0.7, 0.2, 0.1]), np.log([0.1, 0.1, 0.8])
    assert ds.solve_alpha(a, b, method="fixed", alpha=0.25) == 0.25
    np.testing.assert_allclose(ds.mix(a, b, 0.0), a, atol=1e-15)
    np.testing.assert_allclose(ds.mix(a, b, 1.0), b, atol=1e-15)
    q = ds.mix(a, b, 0.5)
    expected = 0.5 * a + 0.5 * b
    np.testing.assert_allclose(q, _norm(expected), atol=1e-14)


def test_mix_per_row_alpha_and_padding() -> None:
    a = np.array([[0.0, -1.0, -np.inf], [-0.5, -0.5, -np.inf]])
    b = np.array([[-1.0, 0.0, -np.inf], [-2.0, -0.1, -np.inf]])
    q = ds.mix(a, b, np.array([0.0, 1.0]))
    assert q[0, 2] == -np.inf and q[1, 2] == -np.inf
    np.testing.assert_allclose(np.exp(q).sum(axis=1), 1.0)
    np.testing.assert_allclose(q[1, :2], _norm(b[1, :2]))


def test_peaked_and_nearly_equal_rows() -> None:
    """Very peaked rows make A′ nearly flat away from the root (where a Halley step can
    be tiny while the root is far); nearly equal rows make the root ill-conditioned."""
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(1500):
        n = int(rng.integers(2, 120))
        a = rng.standard_normal(n) * rng.uniform(0.1, 40)
        b = rng.standard_normal(n) * rng.uniform(0.1, 40)
        if rng.random() < 0.3:
            b = a + rng.standard_normal(n) * rng.uniform(0.01, 1)
        al = ds.solve_alpha(a, b)
        if not 0.0 < al < 1.0:
            continue
        k_theta, k_t = _kls(a, b, al)
        assert abs(k_theta - k_t) <= 1e-9 * max(1.0, k_theta, k_t)
        root = _true_root(a, b)
        an, bn = _norm(a), _norm(b)
        x = an + root * (bn - an)
        w = np.exp(x - x.max())
        w /= w.sum()
        d = bn - an
        var = float((w * (d - (w * d).sum()) ** 2).sum())
        if var > 1e-4:  # well conditioned: the root itself, to tol
            assert abs(al - root) <= 1e-9
            checked += 1
    assert checked > 500
