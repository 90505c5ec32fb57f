"""The kernels through the abi3 extension (the stable ABI of CPython 3.10, what the wheel
and `make build-prod` build) against the same crate built for this interpreter only, one
table per (function, batch, k): what the limited API costs a call.

The per-version build comes from `make per-version` (the extension without the crate's
`abi3` feature, in target/per-version); `make bench` points DUALSAMPLE_PER_VERSION at it
and both load in this one process. Without it the "per-version" cases are skipped.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from types import ModuleType

import dualsample_rs as ds
import numpy as np
import pytest
from dualsample_rs import reference
from dualsample_rs.synthetic import topk_pair

SHAPES = [(1, 20), (1024, 100)]
BUILDS = ["abi3", "per-version"]
THREADS = os.environ.get("RAYON_NUM_THREADS", "all")
# The file name a per-version build of this interpreter has, e.g. .cpython-311-x86_64-linux-gnu.so.
VERSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]

_cache: dict[object, object] = {}


def _per_version() -> ModuleType:
    """The per-version `_core`, loaded beside the package's own under another name."""
    if "per-version" not in _cache:
        folder = os.environ.get("DUALSAMPLE_PER_VERSION")
        if not folder:
            pytest.skip("DUALSAMPLE_PER_VERSION is not set (make per-version, then make bench)")
        path = os.path.join(folder, "_core" + VERSION_SUFFIX)
        # The name's last part must stay `_core`: it names the module's init function.
        loader = importlib.machinery.ExtensionFileLoader("dualsample_rs_per_version._core", path)
        spec = importlib.util.spec_from_file_location(loader.name, path, loader=loader)
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        _cache["per-version"] = module
    module = _cache["per-version"]
    assert isinstance(module, ModuleType)
    return module


def _core(build: str) -> ModuleType:
    if build == "abi3":
        core = ds._core
        assert core.__file__ is not None and core.__file__.endswith(".abi3.so"), f"not the abi3 build: {core.__file__}"
        return core
    core = _per_version()
    assert core.__file__ is not None and core.__file__.endswith(VERSION_SUFFIX), core.__file__
    return core


def _data(rows: int, k: int) -> tuple[np.ndarray, ...]:
    if (rows, k) not in _cache:
        data = topk_pair(rows, k, vocab=8192, seed=rows * 1000 + k)
        if rows == 1:
            data = tuple(x[0] for x in data)  # a single 1-D row, as a one-sequence caller passes it
        _cache[rows, k] = data
    data = _cache[rows, k]
    assert isinstance(data, tuple)
    return data


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("rows,k", SHAPES)
def test_step(benchmark, build: str, rows: int, k: int) -> None:
    benchmark.group = f"abi3 step B={rows} k={k} threads={THREADS}"
    core = _core(build)
    config = core.SamplerConfig(method="kl_symmetry", tol=1e-10)
    pos = np.arange(rows)
    res = benchmark(core.step, *_data(rows, k), config=config, seed=1, positions=pos)
    # either build draws the numpy twin's tokens
    twin = reference.step(*_data(rows, k), config=ds.SamplerConfig(method="kl_symmetry", tol=1e-10), seed=1,
                          positions=pos)  # fmt: skip
    np.testing.assert_array_equal(res.token_id, twin.token_id)


@pytest.mark.parametrize("build", BUILDS)
@pytest.mark.parametrize("rows,k", SHAPES)
def test_solve_alpha(benchmark, build: str, rows: int, k: int) -> None:
    benchmark.group = f"abi3 solve_alpha B={rows} k={k} threads={THREADS}"
    core = _core(build)
    _, a, b = ds.merge_topk(*_data(rows, k))
    out = benchmark(core.solve_alpha, a, b, tol=1e-10)
    np.testing.assert_allclose(np.asarray(out), reference.solve_alpha(a, b, tol=1e-10), atol=1e-9)
