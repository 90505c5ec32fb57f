"""The engine's truncation of q* (``q_top_k``, ``q_top_p``, ``q_min_p``) and the
alternatives of :func:`dualsample_rs.step`: the Rust kernel against its numpy twin, both
against the rules by hand, neutral values, sampling frequencies and bad input."""

from __future__ import annotations

import inspect
from typing import Any

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import reference as ref
from dualsample_rs.synthetic import topk_pair
from scipy.stats import chisquare

IMPLS = {"rust": ds.step, "reference": ref.step}

# q* where the teacher is forced (α = 1) is the teacher over the candidates, exactly.
IDS = np.array([1, 2, 3, 4])
TEACHER = np.array([0.5, 0.3, 0.15, 0.05])
BASE = np.array([0.1, 0.2, 0.3, 0.4])

# Floats from the two implementations: the Rust exponential and numpy's differ in the
# last bits, nothing more (α is fixed, so no solver tolerance enters).
RTOL = 1e-12


def _rows(n: int, ids: np.ndarray = IDS, base: np.ndarray = BASE, teacher: np.ndarray = TEACHER) -> tuple:
    tile = lambda x: np.tile(x, (n, 1))  # noqa: E731
    return tile(ids), tile(np.log(base)), tile(ids), tile(np.log(teacher))


def _forced(impl: str, n: int, **kwargs: Any) -> Any:
    return IMPLS[impl](*_rows(n), force_teacher=np.ones(n, dtype=bool), positions=np.arange(n), seed=5, **kwargs)


def _truncated_law(q: np.ndarray, ids: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """The rules written out one candidate at a time, as the docs state them."""
    keep = q > 0
    if min_p > 0:
        keep &= q >= min_p * q.max()
    order = sorted(range(len(q)), key=lambda i: (-q[i], ids[i]))
    if top_k > 0:
        kept = [i for i in order if keep[i]]
        if len(kept) > top_k:
            keep &= q >= q[kept[top_k - 1]]
    if top_p < 1:
        mass = q[keep].sum()
        cum = 0.0
        for i in [i for i in reversed(order) if keep[i]][:-1]:
            cum += q[i] / mass
            if cum > 1 - top_p:
                break
            keep[i] = False
    law = np.where(keep, q, 0.0)
    return law / law.sum()


# ---------------------------------------------------------------- the rules by hand
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize(
    "params,law",
    [
        # top_k 2 leaves 0.5 and 0.3, renormalised to 5/8 and 3/8.
        ({"q_top_k": [2]}, {1: 0.625, 2: 0.375}),
        # min_p 0.35: below 0.35 · 0.5 = 0.175 goes (0.15, 0.05).
        ({"q_min_p": [0.35]}, {1: 0.625, 2: 0.375}),
        # top_p 0.7: from the bottom 0.05 (0.05 ≤ 0.3) and 0.15 (0.2 ≤ 0.3) go, 0.3 stays.
        ({"q_top_p": [0.7]}, {1: 0.625, 2: 0.375}),
        # in order: min_p 0.2 drops 0.05; top_k 3 keeps the rest; top_p 0.8 on them
        # renormalised drops 0.15 / 0.95 ≈ 0.158 ≤ 0.2.
        ({"q_min_p": [0.2], "q_top_k": [3], "q_top_p": [0.8]}, {1: 0.625, 2: 0.375}),
        ({"q_min_p": [0.2], "q_top_p": [0.9]}, {1: 0.5 / 0.95, 2: 0.3 / 0.95, 3: 0.15 / 0.95}),
    ],
    ids=["top_k", "min_p", "top_p", "all-three", "min_p-then-top_p"],
)
def test_the_twin_and_the_kernel_by_hand(impl: str, params: dict, law: dict[int, float]) -> None:
    n = 400
    res = _forced(impl, n, alternatives=4, **{k: np.tile(v, n) for k, v in params.items()})
    ids = list(law)
    assert set(np.unique(res.token_id)) == set(ids)
    np.testing.assert_allclose(res.logq, np.log([law[int(t)] for t in res.token_id]), rtol=RTOL)
    assert res.top_ids.shape == (n, 4) and res.top_ids.dtype == np.int64
    np.testing.assert_array_equal(res.top_ids[0], ids + [-1] * (4 - len(ids)))
    np.testing.assert_allclose(res.top_logq[0, : len(ids)], np.log(list(law.values())), rtol=RTOL)
    assert np.all(res.top_logq[0, len(ids) :] == -np.inf)
    assert (res.top_ids == res.top_ids[0]).all()


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_ties(impl: str) -> None:
    """top_k keeps every candidate tied with the k-th (as vLLM masks only below it);
    top_p drops the higher id first among equals; alternatives list the lower id first."""
    ids, p = np.array([5, 9, 7, 8]), np.array([0.4, 0.2, 0.2, 0.2])

    def run(**kwargs: Any) -> Any:
        data = _rows(1, ids, p, p)
        return IMPLS[impl](*data, force_teacher=[True], alternatives=4, **kwargs)

    np.testing.assert_array_equal(run().top_ids[0], [5, 7, 8, 9])
    np.testing.assert_array_equal(run(q_top_k=[2]).top_ids[0], [5, 7, 8, 9])
    np.testing.assert_array_equal(run(q_top_p=[0.7]).top_ids[0], [5, 7, 8, -1])
    np.testing.assert_allclose(run(q_top_p=[0.7]).top_logq[0, :3], np.log([0.5, 0.25, 0.25]), rtol=RTOL)
    np.testing.assert_array_equal(run(q_min_p=[1.0]).top_ids[0], [5, -1, -1, -1])
    # A top_p so small that 1 − top_p rounds to 1: the most probable still stays.
    assert run(q_top_p=[1e-17]).top_logq[0, 0] == 0.0
    np.testing.assert_array_equal(run(q_top_p=[1e-17]).top_ids[0], [5, -1, -1, -1])


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_alternatives_leave_out_zero_probability(impl: str) -> None:
    # The teacher gives id 3 no mass; at α = 1 q*(3) = 0, so it is not an alternative.
    with np.errstate(divide="ignore"):
        data = _rows(2, base=np.array([0.4, 0.3, 0.2, 0.1]), teacher=np.array([0.6, 0.4, 0.0, 0.0]))
    res = IMPLS[impl](*data, force_teacher=[True, True], alternatives=3)
    np.testing.assert_array_equal(res.top_ids, [[1, 2, -1]] * 2)
    np.testing.assert_allclose(res.top_logq[:, :2], np.log([[0.6, 0.4]] * 2), rtol=RTOL)
    assert np.all(res.top_logq[:, 2] == -np.inf)
    plain = IMPLS[impl](*data, force_teacher=[True, True])
    assert plain.top_ids is None and plain.top_logq is None


# ---------------------------------------------------------------- kernel against twin
def _random_case(seed: int) -> tuple[tuple, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows, k = int(rng.integers(1, 40)), int(rng.integers(1, 12))
    data = topk_pair(rows, k, vocab=int(rng.integers(k + 1, 60)), seed=seed)
    off = rng.random((3, rows)) < 0.3  # some rows neutral in each parameter
    kwargs: dict[str, Any] = {
        "q_top_k": np.where(off[0], rng.choice([-1, 0], rows), rng.integers(1, 2 * k + 2, rows)),
        "q_top_p": np.where(off[1], 1.0, rng.uniform(0.02, 1.0, rows)),
        "q_min_p": np.where(off[2], 0.0, rng.uniform(0.0, 0.6, rows)),
        "alternatives": int(rng.integers(0, 2 * k + 3)),
        "drafts": np.where(rng.random(rows) < 0.5, data[2][:, 0], rng.integers(-1, 60, rows)),
        "positions": rng.integers(0, 1000, rows),
        "seed": int(rng.integers(0, 2**63)),
    }
    return data, kwargs


def _assert_same(r: Any, e: Any, rtol: float) -> None:
    np.testing.assert_array_equal(r.token_id, e.token_id)
    np.testing.assert_array_equal(r.accepted, e.accepted)
    np.testing.assert_array_equal(r.n_candidates, e.n_candidates)
    np.testing.assert_allclose(r.logq, e.logq, rtol=rtol, atol=0)
    if e.top_ids is None:
        assert r.top_ids is None and r.top_logq is None
    else:
        np.testing.assert_array_equal(r.top_ids, e.top_ids)
        np.testing.assert_allclose(r.top_logq, e.top_logq, rtol=rtol, atol=0)


@pytest.mark.parametrize("seed", range(60))
def test_kernel_matches_twin(seed: int) -> None:
    """Random batches, random per-row truncation and alternatives, α fixed per case:
    tokens and alternatives' ids exactly, floats within 1e-12 relative."""
    data, kwargs = _random_case(seed)
    cfg = ds.SamplerConfig(method="fixed", alpha=float(np.random.default_rng(seed).uniform(0, 1)), diagnostics=True)
    r, e = ds.step(*data, config=cfg, **kwargs), ref.step(*data, config=cfg, **kwargs)
    _assert_same(r, e, RTOL)
    np.testing.assert_allclose(r.kl_theta, e.kl_theta, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_kernel_matches_twin_with_solved_alpha(seed: int) -> None:
    """The same with α solved (the two solvers agree within their 1e-10 tolerance)."""
    data, kwargs = _random_case(1000 + seed)
    cfg = ds.SamplerConfig(method="kl_symmetry", tol=1e-12, top_p=0.95)
    _assert_same(ds.step(*data, config=cfg, **kwargs), ref.step(*data, config=cfg, **kwargs), 1e-9)


def test_kernel_matches_twin_on_a_large_batch() -> None:
    """1024 rows of 100 (the parallel path), every row truncated some way."""
    data = topk_pair(1024, 100, vocab=8192, seed=7)
    rng = np.random.default_rng(7)
    kwargs = {
        "q_top_k": rng.integers(-1, 60, 1024),
        "q_top_p": rng.uniform(0.3, 1.0, 1024),
        "q_min_p": rng.uniform(0.0, 0.2, 1024),
        "alternatives": 8,
        "positions": np.arange(1024),
    }
    cfg = ds.SamplerConfig(method="fixed", alpha=0.4)
    r, e = ds.step(*data, config=cfg, seed=3, **kwargs), ref.step(*data, config=cfg, seed=3, **kwargs)
    _assert_same(r, e, RTOL)
    assert (r.logq != ds.step(*data, config=cfg, seed=3, positions=np.arange(1024)).logq).mean() > 0.5


# ---------------------------------------------------------------- neutral values
def _bits(res: Any) -> dict[str, bytes]:
    fields = [f for f in dir(res) if not f.startswith("_") and isinstance(getattr(res, f), np.ndarray)]
    return {f: getattr(res, f).tobytes() for f in fields}


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_neutral_values_are_bit_identical_to_none(impl: str) -> None:
    data = topk_pair(300, 20, vocab=200, seed=2)
    n = 300
    common = {
        "config": ds.SamplerConfig(top_p=0.9, diagnostics=True),
        "seed": 8,
        "positions": np.arange(n),
        "drafts": data[2][:, 1],
    }
    neutral = {
        "q_top_k": np.where(np.arange(n) % 2 == 0, 0, -1),
        "q_top_p": np.ones(n),
        "q_min_p": np.zeros(n),
    }
    plain = IMPLS[impl](*data, **common)
    same = IMPLS[impl](*data, **common, **neutral)
    assert _bits(plain) == _bits(same)
    assert plain.top_ids is None and same.top_ids is None
    # ... while a value one step from neutral on every row does change the draws.
    moved = IMPLS[impl](*data, **common, q_top_k=np.full(n, 1))
    assert (moved.token_id != plain.token_id).any()


# ---------------------------------------------------------------- frequencies
DRAWS = 40_000
BASE_RAW = np.log([0.05, 0.35, 0.25, 0.17, 0.12, 0.06])
TEACHER_RAW = np.log([0.4, 0.25, 0.1, 0.1, 0.1, 0.05])


def _mixture(alpha: float) -> np.ndarray:
    w = (1 - alpha) * BASE_RAW + alpha * TEACHER_RAW
    q = np.exp(w - w.max())
    return np.asarray(q / q.sum())


@pytest.mark.slow
@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize(
    "top_k,top_p,min_p", [(3, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.4), (4, 0.8, 0.15)], ids=["k", "p", "min_p", "all"]
)
@pytest.mark.parametrize("draft", [None, 0, 5], ids=["no-draft", "draft-0", "draft-5"])
def test_frequencies_follow_the_truncated_law(impl: str, top_k: int, top_p: float, min_p: float, draft: Any) -> None:
    """χ² of the drawn tokens against q* truncated by the rules written out here, with
    and without a drafted token to test (id 5 is dropped by every truncation here, so it
    is never accepted; id 0 is kept by some)."""
    ids = np.arange(6)
    alpha = 0.5
    law = _truncated_law(_mixture(alpha), ids, top_k, top_p, min_p)
    n = DRAWS
    kwargs: dict[str, Any] = {
        "q_top_k": np.full(n, top_k),
        "q_top_p": np.full(n, top_p),
        "q_min_p": np.full(n, min_p),
        "drafts": None if draft is None else np.full(n, draft),
    }
    cfg = ds.SamplerConfig(method="fixed", alpha=alpha)
    data = _rows(n, ids, np.exp(BASE_RAW), np.exp(TEACHER_RAW))
    res = IMPLS[impl](*data, config=cfg, seed=21, positions=np.arange(n), **kwargs)
    counts = np.bincount(res.token_id, minlength=6)
    assert law[5] == 0 and counts[law == 0].sum() == 0, (counts, law)
    assert 1 < (law > 0).sum() < 6  # the truncation dropped some, not all but one
    stat = chisquare(counts[law > 0], law[law > 0] * n)
    assert stat.pvalue > 1e-4, (counts, law * n)
    np.testing.assert_allclose(res.logq, np.log(law[res.token_id]), rtol=1e-12)
    accepted = int(res.accepted.sum())
    if draft is None:
        assert accepted == 0
    else:
        # Accepted with probability q(d) under the truncated law.
        p = law[draft]
        assert abs(accepted - n * p) < 6 * np.sqrt(n * max(p * (1 - p), 1e-12)) + (p == 0) * 0.5
        assert np.all(res.token_id[res.accepted] == draft)


def test_the_twin_takes_the_kernels_defaults() -> None:
    def defaults(fn: Any) -> dict[str, object]:
        params = inspect.signature(fn).parameters.items()
        return {k: p.default for k, p in params if p.default is not inspect.Parameter.empty}

    assert defaults(ref.step) == defaults(ds.step)
    assert defaults(ds.step)["alternatives"] == 0 and defaults(ds.step)["q_top_p"] is None


# ---------------------------------------------------------------- bad input
BAD = [
    ({"q_top_k": [1, 2]}, "q_top_k"),
    ({"q_top_p": [1.0, 1.0]}, "q_top_p"),
    ({"q_min_p": [0.0, 0.0, 0.0, 0.0]}, "q_min_p"),
    ({"q_top_p": [1.0, 0.0, 1.0]}, r"q_top_p, row 1"),
    ({"q_top_p": [1.0, 1.5, 1.0]}, r"q_top_p, row 1"),
    ({"q_top_p": [np.nan, 1.0, 1.0]}, r"q_top_p, row 0"),
    ({"q_min_p": [0.0, 0.0, 1.5]}, r"q_min_p, row 2"),
    ({"q_min_p": [0.0, np.nan, 0.0]}, r"q_min_p, row 1"),
    ({"q_min_p": [-0.5, 0.0, 0.0]}, r"q_min_p, row 0"),
    ({"q_top_p": [np.inf, 1.0, 1.0]}, r"q_top_p, row 0"),
    ({"alternatives": -1}, "alternatives"),
]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("kwargs,match", BAD, ids=[f"{next(iter(k))}-{i}" for i, (k, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(impl: str, kwargs: dict, match: str) -> None:
    data = _rows(3)
    with pytest.raises(ds.InvalidInputError, match=match) as info:
        IMPLS[impl](*data, **kwargs)
    assert isinstance(info.value, ValueError)
