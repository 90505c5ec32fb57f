"""The kernel owns its defaults: every setting the Rust step takes has, in the settings'
declarations, on the command line and in the numpy twin, the default `SamplerConfig()`
has on the Rust side."""

from __future__ import annotations

import inspect

import pytest
from dualsample_rs import CoordinatorConfig, SamplerConfig, reference, solve_alpha
from dualsample_rs.cli.parsing import _generate_parser, config_from_args
from dualsample_rs.config.coordinator import SAMPLER

RUST = SamplerConfig()
KERNEL_SETTINGS = [s for s in SAMPLER if s.kernel]
# Two thresholds are off in the kernel until the stability check turns them on; the
# declarations hold the values the check then uses (kernel_config passes None when off).
THRESHOLDS = {"stability_js_max", "stability_overlap_min"}


def test_every_kernel_setting_is_one_the_kernel_has() -> None:
    assert {s.name for s in KERNEL_SETTINGS} <= set(dir(RUST))
    assert len(KERNEL_SETTINGS) >= 10


@pytest.mark.parametrize("setting", KERNEL_SETTINGS, ids=lambda s: s.name)
def test_the_declared_default_is_the_kernels(setting: object) -> None:
    name = setting.name  # type: ignore[attr-defined]
    rust = getattr(RUST, name)
    if name in THRESHOLDS:
        assert rust is None
        assert getattr(CoordinatorConfig().sampler_config(()), name) is None
        return
    assert setting.default == rust  # type: ignore[attr-defined]
    assert getattr(CoordinatorConfig().sampler, name) == rust
    # and the settings handed to the kernel by default are its own defaults
    assert getattr(CoordinatorConfig().sampler_config(()), name) == rust


def test_the_command_line_defaults_are_the_kernels() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    _generate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["generate", "--input", "i", "--output", "o", "--theta-url", "http://a", "--t-url", "http://b"]
    )
    sampler = config_from_args(args).sampler
    for s in KERNEL_SETTINGS:
        if s.name not in THRESHOLDS:
            assert getattr(sampler, s.name) == getattr(RUST, s.name), s.name


def _defaults(fn: object) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(fn).parameters.items()  # type: ignore[arg-type]
        if p.default is not inspect.Parameter.empty
    }


def test_the_numpy_twin_takes_the_kernels_defaults() -> None:
    twin, rust = _defaults(reference.solve_alpha), _defaults(solve_alpha)
    assert twin == rust
    assert twin == {k: getattr(RUST, k) for k in ("method", "alpha", "alpha_min", "alpha_max", "tol", "max_iter")}
    assert _defaults(reference.merge_topk)["missing"] == RUST.missing
    assert reference._params() == {k: getattr(RUST, k) for k in twin}
