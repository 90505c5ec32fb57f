"""Property tests: the Rust kernels and the numpy reference agree on arbitrary inputs."""

from __future__ import annotations

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import reference as ref
from hypothesis import given
from hypothesis import strategies as st

logp_value = st.one_of(
    st.floats(min_value=-30.0, max_value=0.0),
    st.floats(min_value=-1e4, max_value=-1e3),
    st.just(-np.inf),
)


@st.composite
def topk_batches(draw: st.DrawFn) -> tuple[np.ndarray, ...]:
    rows = draw(st.integers(1, 6))
    vocab = draw(st.integers(2, 24))
    k_a, k_b = draw(st.integers(1, min(vocab, 8))), draw(st.integers(1, min(vocab, 8)))
    out = []
    for k in (k_a, k_b):
        ids = np.full((rows, k), -1, dtype=np.int64)
        lp = np.full((rows, k), -np.inf)
        for r in range(rows):
            n = draw(st.integers(1, k))
            chosen = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n, unique=True))
            vals = np.sort(np.array([draw(st.floats(min_value=-12.0, max_value=-0.01)) for _ in chosen]))[::-1]
            # keep listed mass below 1, as a real top-k list is
            vals = vals - max(0.0, np.log(np.exp(vals).sum()) + 1e-3)
            ids[r, :n], lp[r, :n] = chosen, vals
        out += [ids, lp]
    return tuple(out)


@given(
    data=topk_batches(),
    method=st.sampled_from(["kl_symmetry", "entropy", "ess_balance", "fixed"]),
    missing=st.sampled_from(["bound", "drop", -20.0]),
    top_p=st.sampled_from([None, 0.5, 0.95, 1.0]),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    seed=st.integers(0, 2**63 - 1),
    draft_seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
)
def test_step_agrees(
    data: tuple,
    method: str,
    missing: object,
    top_p: float | None,
    temperature: float,
    seed: int,
    draft_seed: int | None,
) -> None:
    cfg = ds.SamplerConfig(method=method, missing=missing, top_p=top_p, temperature=temperature, diagnostics=True)
    drafts = None
    if draft_seed is not None:  # drafted tokens to test: listed ids, other ids, or none
        rng = np.random.default_rng(draft_seed)
        rows = data[0].shape[0]
        drafts = np.where(rng.random(rows) < 0.6, data[2][:, 0], rng.integers(-1, 24, rows))
    r = ds.step(*data, config=cfg, seed=seed, drafts=drafts)
    e = ref.step(*data, config=cfg, seed=seed, drafts=drafts)
    np.testing.assert_array_equal(r.token_id, e.token_id)
    np.testing.assert_array_equal(r.accepted, e.accepted)
    np.testing.assert_allclose(r.alpha, e.alpha, atol=1e-9, rtol=0)
    np.testing.assert_allclose(r.logq, e.logq, atol=1e-9, rtol=1e-9)
    np.testing.assert_array_equal(r.n_candidates, e.n_candidates)
    np.testing.assert_array_equal(r.n_merged, e.n_merged)
    np.testing.assert_array_equal(r.fallback, e.fallback)
    assert np.isfinite(r.alpha).all() and not np.isnan(r.logq).any()


def _kl_gap(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    q = ds.mix(x, y, alpha)
    both = np.isfinite(q) & np.isfinite(x) & np.isfinite(y)
    a, b = ref.mix(x, y, 0.0), ref.mix(x, y, 1.0)
    return float((np.exp(q[both]) * (b[both] - a[both])).sum())


def _ess_gap(x: np.ndarray, y: np.ndarray, alpha: float) -> float:
    q = ds.mix(x, y, alpha)
    a, b = ref.mix(x, y, 0.0), ref.mix(x, y, 1.0)
    fin = np.isfinite(q)
    return float(1 / np.exp(2 * a[fin] - q[fin]).sum() - 1 / np.exp(2 * b[fin] - q[fin]).sum())


def _well_conditioned(x: np.ndarray, y: np.ndarray) -> bool:
    """Symmetrised KL on the common support above 1e-6."""
    return abs(_kl_gap(x, y, 1.0) - _kl_gap(x, y, 0.0)) > 1e-6


@given(
    a=st.lists(logp_value, min_size=1, max_size=12),
    shift=st.lists(st.floats(min_value=-8.0, max_value=8.0), min_size=12, max_size=12),
    method=st.sampled_from(["kl_symmetry", "entropy", "ess_balance"]),
)
def test_solve_alpha_agrees(a: list[float], shift: list[float], method: str) -> None:
    x = np.array(a)
    if not np.isfinite(x).any():
        x[0] = 0.0
    y = np.where(np.isfinite(x), x + np.array(shift[: len(x)]), -np.inf)
    got = ds.solve_alpha(x, y, method=method)
    exp = ref.solve_alpha(x, y, method=method)
    if method == "entropy":
        # α = H_θ / (H_θ + H_t): entropies carry ~1e-16 absolute rounding from the
        # normalisation, so α is good to ~1e-16 / (H_θ + H_t).
        h = sum(
            float(-(np.exp(r) * np.where(np.isfinite(r), r, 0)).sum()) for r in (ref.mix(x, y, 0.0), ref.mix(x, y, 1.0))
        )
        assert abs(got - exp) <= 1e-9 + 1e-15 / max(h, 1e-300)
    elif _well_conditioned(x, y):
        assert abs(got - exp) <= 1e-9
    else:
        # Nearly identical distributions: the root moves by ~1e-16 / Var(d) with the
        # rounding of the inputs, so only the defining property can be asked for.
        for al in (got, exp):
            if method == "kl_symmetry":
                assert abs(_kl_gap(x, y, al)) <= 1e-9
            else:
                assert abs(_ess_gap(x, y, al)) <= 1e-9
    for al in (0.0, got, 1.0):
        np.testing.assert_allclose(ds.mix(x, y, al), ref.mix(x, y, al), atol=1e-9)


@given(data=topk_batches())
def test_unlisted_bound_agrees(data: tuple) -> None:
    """The "bound" rule's value of an unlisted token, per row of either list."""
    for ids, lp in (data[:2], data[2:]):
        np.testing.assert_allclose(ds._core.unlisted_bound(ids, lp), ref.unlisted_bound(ids, lp), atol=1e-12)


def test_unlisted_bound_cases_and_bad_rows() -> None:
    # smallest listed 0.1 below the unlisted 0.2; unlisted 0.05 below the smallest 0.3;
    # a list holding all the mass: 1e-12 (never -inf); one row given as 1-D: a float
    ids = np.array([[3, 4, -1], [1, 2, 5], [7, -1, -1]])
    with np.errstate(divide="ignore"):
        lp = np.log(np.array([[0.7, 0.1, 0.0], [0.3, 0.3, 0.35], [1.0, 0.0, 0.0]]))
    got = ds._core.unlisted_bound(ids, lp)
    np.testing.assert_allclose(got, np.log([0.1, 0.05, 1e-12]), rtol=1e-12)
    assert isinstance(ds._core.unlisted_bound(ids[0], lp[0]), float)
    bad = lp.copy()
    bad[1, 2] = 0.5
    with pytest.raises(ds.InvalidInputError, match=r"logp.*row 1.*above 0"):
        ds._core.unlisted_bound(ids, bad)
    with pytest.raises(ds.InvalidInputError, match=r"ids"):
        ds._core.unlisted_bound(ids[:, :2], lp)


@given(data=topk_batches(), missing=st.sampled_from(["bound", "drop", -7.5]))
def test_merge_agrees(data: tuple, missing: object) -> None:
    got = ds.merge_topk(*data, missing=missing)
    exp = ref.merge_topk(*data, missing=missing)
    np.testing.assert_array_equal(got[0], exp[0])
    np.testing.assert_allclose(got[1], exp[1], atol=1e-12)
    np.testing.assert_allclose(got[2], exp[2], atol=1e-12)
