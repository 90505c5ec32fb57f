"""`CoordinatorConfig`: one declaration per setting, the flat keywords of earlier
releases, the same ranges as the Rust `SamplerConfig`, and the flags made from them."""

from __future__ import annotations

import argparse
import math
import pickle
from typing import Any, get_args

import pytest
from dualsample_rs import CoordinatorConfig, EnhancedCoordinatorConfig, InvalidInputError, SamplerConfig
from dualsample_rs.backends import DIALECTS
from dualsample_rs.cli.parsing import _demo_parser, _generate_parser, config_from_args
from dualsample_rs.config.coordinator import (
    DIALECT_NAMES,
    SAMPLER,
    SETTINGS,
    Dialect,
    RunSettings,
    SamplerSettings,
    TransportSettings,
)
from dualsample_rs.config.declare import Range, Setting, check
from dualsample_rs.exceptions import ConfigurationError

# Every keyword CoordinatorConfig took before its settings were split into parts, with a
# value other than the default.
EARLIER_KEYWORDS: dict[str, Any] = {
    "theta_url": ("http://a:1", "http://b:1"), "t_url": "https://c:2", "theta_model_name": "m1",
    "t_model_name": "m2", "dialect": ("vllm-generate", "sglang"), "scoring": "exact", "rescore": True, "top_k": 7,
    "alpha_method": "fixed", "alpha": 0.3, "alpha_min": 0.1, "alpha_max": 0.9, "alpha_tol": 1e-6,
    "alpha_max_iter": 7, "missing": -20.0, "temperature": 0.7, "temperature_t": 0.9, "force_first_token": False,
    "constraint_to_target": True, "target_top_p": 0.8, "exclude_special_tokens": True, "special_token_ids": (1, 2),
    "stop_token_ids": (3,), "enable_stability_check": True, "stability_threshold_js": 0.4,
    "stability_threshold_overlap": 0.2, "auto_fallback": False, "max_concurrency": 8, "max_batch_size": 4,
    "connection_pool_size": 5, "max_retries": 1, "request_timeout": 5.0, "retry_delay": 0.1,
    "api_key": ("k1", "k2"), "proxy_from_env": False, "ca_bundle": None, "insecure": True, "max_reply_bytes": 1000,
    "seed": 9, "speculate": "auto", "verify_prompt_logprobs": True, "enable_logging": True, "log_level": "DEBUG",
}  # fmt: skip

# `dualsample generate`'s flags when they were first made from the declarations.
GENERATE_FLAGS = {
    "--input", "--output", "--resume", "--retry-errors", "--overwrite", "--prompt-field", "--teacher-prompt-field",
    "--teacher-chat", "--quiet", "--ray", "--ray-actors", "--ray-batch-size", "--top-k", "--alpha-method", "--alpha",
    "--alpha-min", "--alpha-max", "--alpha-tol", "--missing", "--max-tokens", "--temperature", "--temperature-t",
    "--target-top-p", "--no-force-first-token", "--exclude-special-tokens", "--special-token-ids",
    "--stop-token-ids", "--stability-check", "--stability-js", "--stability-overlap", "--scoring", "--rescore",
    "--seed", "--speculate", "--verify-prompt-logprobs", "--diagnostics", "--theta-url", "--t-url", "--dialect",
    "--theta-model", "--t-model", "--api-key", "--max-concurrency", "--max-batch-size", "--max-retries",
    "--retry-delay", "--request-timeout", "--no-proxy-env", "--ca-bundle", "--insecure", "--max-reply-mb",
    "--log-level", "-h", "--help", "--teacher", "--teacher-field", "--default-teacher", "--mix",
}  # fmt: skip


def test_flat_keywords_and_parts_give_the_same_sampler_config() -> None:
    flat = CoordinatorConfig(
        alpha_method="fixed", alpha=0.3, alpha_min=0.1, alpha_max=0.9, alpha_tol=1e-6, alpha_max_iter=7,
        missing=-20.0, temperature=0.7, temperature_t=0.9, constraint_to_target=True, target_top_p=0.8,
        enable_stability_check=True, stability_threshold_js=0.4, stability_threshold_overlap=0.2, seed=3,
    )  # fmt: skip
    sampler = SamplerSettings(
        method="fixed", alpha=0.3, alpha_min=0.1, alpha_max=0.9, tol=1e-6, max_iter=7, missing=-20.0,
        temperature=0.7, temperature_t=0.9, top_p=0.8, enable_stability_check=True, stability_js_max=0.4,
        stability_overlap_min=0.2,
    )  # fmt: skip
    nested = CoordinatorConfig(sampler=sampler, run=RunSettings(seed=3))
    assert flat == nested and flat.sampler == sampler
    want = SamplerConfig(
        method="fixed", alpha=0.3, alpha_min=0.1, alpha_max=0.9, tol=1e-6, max_iter=7, missing=-20.0,
        temperature=0.7, temperature_t=0.9, top_p=0.8, exclude_ids=(4, 2), stability_js_max=0.4,
        stability_overlap_min=0.2, diagnostics=True,
    )  # fmt: skip
    assert flat.sampler_config((2, 4), diagnostics=True) == want == nested.sampler.kernel_config((2, 4), True)
    # the thresholds reach the kernel only when it is to fall back
    counted = flat.replace(auto_fallback=False).sampler_config(())
    assert counted.stability_js_max is None and counted.stability_overlap_min is None
    # flat keywords change the given parts
    mixed = CoordinatorConfig(sampler=sampler, top_k=5, theta_url="http://h:1")
    assert mixed.sampler.top_k == 5 and mixed.sampler.tol == 1e-6 and mixed.transport.theta_url == "http://h:1"


def test_every_earlier_keyword_is_taken_and_read() -> None:
    config = CoordinatorConfig(**EARLIER_KEYWORDS)
    for name, value in EARLIER_KEYWORDS.items():
        assert getattr(config, name) == value, name
        one = CoordinatorConfig(**{name: value})
        assert getattr(one, name) == value or name == "target_top_p", name  # target_top_p alone is off
        assert getattr(CoordinatorConfig().replace(**{name: value}), name) == getattr(one, name), name
    assert EnhancedCoordinatorConfig is CoordinatorConfig
    # each earlier name and its part's name are one setting
    assert (config.sampler.tol, config.sampler.method, config.sampler.max_iter) == (1e-6, "fixed", 7)
    assert (config.sampler.stability_js_max, config.sampler.stability_overlap_min) == (0.4, 0.2)
    assert config.sampler.top_p == 0.8 and config.transport.max_retries == 1 and config.run.seed == 9
    assert [s.api_key for s in config.servers] == ["k1", "k2"]
    assert [s.urls for s in config.servers] == [("http://a:1", "http://b:1"), ("https://c:2",)]


def test_the_earlier_top_p_pair() -> None:
    off = CoordinatorConfig()
    assert off.sampler.top_p is None and not off.constraint_to_target and off.target_top_p == 0.95
    assert CoordinatorConfig(constraint_to_target=True).sampler.top_p == 0.95
    assert CoordinatorConfig(target_top_p=0.8).sampler.top_p is None  # off, as before
    on = CoordinatorConfig(top_p=0.7)
    assert on.constraint_to_target and on.target_top_p == 0.7
    assert on.replace(constraint_to_target=False).sampler.top_p is None
    assert on.replace(target_top_p=0.6).sampler.top_p == 0.6
    with pytest.raises(ConfigurationError, match=r"^target_top_p: "):
        CoordinatorConfig(target_top_p=1.5)
    with pytest.raises(ConfigurationError, match=r"^constraint_to_target: "):
        CoordinatorConfig(constraint_to_target="yes")
    with pytest.raises(TypeError, match="not both"):
        CoordinatorConfig(top_p=0.5, target_top_p=0.5)


def test_errors_name_the_keyword_given() -> None:
    with pytest.raises(ConfigurationError, match=r"^alpha_tol: expected a number > 0, got -1.0"):
        CoordinatorConfig(alpha_tol=-1.0)
    with pytest.raises(ConfigurationError, match=r"^tol: "):
        CoordinatorConfig(tol=-1.0)
    with pytest.raises(ConfigurationError, match=r"^tol: "):
        SamplerSettings(tol=-1.0)
    with pytest.raises(ConfigurationError, match=r"^seed: expected an integer in \[-2\*\*63, 2\*\*64\)"):
        CoordinatorConfig(seed=2**64)
    with pytest.raises(ConfigurationError, match=r"^max_batch_size: expected an integer in \[1, 1024\]"):
        CoordinatorConfig(max_batch_size=1025)
    with pytest.raises(ConfigurationError, match=r"^alpha_min: "):
        CoordinatorConfig(alpha_min=0.6, alpha_max=0.4)
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        CoordinatorConfig(nope=1)
    with pytest.raises(TypeError, match="one setting"):
        CoordinatorConfig(tol=1e-3, alpha_tol=1e-3)
    with pytest.raises(ConfigurationError, match=r"^sampler: expected a SamplerSettings"):
        CoordinatorConfig(sampler=TransportSettings())  # type: ignore[arg-type]
    assert issubclass(ConfigurationError, ValueError)


def test_a_config_survives_pickling() -> None:  # Ray sends it to its actors
    config = CoordinatorConfig(**EARLIER_KEYWORDS)
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and copy.alpha_tol == 1e-6 and copy.sampler_config(()) == config.sampler_config(())
    assert "k1" not in repr(config)  # keys are never shown


def _edges(s: Setting) -> tuple[list[Any], list[Any]]:
    """Values just inside and just outside a setting's declared range."""
    # No declared range means any finite number (see settings._matches): both infinities are out.
    rng = s.range or Range(lo_open=True, hi_open=True)
    integer = int in (get_args(s.hint) or (s.hint,))
    inside: list[Any] = []
    outside: list[Any] = [] if integer else [math.nan]
    for bound, is_open, inward in ((rng.lo, rng.lo_open, math.inf), (rng.hi, rng.hi_open, -math.inf)):
        if integer:
            if math.isinf(bound):
                continue
            step = 1 if inward > 0 else -1
            (outside if is_open else inside).append(int(bound))
            (inside if is_open else outside).append(int(bound) + (step if is_open else -step))
        elif is_open:
            outside.append(bound)
            inside.append(math.nextafter(bound, inward))
        else:
            inside.append(bound)
            if not math.isinf(bound):
                outside.append(math.nextafter(bound, -inward))
    return inside, outside


@pytest.mark.parametrize("s", [s for s in SAMPLER if s.kernel], ids=lambda s: s.name)
def test_python_and_rust_take_the_same_range(s: Setting) -> None:
    """The declaration is the one source of the ranges; the Rust SamplerConfig keeps its
    own checks as a guard, and both must agree at every edge."""
    if s.name == "method":
        inside, outside = list(get_args(s.hint)), ["nope", "KL_SYMMETRY"]
    else:
        inside, outside = _edges(s)
    assert inside and outside
    for value, ok in [(v, True) for v in inside] + [(v, False) for v in outside]:
        try:
            check(s, value)
            python_ok = True
        except ConfigurationError:
            python_ok = False
        try:
            SamplerConfig(**{s.name: value})
            rust_ok = True
        except InvalidInputError:
            rust_ok = False
        assert (python_ok, rust_ok) == (ok, ok), (s.name, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    _generate_parser(sub)
    _demo_parser(sub)
    return parser


def test_flags_are_made_from_the_declarations() -> None:
    parser = _parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]  # type: ignore[union-attr]
    flags = {o for a in generate._actions for o in a.option_strings}
    # today's flags all kept; any other is a declared setting's
    assert GENERATE_FLAGS <= flags
    assert flags - GENERATE_FLAGS <= {s.flag.name for s in SETTINGS if s.flag is not None}
    by_flag = {a.option_strings[0]: a for a in generate._actions}
    for s in SETTINGS:
        if s.flag is None:
            continue
        action = by_flag[s.flag.name]
        assert s.help.split(" (")[0] in action.help.replace("%%", "%") or s.name == "enable_logging", s.name
        if s.hint is not bool:
            assert action.default == s.flag_default(), s.name
    assert by_flag["--alpha-method"].choices == ["kl_symmetry", "fixed", "entropy", "ess_balance"]
    assert by_flag["--max-reply-mb"].default == 1024.0
    # no flag given: the declared defaults
    args = parser.parse_args(["generate", "--input", "x", "--output", "y"])
    assert config_from_args(args) == CoordinatorConfig()
    args = parser.parse_args(["generate", "--input", "x", "--output", "y", "--alpha-tol", "1e-6",
                              "--target-top-p", "0.8", "--no-force-first-token", "--stability-js", "0.3",
                              "--log-level", "DEBUG", "--max-reply-mb", "0.5", "--max-concurrency", "4"])  # fmt: skip
    config = config_from_args(args)
    assert (config.sampler.tol, config.sampler.top_p, config.sampler.force_first_token) == (1e-6, 0.8, False)
    assert config.sampler.stability_js_max == 0.3 and config.run.max_batch_size == 4
    assert (config.run.log_level, config.run.enable_logging) == ("DEBUG", True)
    assert config.transport.max_reply_bytes == 1 << 19
    demo = parser.parse_args(["demo"])
    assert (demo.dialect, demo.scoring, demo.speculate, demo.seed) == ("vllm-completions", "topk", 0, 0)


def test_dialect_names_are_listed_once() -> None:
    assert DIALECT_NAMES == get_args(Dialect) == ("auto", "vllm-completions", "vllm-generate", "sglang")
    assert set(DIALECT_NAMES) == {"auto", *DIALECTS}  # each one a backend
    demo = _parser()._subparsers._group_actions[0].choices["demo"]  # type: ignore[union-attr]
    (dialect,) = [a for a in demo._actions if "--dialect" in a.option_strings]
    assert dialect.choices == list(DIALECT_NAMES[1:])


def test_docstrings_carry_every_setting() -> None:
    doc = CoordinatorConfig.__doc__ or ""
    parts = {"sampler": SamplerSettings, "transport": TransportSettings, "run": RunSettings}
    for s in SETTINGS:
        assert f"    {s.name}" in doc and s.help in doc and s.help in (parts[s.part].__doc__ or ""), s.name
    assert "alpha_tol" in doc and "stability_threshold_js" in doc
