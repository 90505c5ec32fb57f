"""The fused step: sampling frequencies against q*, the constraint, exclusion, forcing,
determinism of the draw, and agreement with the numpy reference."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import reference as ref
from dualsample_rs.synthetic import topk_pair
from scipy.stats import chisquare

DRAWS = 40_000


def _norm(x: np.ndarray) -> np.ndarray:
    fin = np.isfinite(x)
    m = x[fin].max()
    z = m + np.log(np.exp(x[fin] - m).sum())
    return np.where(fin, x - z, -np.inf)


def _repeat(ids: np.ndarray, lp: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    return np.tile(ids, (n, 1)), np.tile(lp, (n, 1))


DISTRIBUTIONS = {
    "peaked": (np.log([0.7, 0.2, 0.05, 0.03, 0.02]), np.log([0.1, 0.5, 0.2, 0.1, 0.1])),
    "flat-vs-peaked": (np.log(np.full(6, 1 / 6)), np.log([0.6, 0.2, 0.1, 0.05, 0.03, 0.02])),
    "far-apart": (np.log([0.9, 0.05, 0.03, 0.02]), np.log([0.02, 0.03, 0.05, 0.9])),
}


def _expected_q(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    return np.exp(_norm((1 - alpha) * a + alpha * b))


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"top_p": 0.85},
        {"exclude_ids": (1,)},
        {"temperature": 0.7, "temperature_t": 1.5},
        {"top_p": 0.9, "exclude_ids": (0,), "temperature": 1.3},
    ],
    ids=["plain", "top_p", "exclude", "temperature", "all"],
)
def test_frequencies_follow_q_star(name: str, options: dict) -> None:
    """Chi-square of token counts against q* built here from the definitions."""
    a_raw, b_raw = DISTRIBUTIONS[name]
    n = len(a_raw)
    ids = np.arange(n)
    cfg = ds.SamplerConfig(**options)
    res = ds.step(
        *_repeat(ids, a_raw, DRAWS), *_repeat(ids, b_raw, DRAWS), config=cfg, seed=11, positions=np.arange(DRAWS)
    )
    # q* from the definitions: exclusion, temperature, normalisation, teacher top-p, α.
    keep = ~np.isin(ids, options.get("exclude_ids", ()))
    a = np.where(keep, a_raw / cfg.temperature, -np.inf)
    b = np.where(keep, b_raw / (cfg.temperature_t or cfg.temperature), -np.inf)
    a, b = _norm(a), _norm(b)
    if cfg.top_p is not None:
        order = np.argsort(-b, kind="stable")
        before = np.concatenate([[0.0], np.cumsum(np.exp(b[order]))[:-1]])
        support = np.zeros(n, dtype=bool)
        support[order[before < cfg.top_p]] = True
        a, b = _norm(np.where(support, a, -np.inf)), _norm(np.where(support, b, -np.inf))
    alpha = float(res.alpha[0])
    assert np.all(res.alpha == alpha)
    assert alpha == pytest.approx(ds.solve_alpha(a, b), abs=1e-12)  # α after the constraint
    q = _expected_q(a, b, alpha)
    counts = np.bincount(res.token_id, minlength=n)
    assert counts[q == 0].sum() == 0
    pos = q > 0
    if pos.sum() == 1:
        assert counts[pos][0] == DRAWS
    else:
        stat = chisquare(counts[pos], q[pos] * DRAWS)
        assert stat.pvalue > 1e-4, (counts, q * DRAWS)
    np.testing.assert_allclose(res.logq, np.log(q[res.token_id]), atol=1e-12)
    np.testing.assert_allclose(res.logp_theta, a[res.token_id], atol=1e-12)
    np.testing.assert_allclose(res.logp_t, b[res.token_id], atol=1e-12)


def test_top_p_keeps_the_crossing_candidate() -> None:
    ids = np.arange(4)
    b = np.log([0.5, 0.3, 0.15, 0.05])
    a = np.log([0.25, 0.25, 0.25, 0.25])
    # 0.5 < 0.6, 0.5 + 0.3 crosses 0.6: keep ids 0 and 1 only.
    res = ds.step(
        *_repeat(ids, a, 2000), *_repeat(ids, b, 2000), config=ds.SamplerConfig(top_p=0.6), positions=np.arange(2000)
    )
    assert set(np.unique(res.token_id)) == {0, 1}
    assert np.all(res.n_candidates == 2)
    # exactly reaching the threshold does not keep the next one
    res = ds.step(
        *_repeat(ids, a, 500), *_repeat(ids, b, 500), config=ds.SamplerConfig(top_p=0.5), positions=np.arange(500)
    )
    assert set(np.unique(res.token_id)) == {0}


def test_excluded_ids_are_never_sampled() -> None:
    ids_a, lp_a, ids_b, lp_b = topk_pair(3000, 20, vocab=64, seed=3)
    banned = tuple(int(x) for x in np.argsort(-np.bincount(ids_b[:, 0], minlength=64))[:5])
    res = ds.step(ids_a, lp_a, ids_b, lp_b, config=ds.SamplerConfig(exclude_ids=banned))
    assert not np.isin(res.token_id, banned).any()
    plain = ds.step(ids_a, lp_a, ids_b, lp_b)
    assert np.isin(plain.token_id, banned).any()  # the exclusion did something


def test_force_teacher_gives_the_constrained_teacher() -> None:
    ids_a, lp_a, ids_b, lp_b = topk_pair(500, 20, seed=4)
    force = np.arange(500) % 2 == 0
    cfg = ds.SamplerConfig(top_p=0.9, diagnostics=True)
    res = ds.step(ids_a, lp_a, ids_b, lp_b, config=cfg, force_teacher=force)
    assert np.all(res.alpha[force] == 1.0)
    assert np.all(res.alpha[~force] < 1.0)
    np.testing.assert_array_equal(res.logq[force], res.logp_t[force])
    assert np.all(res.kl_t[force] == 0.0)


def test_observed_flags_and_bound_values() -> None:
    ids_a, lp_a = np.array([5, 2]), np.log([0.5, 0.3])
    ids_b, lp_b = np.array([2, 9]), np.log([0.6, 0.1])
    ids, a, b = ds.merge_topk(ids_a, lp_a, ids_b, lp_b)
    # the base list as given, then the teacher-only tokens
    np.testing.assert_array_equal(ids, [5, 2, 9])
    np.testing.assert_allclose(a, np.log([0.5, 0.3, 0.2]))  # min(0.3, 1 − 0.8)
    np.testing.assert_allclose(b, np.log([0.1, 0.6, 0.1]))  # min(0.1, 1 − 0.7)
    ids, a, b = ds.merge_topk(ids_a, lp_a, ids_b, lp_b, missing=-100.0)
    np.testing.assert_allclose(a[2], -100.0)
    ids, a, b = ds.merge_topk(ids_a, lp_a, ids_b, lp_b, missing="drop")
    np.testing.assert_array_equal(ids, [2])
    res = ds.step(
        np.tile(ids_a, (400, 1)),
        np.tile(lp_a, (400, 1)),
        np.tile(ids_b, (400, 1)),
        np.tile(lp_b, (400, 1)),
        positions=np.arange(400),
    )
    for tok, oa, ob in zip(res.token_id, res.observed_theta, res.observed_t, strict=True):
        assert oa == (tok in (5, 2)) and ob == (tok in (2, 9))


def test_drop_without_overlap_keeps_teacher_and_says_so() -> None:
    res = ds.step(
        np.array([1, 2]),
        np.log([0.5, 0.4]),
        np.array([3, 4]),
        np.log([0.6, 0.3]),
        config=ds.SamplerConfig(missing="drop"),
    )
    assert res.no_overlap[0] and res.token_id[0] in (3, 4) and not res.observed_theta[0]


def test_stability_fallback() -> None:
    ids = np.arange(3)
    a, b = np.log([0.98, 0.01, 0.01]), np.log([0.01, 0.01, 0.98])
    res = ds.step(ids, a, ids, b, config=ds.SamplerConfig(stability_js_max=0.3, diagnostics=True))
    assert res.fallback[0] and res.alpha[0] == 1.0 and res.js[0] > 0.3
    res = ds.step(ids, a, ids, b, config=ds.SamplerConfig(stability_js_max=0.69))
    assert not res.fallback[0]
    # overlap: base lists only tokens the teacher does not
    res = ds.step(
        np.array([0, 1]),
        np.log([0.6, 0.3]),
        np.array([1, 2]),
        np.log([0.05, 0.9]),
        config=ds.SamplerConfig(stability_overlap_min=0.1),
    )
    assert res.fallback[0] and res.alpha[0] == 1.0


def test_same_draw_whatever_batch_and_order() -> None:
    ids_a, lp_a, ids_b, lp_b = topk_pair(300, 20, seed=5)
    keys = np.arange(1000, 1300)
    pos = np.arange(300) * 7
    full = ds.step(ids_a, lp_a, ids_b, lp_b, seed=9, row_keys=keys, positions=pos)
    perm = np.random.default_rng(0).permutation(300)
    shuffled = ds.step(
        ids_a[perm], lp_a[perm], ids_b[perm], lp_b[perm], seed=9, row_keys=keys[perm], positions=pos[perm]
    )
    np.testing.assert_array_equal(shuffled.token_id, full.token_id[perm])
    for i in (0, 17, 299):
        one = ds.step(ids_a[i], lp_a[i], ids_b[i], lp_b[i], seed=9, row_keys=[keys[i]], positions=[pos[i]])
        assert one.token_id[0] == full.token_id[i]
    other_seed = ds.step(ids_a, lp_a, ids_b, lp_b, seed=10, row_keys=keys, positions=pos)
    assert (other_seed.token_id != full.token_id).any()


_THREADS_SCRIPT = """
import sys, numpy as np, dualsample_rs as ds
from dualsample_rs.synthetic import topk_pair
a = topk_pair(4096, 100, vocab=512, seed=6)
r = ds.step(*a, seed=3, positions=np.arange(4096))
sys.stdout.write(r.token_id.tobytes().hex() + " " + r.alpha.tobytes().hex())
"""


@pytest.mark.slow
def test_same_draw_whatever_thread_count() -> None:
    outs = []
    for threads in ("1", "2", "4"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        outs.append(
            subprocess.run(
                [sys.executable, "-c", _THREADS_SCRIPT], env=env, check=True, capture_output=True, text=True
            ).stdout
        )
    assert outs[0] == outs[1] == outs[2]


@pytest.mark.slow
def test_gil_is_released() -> None:
    ids_a, lp_a, ids_b, lp_b = topk_pair(20_000, 100, vocab=256, seed=7)
    started, finished = threading.Event(), threading.Event()
    count = 0

    def spin() -> None:
        nonlocal count
        started.wait()
        while not finished.is_set():
            count += 1

    t = threading.Thread(target=spin)
    t.start()
    started.set()
    ds.step(ids_a, lp_a, ids_b, lp_b, config=ds.SamplerConfig(method="ess_balance"))
    finished.set()
    t.join()
    assert count > 20_000


def test_single_row_and_layouts() -> None:
    ids_a, lp_a, ids_b, lp_b = topk_pair(8, 30, seed=8)
    base = ds.step(ids_a, lp_a, ids_b, lp_b, seed=1)
    # int32 / float32 / Fortran order / strided views / lists
    conv = ds.step(ids_a.astype(np.int32), lp_a, np.asfortranarray(ids_b), lp_b.tolist(), seed=1)
    np.testing.assert_array_equal(conv.token_id, base.token_id)
    wide_a = np.repeat(lp_a, 2, axis=1)[:, ::2]
    strided = ds.step(ids_a, wide_a, ids_b, lp_b, seed=1)
    np.testing.assert_array_equal(strided.token_id, base.token_id)
    f32 = ds.step(ids_a, lp_a.astype(np.float32), ids_b, lp_b.astype(np.float32), seed=1)
    assert f32.logq.dtype == np.float64 and np.isfinite(f32.logq).all()
    one = ds.step(ids_a[0], lp_a[0], ids_b[0], lp_b[0], seed=1)
    assert len(one) == 1 and one.token_id.dtype == np.int64 and one.n_candidates.dtype == np.int32


def test_padding_rows_of_different_lengths() -> None:
    ids_a = np.array([[3, 1, -1, -1], [4, 5, 6, 7]])
    lp_a = np.array([[np.log(0.6), np.log(0.3), -np.inf, -np.inf], np.log([0.4, 0.3, 0.2, 0.05])])
    ids_b = np.array([[1, 2], [7, 8]])
    lp_b = np.log([[0.5, 0.4], [0.5, 0.4]])
    res = ds.step(ids_a, lp_a, ids_b, lp_b, config=ds.SamplerConfig(diagnostics=True))
    np.testing.assert_array_equal(res.n_candidates, [3, 5])
    assert np.isin(res.token_id[0], [1, 2, 3]) and np.isin(res.token_id[1], [4, 5, 6, 7, 8])


@pytest.mark.parametrize("method", ["kl_symmetry", "entropy", "ess_balance", "fixed"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"top_p": 0.9},
        {"missing": "drop"},
        {"missing": -100.0, "temperature": 0.8},
        {"exclude_ids": (0, 1, 2, 3)},
        {"stability_js_max": 0.4, "stability_overlap_min": 0.3},
    ],
)
def test_matches_reference(method: str, options: dict) -> None:
    data = topk_pair(400, 20, vocab=256, seed=12)
    cfg = ds.SamplerConfig(method=method, alpha=0.3, diagnostics=True, **options)
    force = np.arange(400) % 13 == 0
    r = ds.step(*data, config=cfg, seed=5, positions=np.arange(400), force_teacher=force)
    e = ref.step(*data, config=cfg, seed=5, positions=np.arange(400), force_teacher=force)
    np.testing.assert_array_equal(r.token_id, e.token_id)
    np.testing.assert_allclose(r.alpha, e.alpha, atol=1e-9, rtol=0)
    for name in ("logq", "logp_theta", "logp_t", "kl_theta", "kl_t", "ess_theta", "ess_t", "entropy", "js"):
        np.testing.assert_allclose(getattr(r, name), getattr(e, name), atol=1e-9, rtol=1e-9, err_msg=name)
    for name in ("observed_theta", "observed_t", "fallback", "no_overlap", "n_candidates"):
        np.testing.assert_array_equal(getattr(r, name), getattr(e, name), err_msg=name)


def test_merge_matches_reference() -> None:
    data = topk_pair(200, 30, vocab=128, seed=13)
    for missing in ("bound", "drop", -50.0):
        got = ds.merge_topk(*data, missing=missing)
        exp = ref.merge_topk(*data, missing=missing)
        np.testing.assert_array_equal(got[0], exp[0])
        np.testing.assert_allclose(got[1], exp[1], atol=1e-12)
        np.testing.assert_allclose(got[2], exp[2], atol=1e-12)


_BUILDS_SCRIPT = """
import sys, numpy as np, dualsample_rs as ds
from dualsample_rs.synthetic import topk_pair
data = topk_pair(512, 60, vocab=1024, seed=21)
out = []
for method in ("kl_symmetry", "ess_balance", "entropy"):
    r = ds.step(*data, config=ds.SamplerConfig(method=method, top_p=0.9, diagnostics=True), seed=4)
    out += [r.token_id.tobytes().hex(), r.alpha.tobytes().hex(), r.logq.tobytes().hex(), r.kl_theta.tobytes().hex()]
out.append(np.asarray(ds.solve_alpha(*ds.merge_topk(*data)[1:])).tobytes().hex())
sys.stdout.write(" ".join(out))
"""


def test_simd_and_baseline_builds_agree_bit_for_bit() -> None:
    """The AVX2 twins and the baseline code give identical numbers (no FMA contraction,
    fixed summation order); DUALSAMPLE_NO_SIMD forces the baseline path."""
    outs = []
    for flag in ("", "1"):
        env = dict(os.environ, DUALSAMPLE_NO_SIMD=flag)
        run = subprocess.run(
            [sys.executable, "-c", _BUILDS_SCRIPT], env=env, check=True, capture_output=True, text=True
        )
        outs.append(run.stdout)
    assert outs[0] == outs[1]


def test_bench_command_prints_a_table() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "bench", "--rows", "16", "--k", "8", "--repeat", "2"],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = run.stdout.splitlines()
    assert lines[0].startswith("16 rows x k=8")
    step_line = next(line for line in lines if line.startswith("step"))
    assert step_line.rstrip().endswith("x") and float(step_line.split()[1]) > 0


@pytest.mark.parametrize("options", [{}, {"top_p": 0.9, "temperature": 0.7}, {"exclude_ids": (0, 1, 2, 3)}])
def test_drafts_match_reference(options: dict) -> None:
    """Acceptance tests and residual draws agree with the numpy twin, row by row."""
    n = 400
    data = topk_pair(n, 20, vocab=256, seed=4)
    rng = np.random.default_rng(1)
    drafts = np.where(rng.random(n) < 0.5, data[2][:, 0], rng.integers(-1, 256, n))
    cfg = ds.SamplerConfig(**options)
    kw = {"config": cfg, "seed": 9, "positions": np.arange(n), "row_keys": np.arange(n) * 3, "drafts": drafts}
    r, e = ds.step(*data, **kw), ref.step(*data, **kw)
    np.testing.assert_array_equal(r.token_id, e.token_id)
    np.testing.assert_array_equal(r.accepted, e.accepted)
    np.testing.assert_allclose(r.logq, e.logq, atol=1e-9, rtol=1e-9)
    assert 0.05 < r.accepted.mean() < 0.95  # both outcomes are exercised
    assert not (r.accepted & (r.token_id != drafts)).any()
    # Without a draft the row is the plain step.
    plain = ds.step(*data, config=cfg, seed=9, positions=np.arange(n), row_keys=np.arange(n) * 3)
    none = drafts < 0
    np.testing.assert_array_equal(r.token_id[none], plain.token_id[none])


@pytest.mark.slow
def test_drafted_tokens_keep_the_law_of_q_star() -> None:
    """Whatever is drafted, the token's frequencies are q*'s (chi-square, fixed seed)."""
    from scipy import stats

    ids_a, ids_b = np.array([0, 1, 2, 3]), np.array([1, 2, 3, 4])
    lp_a, lp_b = np.log([0.4, 0.3, 0.2, 0.1]), np.log([0.1, 0.2, 0.3, 0.4])
    n = 40_000
    rows = (np.tile(x, (n, 1)) for x in (ids_a, lp_a, ids_b, lp_b))
    ia, la, ib, lb = rows
    cfg = ds.SamplerConfig(temperature=1.3)
    ids, a, b = ref.merge_topk(ids_a, lp_a, ids_b, lp_b)
    alpha = ds.step(ids_a, lp_a, ids_b, lp_b, config=cfg).alpha[0]
    q = np.zeros(5)
    q[ids] = np.exp(ref.mix(a / 1.3, b / 1.3, alpha))
    for draft in (1, 4, 0, 77):
        r = ds.step(ia, la, ib, lb, config=cfg, seed=2, positions=np.arange(n), drafts=np.full(n, draft))
        counts = np.bincount(r.token_id, minlength=5)
        live = q > 0
        assert counts[~live].sum() == 0
        assert stats.chisquare(counts[live], n * q[live]).pvalue > 1e-3, (draft, counts, q)


def test_lists_holding_all_their_mass_match_reference() -> None:
    """When each top-k carries its model's whole mass, the unlisted mass is rounding
    (about 1e-16, its sign set by the order of summation); both count it as none, so
    they agree, even where the lists share at most one id."""
    rng = np.random.default_rng(0)
    n = 2000
    ia = np.stack([rng.permutation(50)[:8] for _ in range(n)])
    ib = np.stack([rng.permutation(50)[:8] for _ in range(n)])
    la, lb = np.log(rng.dirichlet(np.ones(8), n)), np.log(rng.dirichlet(np.ones(8), n))
    for cfg in (ds.SamplerConfig(), ds.SamplerConfig(temperature=0.7)):
        kw = {"config": cfg, "seed": 3, "positions": np.arange(n), "row_keys": np.arange(n) * 7}
        r, e = ds.step(ia, la, ib, lb, **kw), ref.step(ia, la, ib, lb, **kw)
        np.testing.assert_array_equal(r.token_id, e.token_id)
        np.testing.assert_array_equal(r.fallback, e.fallback)
        np.testing.assert_allclose(r.alpha, e.alpha, atol=1e-9, rtol=0)
