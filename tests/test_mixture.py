"""The mixture of several teachers: `mix_teachers` and then `step`, against α and q*
computed here from the definitions (the Chernoff point by scipy's brentq), sampling
frequencies against q*, one teacher at weight 1 against the two-model step bit for bit,
the numpy twin, and the weights refused."""

from __future__ import annotations

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import _core
from dualsample_rs import reference as ref
from dualsample_rs.exceptions import InvalidInputError
from dualsample_rs.synthetic import topk_pair
from hypothesis import given
from hypothesis import strategies as st
from scipy.optimize import brentq
from scipy.stats import chisquare

VOCAB = 10


# ---------------------------------------------------------------- from the definitions
def _norm(x: np.ndarray) -> np.ndarray:
    fin = np.isfinite(x)
    m = x[fin].max()
    return np.where(fin, x - (m + np.log(np.exp(x[fin] - m).sum())), -np.inf)


def _kl(logq: np.ndarray, logr: np.ndarray) -> float:
    q = np.exp(logq)
    pos = q > 0
    return float((q[pos] * (logq[pos] - logr[pos])).sum())


def _chernoff(a: np.ndarray, b: np.ndarray) -> float:
    """The α where KL(q_α‖π_θ) = KL(q_α‖π_w), q_α ∝ π_θ^(1−α) π_w^α, by a scalar root finder."""

    def f(alpha: float) -> float:
        logq = _norm((1 - alpha) * a + alpha * b)
        return _kl(logq, a) - _kl(logq, b)

    if f(0.0) >= 0:
        return 0.0
    if f(1.0) <= 0:
        return 1.0
    return float(brentq(f, 0.0, 1.0, xtol=1e-15, rtol=4 * np.finfo(float).eps))


def _lists(rng: np.random.Generator, rows: int, listed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, raw log probabilities as a server lists them, the full log-softmax over VOCAB):
    each row lists `listed` tokens in a random order."""
    full = np.stack([_norm(rng.normal(0.0, 1.5, VOCAB)) for _ in range(rows)])
    ids = np.stack([rng.permutation(VOCAB)[:listed] for _ in range(rows)])
    return ids, np.take_along_axis(full, ids, axis=1), full


def _values(ids: np.ndarray, lp: np.ndarray, fill: float) -> np.ndarray:
    """A row's value for every token of the vocabulary: listed, else `fill`."""
    out = np.full(VOCAB, fill)
    out[ids] = lp
    return out


# ---------------------------------------------------------------- α and log q*
@pytest.mark.parametrize(
    ("listed", "missing", "temperatures"),
    [(VOCAB, "bound", (1.0, 1.0)), (VOCAB, "bound", (0.8, 1.6)), (6, -9.0, (1.0, 1.0)), (5, -7.0, (1.3, 0.7))],
    ids=["full", "full-tempered", "partial", "partial-tempered"],
)
def test_alpha_and_logq_against_a_root_finder(listed: int, missing: str | float, temperatures: tuple) -> None:
    """Three teachers mixed, then the step: α is the Chernoff point between the base and
    the normalised geometric mean of the (tempered) teachers, q* the path between them, to
    1e-9. Where lists are partial the constant rule values every unlisted token, so the
    candidates are the union and each model's values are known here exactly."""
    rng = np.random.default_rng(7)
    rows, weights = 60, np.array([0.2, 0.5, 0.3])
    ids_b, lp_b, _ = _lists(rng, rows, listed)
    teachers = [_lists(rng, rows, listed) for _ in weights]
    tau, tau_t = temperatures
    ids_w, lp_w = _core.mix_teachers([t[0] for t in teachers], [t[1] for t in teachers], weights, missing=missing)
    cfg = ds.SamplerConfig(missing=missing, temperature=tau, temperature_t=tau_t)
    res = _core.step(ids_b, lp_b, ids_w, lp_w, config=cfg, seed=3, positions=np.arange(rows))
    fill = float(missing) if listed < VOCAB else -np.inf
    for r in range(rows):
        union = np.zeros(VOCAB, dtype=bool)
        for ids in [ids_b] + [t[0] for t in teachers]:
            union[ids[r]] = True
        # Each teacher tempered and normalised on its own, then their geometric mean.
        # Over the candidates (the union) only.
        cand = np.flatnonzero(union)
        a = _norm(_values(ids_b[r], lp_b[r], fill)[cand] / tau)
        logs = [_norm(_values(t[0][r], t[1][r], fill)[cand] / tau_t) for t in teachers]
        log_w = _norm(sum(w * lg for w, lg in zip(weights, logs, strict=True)))
        alpha = _chernoff(a, log_w)
        log_q = _norm((1 - alpha) * a + alpha * log_w)
        # The same q* written with each teacher's own exponent α_i = α·w_i.
        product = _norm((1 - alpha) * a + sum(alpha * w * lg for w, lg in zip(weights, logs, strict=True)))
        np.testing.assert_allclose(product, log_q, atol=1e-12)
        assert abs(res.alpha[r] - alpha) <= 1e-9, (r, res.alpha[r], alpha)
        assert union[res.token_id[r]]
        tok = int(np.searchsorted(cand, res.token_id[r]))
        assert abs(res.logq[r] - log_q[tok]) <= 1e-9
        assert abs(res.logp_t[r] - log_w[tok]) <= 1e-9
        assert abs(res.logp_theta[r] - a[tok]) <= 1e-9
        # The defining property of the Chernoff point, at the step's α.
        at_step = _norm((1 - res.alpha[r]) * a + res.alpha[r] * log_w)
        assert abs(_kl(at_step, a) - _kl(at_step, log_w)) <= 1e-9


def test_frequencies_follow_q_star() -> None:
    """χ² of the tokens drawn for one row repeated at many positions against q* built here."""
    rng = np.random.default_rng(11)
    draws, weights, missing = 40_000, np.array([0.6, 0.4]), -8.0
    ids_b, lp_b, _ = _lists(rng, 1, 6)
    teachers = [_lists(rng, 1, 5) for _ in weights]
    ids_w, lp_w = _core.mix_teachers([t[0] for t in teachers], [t[1] for t in teachers], weights, missing=missing)
    tile = lambda x: np.tile(x, (draws, 1))  # noqa: E731
    cfg = ds.SamplerConfig(missing=missing)
    res = _core.step(tile(ids_b), tile(lp_b), tile(ids_w), tile(lp_w), config=cfg, seed=2, positions=np.arange(draws))
    union = np.zeros(VOCAB, dtype=bool)
    for ids in [ids_b] + [t[0] for t in teachers]:
        union[ids[0]] = True
    cand = np.flatnonzero(union)
    a = _norm(_values(ids_b[0], lp_b[0], missing)[cand])
    log_w = _norm(sum(w * _values(t[0][0], t[1][0], missing)[cand] for w, t in zip(weights, teachers, strict=True)))
    alpha = _chernoff(a, log_w)
    q = np.exp(_norm((1 - alpha) * a + alpha * log_w))
    assert 0.05 < alpha < 0.95  # a mixture, not one end
    counts = np.bincount(res.token_id, minlength=VOCAB)
    assert counts[~union].sum() == 0
    assert chisquare(counts[cand], q * draws).pvalue > 1e-3, (counts[cand], q * draws)


# ---------------------------------------------------------------- one teacher
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"missing": "drop"},
        {"missing": -30.0},
        {"temperature": 0.8, "temperature_t": 1.4},
        {"top_p": 0.9, "stability_js_max": 0.4, "diagnostics": True},
        {"method": "ess_balance", "exclude_ids": (3, 4)},
    ],
    ids=["plain", "drop", "constant", "temperature", "top_p-js", "ess"],
)
def test_one_teacher_at_weight_one_is_the_two_model_step(options: dict) -> None:
    ids_a, lp_a, ids_t, lp_t = topk_pair(400, 20, vocab=64, seed=5)
    lp_t[:7, 0] = -0.0  # a certain token as a server may write it
    cfg = ds.SamplerConfig(**options)
    missing = options.get("missing", "bound")
    ids_w, lp_w = _core.mix_teachers([ids_t], [lp_t], [1.0], missing=missing)
    assert ids_w.tobytes() == ids_t.tobytes() and lp_w.tobytes() == lp_t.astype(np.float64).tobytes()
    kw = {"config": cfg, "seed": 4, "positions": np.arange(400) % 13}
    two, mixed = _core.step(ids_a, lp_a, ids_t, lp_t, **kw), _core.step(ids_a, lp_a, ids_w, lp_w, **kw)
    for field in ("token_id", "alpha", "logq", "logp_theta", "logp_t", "observed_t", "fallback", "n_candidates", "js"):
        x, y = getattr(two, field), getattr(mixed, field)
        assert (x is None and y is None) or x.tobytes() == y.tobytes(), field


# ---------------------------------------------------------------- the twin, the layout
@pytest.mark.parametrize("missing", ["bound", "drop", -12.0])
def test_numpy_twin_agrees(missing: str | float) -> None:
    ids_a, lp_a, ids_1, lp_1 = topk_pair(300, 8, vocab=20, seed=1)
    _, _, ids_2, lp_2 = topk_pair(300, 6, vocab=20, seed=2)
    lists = ([ids_a, ids_1, ids_2], [lp_a, lp_1, lp_2])
    weights = [0.2, 0.3, 0.5]
    ids, lp = _core.mix_teachers(*lists, weights, missing=missing)
    ids_r, lp_r = ref.mix_teachers(*lists, weights, missing=missing)
    np.testing.assert_array_equal(ids, ids_r)
    np.testing.assert_allclose(lp, lp_r, rtol=0, atol=1e-12)
    cfg = ds.SamplerConfig(missing=missing)
    np.testing.assert_array_equal(
        _core.step(ids_a, lp_a, ids, lp, config=cfg, seed=8).token_id,
        ref.step(ids_a, lp_a, ids_r, lp_r, config=cfg, seed=8).token_id,
    )


def test_layout_one_row_and_zero_weight() -> None:
    ids, lp = _core.mix_teachers(
        [[5, 2], [2, 9, -1]], [np.log([0.5, 0.3]), [np.log(0.6), np.log(0.1), -np.inf]], [0.25, 0.75], missing=-10.0
    )
    assert ids.tolist() == [5, 2, -1, 9, -1]
    np.testing.assert_allclose(
        lp[[0, 1, 3]], [0.25 * np.log(0.5) - 7.5, 0.25 * np.log(0.3) + 0.75 * np.log(0.6), -2.5 + 0.75 * np.log(0.1)]
    )
    # A teacher at weight 0 adds no token.
    ids, _ = _core.mix_teachers([[5, 2], [2, 9]], [np.log([0.5, 0.3]), np.log([0.6, 0.1])], [1.0, 0.0])
    assert ids.tolist() == [5, 2, -1, -1]


# ---------------------------------------------------------------- refused input
@pytest.mark.parametrize(
    "weights",
    [[0.5, 0.6], [1.2, -0.2], [float("nan"), 1.0], [1.0], [0.5, 0.5, 0.0]],
    ids=["sum", "negative", "nan", "short", "long"],
)
@pytest.mark.parametrize("impl", [_core.mix_teachers, ref.mix_teachers], ids=["rust", "numpy"])
def test_bad_weights_are_refused_by_name(weights: list, impl) -> None:
    lists = ([np.array([1, 2]), np.array([2, 3])], [np.log([0.5, 0.4]), np.log([0.7, 0.2])])
    with pytest.raises(InvalidInputError, match=r"^weights: ") as err:
        impl(*lists, weights)
    assert isinstance(err.value, ValueError)


def test_bad_lists_are_refused_by_name() -> None:
    ok = (np.array([1, 2]), np.log([0.5, 0.4]))
    with pytest.raises(InvalidInputError, match=r"^ids_list, row 0: teacher 1: token id 3 appears twice"):
        _core.mix_teachers([ok[0], [3, 3]], [ok[1], [-1.0, -2.0]], [0.5, 0.5])
    with pytest.raises(InvalidInputError, match=r"^logp_list: teacher 1: shape"):
        _core.mix_teachers([ok[0], [3, 4]], [ok[1], [-1.0]], [0.5, 0.5])
    with pytest.raises(
        InvalidInputError, match=r"^logp_list: teacher 0: shape \[1, 2\] does not match ids_list's \[2\]"
    ):
        _core.mix_teachers([ok[0], ok[0]], [[ok[1]], ok[1]], [0.5, 0.5])
    with pytest.raises(InvalidInputError, match=r"^ids_list: mixes 1-D rows and 2-D batches"):
        _core.mix_teachers([ok[0], [ok[0]]], [ok[1], [ok[1]]], [0.5, 0.5])
    with pytest.raises(InvalidInputError, match=r"^logp_list: has 1 arrays but ids_list has 2"):
        _core.mix_teachers([ok[0], ok[0]], [ok[1]], [0.5, 0.5])
    with pytest.raises(InvalidInputError, match=r"^ids_list: at least one teacher"):
        _core.mix_teachers([], [], [])


# ---------------------------------------------------------------- properties
@given(
    seed=st.integers(0, 2**32 - 1),
    raw=st.lists(st.floats(0.05, 1.0), min_size=2, max_size=4),
    missing=st.sampled_from(["bound", "drop", -15.0]),
)
def test_teacher_order_does_not_matter(seed: int, raw: list[float], missing: str | float) -> None:
    """Reordering the teachers with their weights moves columns but not the mixed teacher,
    nor the step's α; and a teacher listed twice is that teacher (weights add)."""
    rng = np.random.default_rng(seed)
    weights = np.array(raw) / sum(raw)
    k = int(rng.integers(1, 6))
    teachers = [_lists(rng, 3, k)[:2] for _ in weights]
    ids_b, lp_b, _ = _lists(rng, 3, 4)
    order = rng.permutation(len(weights))
    ids, lp = _core.mix_teachers([t[0] for t in teachers], [t[1] for t in teachers], weights, missing=missing)
    ids_p, lp_p = _core.mix_teachers(
        [teachers[i][0] for i in order], [teachers[i][1] for i in order], weights[order], missing=missing
    )
    for r in range(3):
        got = dict(zip(ids[r][ids[r] >= 0].tolist(), lp[r][ids[r] >= 0], strict=True))
        got_p = dict(zip(ids_p[r][ids_p[r] >= 0].tolist(), lp_p[r][ids_p[r] >= 0], strict=True))
        assert got.keys() == got_p.keys()
        np.testing.assert_allclose([got[i] for i in got], [got_p[i] for i in got], atol=1e-12)
    cfg = ds.SamplerConfig(missing=missing)
    np.testing.assert_allclose(
        _core.step(ids_b, lp_b, ids, lp, config=cfg).alpha,
        _core.step(ids_b, lp_b, ids_p, lp_p, config=cfg).alpha,
        atol=1e-9,
    )
    twice = teachers[0]
    ids_2, lp_2 = _core.mix_teachers([twice[0], twice[0]], [twice[1], twice[1]], [0.5, 0.5], missing=missing)
    k0 = twice[0].shape[1]
    np.testing.assert_array_equal(ids_2[:, :k0], twice[0])
    np.testing.assert_allclose(lp_2[:, :k0], twice[1], atol=1e-15)
    assert (ids_2[:, k0:] == -1).all()
