"""`CoordinatorConfig`: every setting of a run, declared once and validated when built.

The settings are the fields of three parts: `SamplerSettings` (the Rust step's
``SamplerConfig`` and the sampling around it), `TransportSettings` (how the servers are
reached) and `RunSettings` (how a run proceeds). Each field's declaration (see
`settings.setting`) gives its type, default, range, help and flag; the checks here, the
docstrings and the flags of ``dualsample generate`` are all made from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .._core import SamplerConfig
from ..backends import Dialect
from ..backends.constants import (
    DEFAULT_CONNECTIONS,
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    INITIAL_RETRY_DELAY,
    MAX_LOGP,
    MAX_PROMPTS_PER_REQUEST,
    MAX_RETRY_DELAY,
    MAX_SPECULATE,
    MIB,
)
from ..backends.http import ConnectionOptions
from ..exceptions import ConfigurationError, InvalidInputError
from .declare import Flag, Range, Setting, check, declared, document, setting

AlphaMethod = Literal["kl_symmetry", "fixed", "entropy", "ess_balance"]
Scoring = Literal["topk", "exact"]
DIALECT_NAMES: tuple[str, ...] = get_args(Dialect)
# `target_top_p` of earlier releases when `constraint_to_target` was off (now: top_p=None).
LEGACY_TARGET_TOP_P = 0.95
SPECULATE_RANGE = Range(0, MAX_SPECULATE)
POSITIVE = Range(0, lo_open=True, hi_open=True)
AT_LEAST_ONE = Range(1, hi_open=True)
UNIT = Range(0, 1)
# The kernel's own defaults: every setting the Rust step takes starts from its value
# there (tests/test_defaults.py holds the declarations, the flags and the numpy twin to it).
KERNEL = SamplerConfig()


def _ids_text(text: str) -> tuple[int, ...]:
    try:
        ids = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids are non-negative, got {text!r}")
    return ids


def _missing_text(text: str) -> Literal["bound", "drop"] | float:
    match text:  # a match narrows the text to the literal (`in` would not)
        case "bound" | "drop":
            return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected "bound", "drop" or a float log probability, got {text!r}') from None


def speculate_text(text: str) -> int | str:
    """``--speculate``'s value: an integer in `SPECULATE_RANGE` or ``auto``."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = -1
    if k not in SPECULATE_RANGE:
        raise argparse.ArgumentTypeError(f'expected an integer in {SPECULATE_RANGE} or "auto", got {text!r}')
    return k


_TEACHER_OPTIONS = {"dialect": str, "model": str, "temperature": float, "chat": bool, "prompt_field": str}


def teacher_text(text: str) -> tuple[str, TeacherSettings]:
    """``--teacher``'s value: ``NAME=URL[,URL...]`` then ``;OPTION=VALUE`` for any of
    dialect, model, temperature, chat (yes/no) and prompt_field."""
    head, *options = text.split(";")
    name, sep, urls = head.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=URL[,URL...][;OPTION=VALUE...], got {text!r}")
    kwargs: dict[str, Any] = {"urls": tuple(u.strip() for u in urls.split(",") if u.strip())}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip().replace("-", "_")
        if key not in _TEACHER_OPTIONS or (not sep and key != "chat"):
            raise argparse.ArgumentTypeError(
                f"{name}: expected OPTION=VALUE with OPTION among {', '.join(_TEACHER_OPTIONS)}, got {option!r}"
            )
        kind = _TEACHER_OPTIONS[key]
        if kind is bool:
            if value not in ("", "yes", "no", "true", "false"):
                raise argparse.ArgumentTypeError(f"{name}: chat is yes or no, got {value!r}")
            kwargs["chat"] = value in ("", "yes", "true")
        elif kind is float:
            try:
                kwargs[key] = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{name}: {key} is a number, got {value!r}") from None
        else:
            kwargs["model_name" if key == "model" else key] = value
    try:
        return name.strip(), _teacher(name.strip(), kwargs)
    except ConfigurationError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def mix_text(text: str) -> dict[str, float]:
    """``--mix``'s value: ``NAME=WEIGHT,NAME=WEIGHT...``."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:  # no "=", or no number after it
            raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT,NAME=WEIGHT..., got {text!r}") from None
    return weights


def _pair(value: str, _default: Any) -> str | tuple[str, ...]:
    """One value for both servers, or THETA,T."""
    return tuple(value.split(",", 1)) if value and "," in value else value


def _url_list(given: list[str] | None, default: str) -> str | tuple[str, ...]:
    """Repeated flags and comma-separated lists, flattened; one URL stays a string."""
    urls = tuple(u.strip() for arg in (given or [default]) for u in arg.split(",") if u.strip())
    return urls[0] if len(urls) == 1 else urls


def _one_url(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) and len(value) == 1 else value


def _urls_problem(value: str | tuple[str, ...]) -> str | None:
    urls = (value,) if isinstance(value, str) else value
    if not urls:
        return "expected an http(s) URL or a list of them, got none"
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        return f"expected an http(s) URL, got {bad[0]!r}"
    return f"a replica is listed twice: {urls}" if len(set(urls)) != len(urls) else None


def _file_problem(path: str | None) -> str | None:
    return None if path is None or os.path.isfile(path) else f"not a readable file: {path!r}"


def _level_problem(level: str) -> str | None:
    return None if isinstance(logging.getLevelName(level.upper()), int) else f"unknown level {level!r}"


def _validate(part: Any, settings: tuple[Setting, ...]) -> None:
    for s in settings:
        value = getattr(part, s.name)
        stored = check(s, value)
        if stored is not value:
            object.__setattr__(part, s.name, stored)


@dataclass(frozen=True)
class SamplerSettings:
    top_k: int = setting(
        20, "log probabilities requested per position from each server", range=Range(1, 100_000),
        doc="vLLM must be started with ``--max-logprobs`` at least this (its default cap is 20)",
        flag=Flag("--top-k", "sampling"),
    )  # fmt: skip
    method: AlphaMethod = setting(  # noqa: RUF009 (setting() is a dataclass field)
        KERNEL.method, "how alpha, the weight on the teacher, is chosen at each position", old="alpha_method",
        doc='``"kl_symmetry"`` (KL(q||pi_theta) = KL(q||pi_t)), ``"fixed"`` (``alpha``), ``"entropy"`` '
            '(H(pi_theta) / (H(pi_theta) + H(pi_t))) or ``"ess_balance"`` (equal effective sample sizes)',
        kernel=True, flag=Flag("--alpha-method", "sampling"),
    )  # fmt: skip
    alpha: float = setting(
        KERNEL.alpha, "alpha for method fixed", range=UNIT, kernel=True, flag=Flag("--alpha", "sampling")
    )
    alpha_min: float = setting(
        KERNEL.alpha_min,
        "the least alpha any rule gives",
        range=UNIT,
        kernel=True,
        flag=Flag("--alpha-min", "sampling"),
    )
    alpha_max: float = setting(
        KERNEL.alpha_max,
        "the greatest alpha any rule gives",
        range=UNIT,
        kernel=True,
        flag=Flag("--alpha-max", "sampling"),
    )
    tol: float = setting(
        KERNEL.tol, "tolerance on alpha of the iterative rules", range=POSITIVE, old="alpha_tol", kernel=True,
        flag=Flag("--alpha-tol", "sampling"),
    )  # fmt: skip
    max_iter: int = setting(
        KERNEL.max_iter,
        "iteration cap of the iterative rules",
        range=Range(1, (1 << 32) - 1),
        old="alpha_max_iter",
        kernel=True,
    )
    missing: Literal["bound", "drop"] | float = setting(
        KERNEL.missing, 'log probability of a token one model did not list: "bound", "drop" or a float log probability',
        range=Range(hi=MAX_LOGP), kernel=True, flag=Flag("--missing", "sampling", text=_missing_text),
        doc='``"bound"`` is log min(smallest listed probability, unlisted mass); ``"drop"`` keeps only tokens '
            "both listed",
    )  # fmt: skip
    temperature: float = setting(
        KERNEL.temperature, "divides the base model's log probabilities", range=POSITIVE, kernel=True,
        flag=Flag("--temperature", "sampling"),
    )  # fmt: skip
    temperature_t: float | None = setting(
        KERNEL.temperature_t, "the teacher's temperature (none: the base's)", range=POSITIVE, kernel=True,
        flag=Flag("--temperature-t", "sampling"),
    )  # fmt: skip
    top_p: float | None = setting(
        KERNEL.top_p, "restrict q* to the teacher's top-p support (none: no restriction)",
        range=Range(0, 1, lo_open=True), doc="earlier releases: ``constraint_to_target`` and ``target_top_p``",
        kernel=True, flag=Flag("--target-top-p", "sampling"),
    )  # fmt: skip
    force_first_token: bool = setting(
        True, "take the first generated token from the teacher (alpha = 1)",
        flag=Flag("--no-force-first-token", "sampling"),
    )  # fmt: skip
    exclude_special_tokens: bool = setting(
        False, "never sample special tokens", doc="stop ids are never excluded",
        flag=Flag("--exclude-special-tokens", "sampling"),
    )  # fmt: skip
    special_token_ids: tuple[int, ...] | None = setting(
        None, "the ids exclude_special_tokens excludes (none: the servers' special tokens)", range=Range(0),
        flag=Flag("--special-token-ids", "sampling", text=_ids_text, syntax="comma-separated"),
    )  # fmt: skip
    enable_stability_check: bool = setting(
        False, "fall back to the teacher where the two models disagree too much",
        doc="without ``auto_fallback`` such positions are only counted",
        flag=Flag("--stability-check", "sampling"),
    )  # fmt: skip
    stability_js_max: float = setting(
        0.5, "the stability check acts where the models' Jensen-Shannon divergence exceeds this", range=Range(0),
        old="stability_threshold_js", kernel=True, flag=Flag("--stability-js", "sampling"),
    )  # fmt: skip
    stability_overlap_min: float = setting(
        0.1, "the stability check acts where either model puts less than this mass on tokens both listed",
        range=UNIT, old="stability_threshold_overlap", kernel=True, flag=Flag("--stability-overlap", "sampling"),
    )  # fmt: skip
    auto_fallback: bool = setting(True, "the stability check falls back to the teacher (False: it only counts)")

    def __post_init__(self) -> None:
        _validate(self, SAMPLER)
        if self.alpha_min > self.alpha_max:
            raise ConfigurationError(
                f"alpha_min: alpha_min ({self.alpha_min}) is greater than alpha_max ({self.alpha_max})"
            )
        try:  # the kernel's own checks, as a guard
            self.kernel_config()
        except InvalidInputError as err:
            raise ConfigurationError(str(err)) from err

    @property
    def teacher_temperature(self) -> float:
        """The temperature the teacher's log probabilities are divided by."""
        return self.temperature if self.temperature_t is None else self.temperature_t

    def kernel_config(self, exclude_ids: tuple[int, ...] = (), diagnostics: bool = False) -> SamplerConfig:
        """The Rust step's settings, with the ids never sampled and whether to report
        divergences. The stability thresholds reach it only with ``auto_fallback`` (else
        the run counts the positions itself)."""
        args = {s.name: getattr(self, s.name) for s in SAMPLER if s.kernel}
        if not (self.enable_stability_check and self.auto_fallback):
            args["stability_js_max"] = args["stability_overlap_min"] = None
        return SamplerConfig(**args, exclude_ids=exclude_ids, diagnostics=diagnostics)


@dataclass(frozen=True)
class ServerSettings:
    """How to reach one model's server, or its replicas (see `TransportSettings.servers`)."""

    urls: tuple[str, ...]
    model_name: str | None
    dialect: str
    api_key: str | None = dataclasses.field(default=None, repr=False)


@dataclass(frozen=True)
class TeacherSettings:
    """One named teacher of a run with several (``CoordinatorConfig(teachers=...)``).

    Args:
        urls: its server, or its replicas.
        dialect: how to talk to it (None: the run's teacher dialect; ``"auto"``: found at
            start-up).
        model_name: the name to request (None: ask ``/v1/models``).
        api_key: its key (None: the run's teacher key).
        temperature: its temperature (None: the run's ``temperature_t``).
        chat: wrap its prompt in its chat template (None: as the run or the call says).
        prompt_field: the input field its prompt is read from (None: the run's teacher
            prompt field).
    """

    urls: str | tuple[str, ...]
    dialect: str | None = None
    model_name: str | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    temperature: float | None = None
    chat: bool | None = None
    prompt_field: str | None = None

    def __post_init__(self) -> None:
        urls = (self.urls,) if isinstance(self.urls, str) else tuple(self.urls)
        problem = _urls_problem(urls)
        if problem is not None:
            raise ConfigurationError(f"urls: {problem}")
        object.__setattr__(self, "urls", urls)
        if self.dialect is not None and self.dialect not in DIALECT_NAMES:
            raise ConfigurationError(f"dialect: expected one of {', '.join(DIALECT_NAMES)}, got {self.dialect!r}")
        if self.temperature is not None:
            check(BY_NAME["temperature_t"], self.temperature, "temperature")
        if self.chat is not None and not isinstance(self.chat, bool):
            raise ConfigurationError(f"chat: expected True, False or None, got {self.chat!r}")

    def server(self) -> ServerSettings:
        assert isinstance(self.urls, tuple) and self.dialect is not None  # see teacher_settings()
        return ServerSettings(self.urls, self.model_name, self.dialect, self.api_key)


# A teacher's name: what input lines route by and records show.
_TEACHER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _teacher(name: Any, spec: Any) -> TeacherSettings:
    if not isinstance(name, str) or not _TEACHER_NAME.match(name):
        raise ConfigurationError(
            f"teachers: a teacher's name is 1 to 64 letters, digits, '_', '.' or '-', got {name!r}"
        )
    try:
        if isinstance(spec, TeacherSettings):
            return spec
        if isinstance(spec, str | list | tuple):
            return TeacherSettings(tuple(spec) if not isinstance(spec, str) else spec)
        if isinstance(spec, dict):
            return TeacherSettings(**spec)
    except (ConfigurationError, TypeError) as err:
        raise ConfigurationError(f"teachers[{name!r}]: {err}") from None
    raise ConfigurationError(
        f"teachers[{name!r}]: expected a URL, a list of URLs, a dict or a TeacherSettings, got {type(spec).__name__}"
    )


def mix_weights(value: Any, names: tuple[str, ...], where: str) -> tuple[tuple[str, float], ...]:
    """A mixture's weights among teachers, checked: named teachers of the run, finite and
    at least 0, summing to 1 (within 1e-9); in the run's order of teachers."""
    if not isinstance(value, dict) or not value:
        raise InvalidInputError(f"{where}: expected an object of teacher names to weights, got {value!r}")
    for name, w in value.items():
        if name not in names:
            raise InvalidInputError(f"{where}: unknown teacher {name!r}; the run's teachers: {', '.join(names)}")
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf"):
            raise InvalidInputError(f"{where}: the weight of {name!r} must be a finite number >= 0, got {w!r}")
    total = sum(float(w) for w in value.values())
    if abs(total - 1.0) > 1e-9:
        raise InvalidInputError(f"{where}: the weights must sum to 1, they sum to {total!r}")
    return tuple((name, float(value[name])) for name in names if name in value)


def mixture_problem(config: CoordinatorConfig) -> str | None:
    """Why a run cannot sample from mixtures of teachers (None: it can)."""
    if config.run.speculate:
        return "a mixture of teachers cannot run with speculative rounds (speculate): drafts come from one teacher"
    if config.run.scoring == "exact":
        return "a mixture of teachers runs with scoring topk, not exact"
    return None


def tempered_mixture(weights: list[float], temperatures: list[float]) -> tuple[list[float], float]:
    """Teachers at weights w_i with their own temperatures τ_i, as one temperature for the
    mixed teacher: Σ w_i log π_i / τ_i = (Σ w_i′ log π_i) / τ with w_i′ ∝ w_i / τ_i and
    τ = 1 / Σ (w_i / τ_i) (docs/design.md, section 1.4.1). Equal temperatures keep the
    weights as given, bit for bit."""
    if len(set(temperatures)) == 1:
        return weights, temperatures[0]
    scaled = [w / t for w, t in zip(weights, temperatures, strict=True)]
    total = math.fsum(scaled)
    return [s / total for s in scaled], 1.0 / total


@dataclass(frozen=True)
class TransportSettings:
    theta_url: str | tuple[str, ...] = setting(
        "http://localhost:8000", "the base model's server, or a list of its replicas (each sequence stays on one)",
        normalize=_one_url, check=_urls_problem, doc="credentials may be given in it (``http://user:password@host``): "
        "they are sent as Basic auth and shown as ``user:***@``",
        flag=Flag("--theta-url", "servers", text=str, default=None, convert=_url_list, repeat=True,
                  syntax="repeat it, or give a comma-separated list, for replicas"),
    )  # fmt: skip
    t_url: str | tuple[str, ...] = setting(
        "http://localhost:8001", "the teacher's server, or a list of its replicas", normalize=_one_url,
        check=_urls_problem, flag=Flag("--t-url", "servers", text=str, default=None, convert=_url_list, repeat=True,
                                       syntax="repeat it, or give a comma-separated list, for replicas"),
    )  # fmt: skip
    theta_model_name: str | None = setting(
        None, "the base model's name to request (none: ask /v1/models)", flag=Flag("--theta-model", "servers")
    )
    t_model_name: str | None = setting(
        None, "the teacher's name to request (none: ask /v1/models)", flag=Flag("--t-model", "servers")
    )
    dialect: Dialect | tuple[Dialect, Dialect] = setting(  # noqa: RUF009 (setting() is a dataclass field)
        "auto", f"how to talk to the servers: {', '.join(DIALECT_NAMES)}; one for both, or a (theta, teacher) pair",
        doc='``"vllm-completions"`` (batched ``/v1/completions``), ``"vllm-generate"`` '
            '(``/inference/v1/generate``), ``"sglang"`` (native ``/generate``), ``"auto"`` (found at start-up)',
        flag=Flag("--dialect", "servers", text=str, convert=_pair, syntax="THETA,T for a pair"),
    )  # fmt: skip
    api_key: str | tuple[str | None, str | None] | None = setting(
        None, "one key for both servers, or a (theta, teacher) pair", secret=True,
        flag=Flag("--api-key", "servers", text=str, convert=_pair, syntax="THETA_KEY,T_KEY for a pair"),
    )  # fmt: skip
    max_retries: int = setting(
        DEFAULT_MAX_RETRIES, "retries of a failed request", range=Range(0), flag=Flag("--max-retries", "servers")
    )
    retry_delay: float = setting(
        INITIAL_RETRY_DELAY, f"the first back-off in seconds (doubles, up to {MAX_RETRY_DELAY:g})", range=Range(0, 60),
        doc="a server's Retry-After takes precedence", flag=Flag("--retry-delay", "servers"),
    )  # fmt: skip
    request_timeout: float = setting(
        DEFAULT_TIMEOUT, "the deadline of each whole request, in seconds", range=POSITIVE,
        flag=Flag("--request-timeout", "servers"),
    )  # fmt: skip
    connection_pool_size: int = setting(DEFAULT_CONNECTIONS, "connections kept to each server", range=AT_LEAST_ONE)
    proxy_from_env: bool = setting(
        True, "send requests through the proxies HTTP_PROXY, HTTPS_PROXY and NO_PROXY name",
        flag=Flag("--no-proxy-env", "servers"),
    )  # fmt: skip
    ca_bundle: str | None = setting(
        None, "PEM certificate authorities to verify https servers with (none: SSL_CERT_FILE or the system's)",
        check=_file_problem, flag=Flag("--ca-bundle", "servers", metavar="PATH"),
    )  # fmt: skip
    insecure: bool = setting(
        False, "do not verify https certificates", doc="a warning says so", flag=Flag("--insecure", "servers")
    )
    max_reply_bytes: int = setting(
        DEFAULT_MAX_REPLY_BYTES, "the largest reply accepted from a server", range=AT_LEAST_ONE,
        flag=Flag("--max-reply-mb", "servers", text=float, scale=MIB, syntax="in MiB"),
    )  # fmt: skip

    def __post_init__(self) -> None:
        _validate(self, TRANSPORT)
        if self.ca_bundle is not None and self.insecure:
            raise ConfigurationError("ca_bundle: give a CA bundle or insecure=True, not both")

    @property
    def api_keys(self) -> tuple[str | None, str | None]:
        return self.api_key if isinstance(self.api_key, tuple) else (self.api_key, self.api_key)

    def connection_options(self) -> ConnectionOptions:
        """What every connection to the servers is opened with."""
        return ConnectionOptions(
            timeout=self.request_timeout, max_retries=self.max_retries, retry_delay=self.retry_delay,
            connection_pool_size=self.connection_pool_size, trust_env=self.proxy_from_env, ca_bundle=self.ca_bundle,
            insecure=self.insecure, max_reply_bytes=self.max_reply_bytes,
        )  # fmt: skip

    @property
    def dialects(self) -> tuple[str, str]:
        """(theta, teacher) dialects, either of which may still be ``"auto"``."""
        return self.dialect if isinstance(self.dialect, tuple) else (self.dialect, self.dialect)

    @property
    def servers(self) -> tuple[ServerSettings, ServerSettings]:
        """(base, teacher)."""
        keys, dialects = self.api_keys, self.dialects
        urls = [(u,) if isinstance(u, str) else u for u in (self.theta_url, self.t_url)]
        return (
            ServerSettings(urls[0], self.theta_model_name, dialects[0], keys[0]),
            ServerSettings(urls[1], self.t_model_name, dialects[1], keys[1]),
        )


@dataclass(frozen=True)
class RunSettings:
    scoring: Scoring = setting(  # noqa: RUF009 (setting() is a dataclass field)
        "topk", "topk: merge both models' top-k lists; exact: the base scores the teacher's candidates, so every "
        "number is exact", flag=Flag("--scoring", "sampling"),
    )  # fmt: skip
    rescore: bool = setting(
        False, "score each finished sequence whole and add each token's exact log probabilities (extra requests)",
        flag=Flag("--rescore", "sampling"),
    )  # fmt: skip
    seed: int = setting(
        0, "keys every draw together with the sequence and position", range=Range(-(1 << 63), 1 << 64, hi_open=True),
        flag=Flag("--seed", "sampling"),
    )  # fmt: skip
    speculate: int | Literal["auto"] = setting(
        0, "tokens the teacher drafts per round, each verified exactly (0: one token per step; auto: chosen per "
        "sequence); needs vllm-generate (base with --enable-trace-replay) or sglang", range=SPECULATE_RANGE,
        doc="The base scores the drafts in one more request and each is accepted with probability q*(token), the "
            "first rejected one replaced by a draw from the residual: the sequences have exactly the law of the "
            "one-token path. With another dialect a warning says why and the run takes one token a step",
        flag=Flag("--speculate", "sampling", text=speculate_text, metavar="K"),
    )  # fmt: skip
    verify_prompt_logprobs: bool = setting(
        False, "with speculate: a vllm-completions base scores the drafts, recomputing contexts",
        doc="through prompt log probabilities, which skip vLLM's prefix cache; topk scoring only",
        flag=Flag("--verify-prompt-logprobs", "sampling"),
    )  # fmt: skip
    save_topk: int = setting(
        0, "keep the teacher's N most likely ids and their raw log probabilities at every generated position "
        "(0: none; at most top_k)", range=Range(0, 100_000), flag=Flag("--save-topk", "sampling", metavar="N"),
        doc="records gain topk_ids_t and topk_logp_t; with scoring exact the base's exact values of the same ids "
            "too (topk_ids_theta, topk_logp_theta)",
    )  # fmt: skip
    save_topk_of: Literal["teacher", "both"] = setting(
        "teacher", "whose top ids save_topk keeps: the teacher's, or both models' (topk_ids_theta, topk_logp_theta)",
        flag=Flag("--save-topk-of", "sampling"),
    )  # fmt: skip
    stop_token_ids: tuple[int, ...] | None = setting(
        None, "ids that end a sequence (none: ask the servers)", range=Range(0),
        flag=Flag("--stop-token-ids", "sampling", text=_ids_text, syntax="comma-separated"),
    )  # fmt: skip
    max_concurrency: int = setting(
        256, "sequences in flight", range=AT_LEAST_ONE, flag=Flag("--max-concurrency", "servers")
    )
    max_batch_size: int = setting(
        256, f"sequences per request (vLLM takes at most {MAX_PROMPTS_PER_REQUEST})",
        range=Range(1, MAX_PROMPTS_PER_REQUEST), flag=Flag("--max-batch-size", "servers"),
    )  # fmt: skip
    log_level: str = setting(
        "INFO", "the level of the dualsample_rs logger, e.g. INFO or DEBUG", check=_level_problem,
        flag=Flag("--log-level", "servers", default=None, convert=lambda given, default: given or default,
                  syntax="given: the logger is configured"),
    )  # fmt: skip
    enable_logging: bool = setting(
        False, "configure the dualsample_rs logger",
        flag=Flag("--log-level", "servers", default=None, convert=lambda given, _: given is not None),
    )  # fmt: skip

    def __post_init__(self) -> None:
        _validate(self, RUN)


SAMPLER = declared(SamplerSettings, "sampler")
TRANSPORT = declared(TransportSettings, "transport")
RUN = declared(RunSettings, "run")
SETTINGS: tuple[Setting, ...] = SAMPLER + TRANSPORT + RUN
# Every setting under its name and under its earlier keyword.
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS} | {s.old: s for s in SETTINGS if s.old}
_PARTS = {"sampler": SamplerSettings, "transport": TransportSettings, "run": RunSettings}
_LEGACY_TOP_P = ("constraint_to_target", "target_top_p")
_OWN = frozenset({"teachers", "default_teacher", "mix"})

SamplerSettings.__doc__ = document(
    "The sampler part of a `CoordinatorConfig`: the Rust step's settings (``kernel_config()``) and the\n"
    "sampling around it. Names are the kernel's where it has one.",
    SAMPLER,
)
TransportSettings.__doc__ = document(
    "The transport part of a `CoordinatorConfig`: how the servers are reached.", TRANSPORT
)
RunSettings.__doc__ = document("The run part of a `CoordinatorConfig`: how a run proceeds.", RUN)


def _changes(given: dict[str, Any], sampler: SamplerSettings) -> dict[str, dict[str, Any]]:
    """Flat keywords (today's names or earlier ones), checked and sorted by part."""
    changes: dict[str, dict[str, Any]] = {part: {} for part in _PARTS}
    seen: dict[str, str] = {}
    for key, value in given.items():
        if key in _LEGACY_TOP_P:
            continue
        s = BY_NAME.get(key)
        if s is None:
            raise TypeError(f"CoordinatorConfig got an unexpected keyword argument {key!r}")
        if s.name in seen:
            raise TypeError(f"CoordinatorConfig: {seen[s.name]} and {key} are one setting; give it once")
        seen[s.name] = key
        changes[s.part][s.name] = check(s, value, key)
    legacy = {k: given[k] for k in _LEGACY_TOP_P if k in given}
    if legacy:
        if "top_p" in seen:
            raise TypeError("CoordinatorConfig: give top_p, or constraint_to_target and target_top_p, not both")
        on = legacy.get("constraint_to_target", sampler.top_p is not None)
        if not isinstance(on, bool):
            raise ConfigurationError(f"constraint_to_target: expected True or False, got {on!r}")
        p = legacy.get("target_top_p", sampler.top_p if sampler.top_p is not None else LEGACY_TARGET_TOP_P)
        p = check(BY_NAME["top_p"], p, "target_top_p")
        changes["sampler"]["top_p"] = p if on else None
    return changes


@dataclass(frozen=True, init=False)
class CoordinatorConfig:
    sampler: SamplerSettings
    transport: TransportSettings
    run: RunSettings
    #: the named teachers in order (empty: the one teacher at ``t_url``)
    teachers: tuple[tuple[str, TeacherSettings], ...]
    #: where a record that names no teacher goes (None: the first named)
    default_teacher: str | None
    #: a run-wide mixture of teachers, ((name, weight), ...) (None: each record its teacher)
    mix: tuple[tuple[str, float], ...] | None

    def __init__(
        self,
        *,
        sampler: SamplerSettings | None = None,
        transport: TransportSettings | None = None,
        run: RunSettings | None = None,
        teachers: dict[str, Any] | tuple[tuple[str, TeacherSettings], ...] | None = None,
        default_teacher: str | None = None,
        mix: dict[str, float] | tuple[tuple[str, float], ...] | None = None,
        **settings: Any,
    ) -> None:
        self._set_teachers(teachers, default_teacher, mix)
        parts: dict[str, Any] = {"sampler": sampler, "transport": transport, "run": run}
        for name, cls in _PARTS.items():
            part = parts[name]
            if part is None:
                part = cls()
            elif not isinstance(part, cls):
                raise ConfigurationError(f"{name}: expected a {cls.__name__}, got {type(part).__name__}")
            parts[name] = part
        for name, changed in _changes(settings, parts["sampler"]).items():
            value = dataclasses.replace(parts[name], **changed) if changed else parts[name]
            object.__setattr__(self, name, value)
        if self.mix is not None:
            problem = mixture_problem(self)
            if problem is not None:
                raise ConfigurationError(f"mix: {problem}")
        if self.run.save_topk > self.sampler.top_k:
            raise ConfigurationError(
                f"save_topk: {self.run.save_topk} ids per position, but the servers are asked for top_k="
                f"{self.sampler.top_k}; give save_topk <= top_k"
            )

    def _set_teachers(self, teachers: Any, default: str | None, mix: Any) -> None:
        named = tuple(teachers.items()) if isinstance(teachers, dict) else tuple(teachers or ())
        checked = tuple((name, _teacher(name, spec)) for name, spec in named)
        names = tuple(name for name, _ in checked)
        if len(set(names)) != len(names):
            raise ConfigurationError(f"teachers: a name is given twice: {names}")
        if default is not None and default not in names:
            raise ConfigurationError(
                f"default_teacher: {default!r} is not a named teacher"
                + (f" (the run's teachers: {', '.join(names)})" if names else " (give teachers=)")
            )
        weights = None
        if mix is not None:
            if not names:
                raise ConfigurationError("mix: a mixture needs named teachers (teachers=)")
            try:
                weights = mix_weights(dict(mix), names, "mix")
            except InvalidInputError as err:
                raise ConfigurationError(str(err)) from None
        object.__setattr__(self, "teachers", checked)
        object.__setattr__(self, "default_teacher", default)
        object.__setattr__(self, "mix", weights)

    def teacher_settings(self) -> dict[str, TeacherSettings]:
        """Every teacher by name (the unnamed one under ``""``), in order; a named
        teacher's dialect and key, where it gives none, are the run's teacher's."""
        server = self.transport.servers[1]
        if not self.teachers:
            return {"": TeacherSettings(server.urls, server.dialect, server.model_name, server.api_key)}
        return {
            name: dataclasses.replace(
                t,
                dialect=server.dialect if t.dialect is None else t.dialect,
                api_key=server.api_key if t.api_key is None else t.api_key,
            )
            for name, t in self.teachers
        }

    def __getattr__(self, name: str) -> Any:
        """A setting read flat, under its name or its earlier keyword."""
        if name.startswith("_") or name in _PARTS or name in _OWN:  # not set yet (unpickling)
            raise AttributeError(name)
        if name in _LEGACY_TOP_P:
            top_p = self.sampler.top_p
            return top_p is not None if name == "constraint_to_target" else top_p or LEGACY_TARGET_TOP_P
        s = BY_NAME.get(name)
        if s is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(getattr(self, s.part), s.name)

    @property
    def api_keys(self) -> tuple[str | None, str | None]:
        return self.transport.api_keys

    @property
    def dialects(self) -> tuple[str, str]:
        """(theta, teacher) dialects, either of which may still be ``"auto"``."""
        return self.transport.dialects

    @property
    def servers(self) -> tuple[ServerSettings, ServerSettings]:
        """The per-server part of the transport: (base, teacher)."""
        return self.transport.servers

    @property
    def base_scores_candidates(self) -> bool:
        """Whether the base is asked to score the teacher's candidates (exact scoring):
        then records can hold the base's values of the teacher's top-k too."""
        return self.run.scoring == "exact"

    def sampler_config(self, exclude_ids: tuple[int, ...], diagnostics: bool = False) -> SamplerConfig:
        """The Rust step's settings for this run (see `SamplerSettings.kernel_config`)."""
        return self.sampler.kernel_config(exclude_ids, diagnostics)

    def replace(self, **changes: Any) -> CoordinatorConfig:
        """A copy with some settings (flat keywords) or parts changed, validated again."""
        parts: dict[str, Any] = {"sampler": self.sampler, "transport": self.transport, "run": self.run}
        parts |= {"teachers": self.teachers, "default_teacher": self.default_teacher, "mix": self.mix}
        return CoordinatorConfig(**(parts | changes))


CoordinatorConfig.__doc__ = document(
    """Settings of a dual-model generation run, validated when built: a `sampler` part, a
`transport` part and a `run` part.

Built from its parts (``CoordinatorConfig(sampler=SamplerSettings(top_p=0.9))``), from flat
keywords (``CoordinatorConfig(top_p=0.9, seed=1)``, each setting under its name or its
earlier keyword, e.g. ``alpha_tol`` for ``tol``), or both (the keywords change the given
parts). Every setting can also be read flat (``config.top_k``, ``config.alpha_tol``).
Every mistake is a `ConfigurationError` here, never a failure later in a run. Earlier
releases' ``constraint_to_target`` and ``target_top_p`` are still taken and read; they
are ``top_p`` now (none: no restriction).

Example:
    >>> CoordinatorConfig(alpha_tol=1e-8, top_k=5).sampler.tol
    1e-08
""",
    SETTINGS,
    flat=True,
    lead="sampler, transport, run: the parts (their defaults where not given).\n"
    "    teachers: named teachers, ``{name: URL, [URLs], {...} or TeacherSettings}``, in order; each\n"
    "        record goes to the one it names (``t_url`` is then not used).\n"
    "    default_teacher: where a record that names none goes (default: the first).\n"
    "    mix: a run-wide mixture of the named teachers, ``{name: weight}`` summing to 1.",
)


EnhancedCoordinatorConfig = CoordinatorConfig
