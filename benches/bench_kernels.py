"""Rust kernels against the numpy reference, one table per (function, batch, k).

`make bench` runs this file with RAYON_NUM_THREADS=1 (the one-core comparison the
README quotes) and once more with every core for the `parallel` rows.
"""

from __future__ import annotations

import os

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import reference as ref
from dualsample_rs.synthetic import topk_pair

SHAPES = [(1, 20), (1, 100), (64, 20), (64, 100), (1024, 20), (1024, 100)]
CONFIG = ds.SamplerConfig(method="kl_symmetry", tol=1e-10)
IMPLS = {"rust": ds, "reference": ref}
THREADS = os.environ.get("RAYON_NUM_THREADS", "all")

_cache: dict[tuple[int, int], tuple] = {}


def _data(rows: int, k: int) -> tuple:
    if (rows, k) not in _cache:
        _cache[rows, k] = topk_pair(rows, k, vocab=8192, seed=rows * 1000 + k)
    return _cache[rows, k]


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("rows,k", SHAPES)
def test_step(benchmark, impl: str, rows: int, k: int) -> None:
    benchmark.group = f"step B={rows} k={k} threads={THREADS}"
    data = _data(rows, k)
    if rows == 1:
        data = tuple(x[0] for x in data)  # a single 1-D row, as a one-sequence caller passes it
    pos = np.arange(rows)
    res = benchmark(IMPLS[impl].step, *data, config=CONFIG, seed=1, positions=pos)
    assert len(res.token_id) == rows


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("rows,k", [s for s in SHAPES if s[0] > 1])
def test_solve_alpha(benchmark, impl: str, rows: int, k: int) -> None:
    benchmark.group = f"solve_alpha B={rows} k={k} threads={THREADS}"
    _, a, b = ds.merge_topk(*_data(rows, k))
    out = benchmark(IMPLS[impl].solve_alpha, a, b, tol=1e-10)
    assert out.shape == (rows,)


# The α solver beside plain bisection of the same equation to the same tolerance (the
# baseline issue 25 asks for): the same group as the rows above, so each table shows
# Halley, bisection and the numpy reference side by side. Bisection is reachable only
# through the private `_core` hooks; "halley" here is what the public functions run.
SOLVER_SHAPES = [(1024, 20), (1024, 100)]
SOLVERS = ["halley", "bisect"]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"rust-{s}")
@pytest.mark.parametrize("rows,k", SOLVER_SHAPES)
def test_solve_alpha_solver(benchmark, solver: str, rows: int, k: int) -> None:
    benchmark.group = f"solve_alpha B={rows} k={k} threads={THREADS}"
    _, a, b = ds.merge_topk(*_data(rows, k))
    alphas, sweeps = benchmark(ds._core._solve_alpha_sweeps, a, b, solver=solver, tol=1e-10)
    assert alphas.shape == (rows,)
    benchmark.extra_info["sweeps_per_row"] = float(sweeps.mean())


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: f"rust-{s}")
@pytest.mark.parametrize("rows,k", SOLVER_SHAPES)
def test_step_solver(benchmark, solver: str, rows: int, k: int) -> None:
    benchmark.group = f"step B={rows} k={k} threads={THREADS}"
    config = ds._core._with_alpha_solver(CONFIG, solver)
    res = benchmark(ds.step, *_data(rows, k), config=config, seed=1, positions=np.arange(rows))
    assert len(res.token_id) == rows
