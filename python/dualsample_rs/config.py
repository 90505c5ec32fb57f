"""`CoordinatorConfig`: everything the coordinator needs, validated when built."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from ._constants import DEFAULT_MAX_REPLY_BYTES, DEFAULT_MAX_RETRIES, INITIAL_RETRY_DELAY
from ._core import SamplerConfig
from .exceptions import ConfigurationError, InvalidInputError

AlphaMethod = Literal["kl_symmetry", "fixed", "entropy", "ess_balance"]
Dialect = Literal["auto", "vllm-completions", "vllm-generate", "sglang"]
Scoring = Literal["topk", "exact"]
DIALECT_NAMES = ("auto", "vllm-completions", "vllm-generate", "sglang")


@dataclass(frozen=True)
class ServerSettings:
    """How to reach one model's server, or its replicas (the per-server part of a
    `CoordinatorConfig`)."""

    urls: tuple[str, ...]
    model_name: str | None
    dialect: str
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RunSettings:
    """How a run proceeds (the run part of a `CoordinatorConfig`)."""

    max_concurrency: int
    max_batch_size: int
    scoring: str
    rescore: bool
    seed: int
    speculate: int | str
    max_retries: int
    retry_delay: float
    request_timeout: float
    connection_pool_size: int
    proxy_from_env: bool
    ca_bundle: str | None
    insecure: bool
    max_reply_bytes: int


def _urls(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigurationError(f"{name}: {message}")


@dataclass(frozen=True)
class CoordinatorConfig:
    """Settings of a dual-model generation run, validated when built.

    It is built flat, as earlier tools' configs were, and read in parts: ``servers``
    (per server: URL, model, dialect, key), ``run`` (concurrency, scoring, seed,
    retries, timeouts) and ``sampler_config()`` (the Rust step's settings). Every
    mistake is a `ConfigurationError` here, never a failure later in a run.

    Args:
        theta_url, t_url: base URL of the base model's and of the teacher's server, or a
            list of URLs of replicas of it (each sequence stays on one replica).
        theta_model_name, t_model_name: model names to request; None asks ``/v1/models``.
        dialect: how to talk to the servers: ``"vllm-completions"`` (batched
            ``/v1/completions``), ``"vllm-generate"`` (``/inference/v1/generate``),
            ``"sglang"`` (native ``/generate``), or ``"auto"`` (found at start-up); one
            for both servers or a (theta, teacher) pair.
        scoring: ``"topk"`` merges both models' top-k lists (a token one did not list
            gets the ``missing`` estimate); ``"exact"`` takes the teacher's candidates
            and has the base score exactly those, so every reported number is exact.
        rescore: after a sequence ends, score it whole on both servers and report the
            true log probability of every token (``logp_theta_exact``, ``logp_t_exact``).
        top_k: log probabilities requested per position from each server; vLLM must be
            started with ``--max-logprobs`` at least this (its default cap is 20).
        alpha_method, alpha, alpha_min, alpha_max, alpha_tol, alpha_max_iter, missing,
            temperature, temperature_t: the sampler's knobs (see ``SamplerConfig``).
        force_first_token: take the first generated token from the teacher (α = 1).
        constraint_to_target, target_top_p: restrict q* to the teacher's top-p support.
        exclude_special_tokens, special_token_ids: never sample these ids (None finds
            the server's special tokens); stop ids are never excluded.
        stop_token_ids: ids that end a sequence; None asks the servers.
        enable_stability_check, stability_threshold_js, stability_threshold_overlap,
            auto_fallback: where the two models disagree too much (JS above the
            threshold, or either puts less than the overlap threshold on tokens both
            listed), fall back to the teacher (auto_fallback) or only count it.
        max_concurrency: sequences in flight.
        max_batch_size: sequences per request (a step of up to this many rows).
        connection_pool_size, max_retries, request_timeout: HTTP settings per server
            (the timeout is a deadline for each whole request).
        retry_delay: the first back-off before a retry, in seconds; it doubles with each
            retry up to 8 s (a server's Retry-After takes precedence).
        api_key: one key for both servers, or a (theta, t) pair. Credentials may
            instead be given in a URL (``http://user:password@host``): they are sent as
            Basic auth and shown as ``user:***@`` everywhere.
        proxy_from_env: send requests through the proxies that ``HTTP_PROXY``,
            ``HTTPS_PROXY`` and ``NO_PROXY`` name (as requests and httpx do).
        ca_bundle: a PEM file of certificate authorities to verify TLS servers with
            (default: ``SSL_CERT_FILE`` if set, else the system store).
        insecure: do not verify TLS certificates (a warning says so).
        max_reply_bytes: the largest reply accepted from a server (default 1 GiB).
        seed: keys every draw together with the sequence and position.
        speculate: drafted tokens per speculative round (0: one token per step).
            Each round the teacher drafts up to this many tokens greedily in one
            request, the base scores them in one more, and each is accepted with
            probability q*(token), the first rejected one replaced by a draw from the
            residual: the sequences have exactly the law of the one-token path.
            ``"auto"`` picks it per sequence from its acceptance rate so far. Needs
            ``vllm-generate`` (the base's server with ``--enable-trace-replay``) or
            ``sglang``; otherwise a warning says why and the run takes one token a step.
        verify_prompt_logprobs: let a ``vllm-completions`` base score the drafted
            tokens through prompt log probabilities, which recompute its whole context
            each round (vLLM skips the prefix cache for them); ``topk`` scoring only.
        enable_logging, log_level: configure the ``dualsample_rs`` logger.
    """

    theta_url: str | tuple[str, ...] = "http://localhost:8000"
    t_url: str | tuple[str, ...] = "http://localhost:8001"
    theta_model_name: str | None = None
    t_model_name: str | None = None
    dialect: Dialect | tuple[Dialect, Dialect] = "auto"
    scoring: Scoring = "topk"
    rescore: bool = False
    top_k: int = 20
    alpha_method: AlphaMethod = "kl_symmetry"
    alpha: float = 0.5
    alpha_min: float = 0.0
    alpha_max: float = 1.0
    alpha_tol: float = 1e-10
    alpha_max_iter: int = 100
    missing: Literal["bound", "drop"] | float = "bound"
    temperature: float = 1.0
    temperature_t: float | None = None
    force_first_token: bool = True
    constraint_to_target: bool = False
    target_top_p: float = 0.95
    exclude_special_tokens: bool = False
    special_token_ids: tuple[int, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    enable_stability_check: bool = False
    stability_threshold_js: float = 0.5
    stability_threshold_overlap: float = 0.1
    auto_fallback: bool = True
    max_concurrency: int = 256
    max_batch_size: int = 256
    connection_pool_size: int = 100
    max_retries: int = DEFAULT_MAX_RETRIES
    request_timeout: float = 60.0
    retry_delay: float = INITIAL_RETRY_DELAY
    api_key: str | tuple[str | None, str | None] | None = field(default=None, repr=False)
    proxy_from_env: bool = True
    ca_bundle: str | None = None
    insecure: bool = False
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES
    seed: int = 0
    speculate: int | Literal["auto"] = 0
    verify_prompt_logprobs: bool = False
    enable_logging: bool = False
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in ("theta_url", "t_url"):
            value = getattr(self, name)
            urls = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else ()
            _check(bool(urls), name, f"expected an http(s) URL or a list of them, got {value!r}")
            for url in urls:
                _check(
                    isinstance(url, str) and url.startswith(("http://", "https://")),
                    name,
                    f"expected an http(s) URL, got {url!r}",
                )
            _check(len(set(urls)) == len(urls), name, f"a replica is listed twice: {urls}")
            object.__setattr__(self, name, urls[0] if len(urls) == 1 else urls)
        _check(
            isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and 1 <= self.top_k <= 100_000,
            "top_k",
            f"must be a positive integer, got {self.top_k!r}",
        )
        for name in ("max_concurrency", "max_batch_size", "connection_pool_size", "max_reply_bytes"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                name,
                f"must be a positive integer, got {value!r}",
            )
        _check(self.max_batch_size <= 1024, "max_batch_size", "vLLM accepts at most 1024 prompts per request")
        _check(
            isinstance(self.max_retries, int) and self.max_retries >= 0,
            "max_retries",
            f"must be >= 0, got {self.max_retries!r}",
        )
        for name in (
            "retry_delay",
            "request_timeout",
            "target_top_p",
            "stability_threshold_js",
            "stability_threshold_overlap",
        ):
            value = getattr(self, name)
            _check(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                name,
                f"must be a finite number, got {value!r}",
            )
        _check(0 <= self.retry_delay <= 60, "retry_delay", f"must lie in [0, 60] seconds, got {self.retry_delay!r}")
        _check(self.request_timeout > 0, "request_timeout", f"must be positive, got {self.request_timeout!r}")
        _check(0.0 < self.target_top_p <= 1.0, "target_top_p", f"must lie in (0, 1], got {self.target_top_p}")
        _check(self.stability_threshold_js >= 0, "stability_threshold_js", "must be >= 0")
        _check(0.0 <= self.stability_threshold_overlap <= 1.0, "stability_threshold_overlap", "must lie in [0, 1]")
        _check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and -(2**63) <= self.seed < 2**64,
            "seed",
            f"must be an integer in [-2**63, 2**64), got {self.seed!r}",
        )
        _check(
            self.speculate == "auto"
            or (isinstance(self.speculate, int) and not isinstance(self.speculate, bool) and 0 <= self.speculate <= 64),
            "speculate",
            f'expected an integer in [0, 64] or "auto", got {self.speculate!r}',
        )
        level = logging.getLevelName(str(self.log_level).upper())
        _check(isinstance(level, int), "log_level", f"unknown level {self.log_level!r}")
        dialects = self.dialect if isinstance(self.dialect, tuple) else (self.dialect,)
        _check(
            len(dialects) in (1, 2) and all(d in DIALECT_NAMES for d in dialects),
            "dialect",
            f"expected one of {DIALECT_NAMES} or a (theta, teacher) pair of them, got {self.dialect!r}",
        )
        _check(self.scoring in ("topk", "exact"), "scoring", f'expected "topk" or "exact", got {self.scoring!r}')
        for name in ("rescore", "verify_prompt_logprobs", "force_first_token", "constraint_to_target",
                     "exclude_special_tokens", "enable_stability_check", "auto_fallback",
                     "enable_logging", "proxy_from_env", "insecure"):  # fmt: skip
            _check(isinstance(getattr(self, name), bool), name, f"must be True or False, got {getattr(self, name)!r}")
        if self.ca_bundle is not None:
            _check(
                isinstance(self.ca_bundle, str) and os.path.isfile(self.ca_bundle),
                "ca_bundle",
                f"not a readable file: {self.ca_bundle!r}",
            )
            _check(not self.insecure, "ca_bundle", "give a CA bundle or insecure=True, not both")
        if isinstance(self.api_key, tuple):
            _check(len(self.api_key) == 2, "api_key", "a pair is (theta key, teacher key)")
        for name in ("special_token_ids", "stop_token_ids"):
            value = getattr(self, name)
            if value is not None:
                _check(all(isinstance(t, int) and t >= 0 for t in value), name, "token ids are non-negative integers")
                object.__setattr__(self, name, tuple(value))
        try:
            self.sampler_config(exclude_ids=())
        except InvalidInputError as err:
            raise ConfigurationError(str(err)) from err

    @property
    def api_keys(self) -> tuple[str | None, str | None]:
        return self.api_key if isinstance(self.api_key, tuple) else (self.api_key, self.api_key)

    @property
    def dialects(self) -> tuple[str, str]:
        """(theta, teacher) dialects, either of which may still be ``"auto"``."""
        return self.dialect if isinstance(self.dialect, tuple) else (self.dialect, self.dialect)

    @property
    def run(self) -> RunSettings:
        """The run part: concurrency, scoring, seed, retries and timeouts."""
        return RunSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunSettings)})

    @property
    def servers(self) -> tuple[ServerSettings, ServerSettings]:
        """The per-server part: (base, teacher)."""
        keys, dialects = self.api_keys, self.dialects
        return (
            ServerSettings(_urls(self.theta_url), self.theta_model_name, dialects[0], keys[0]),
            ServerSettings(_urls(self.t_url), self.t_model_name, dialects[1], keys[1]),
        )

    def sampler_config(self, exclude_ids: tuple[int, ...], diagnostics: bool = False) -> SamplerConfig:
        """The sampler part: the Rust step's settings for this run."""
        stability = self.enable_stability_check and self.auto_fallback
        return SamplerConfig(
            method=self.alpha_method,
            alpha=self.alpha,
            alpha_min=self.alpha_min,
            alpha_max=self.alpha_max,
            tol=self.alpha_tol,
            max_iter=self.alpha_max_iter,
            missing=self.missing,
            temperature=self.temperature,
            temperature_t=self.temperature_t,
            top_p=self.target_top_p if self.constraint_to_target else None,
            exclude_ids=exclude_ids,
            stability_js_max=self.stability_threshold_js if stability else None,
            stability_overlap_min=self.stability_threshold_overlap if stability else None,
            diagnostics=diagnostics,
        )

    def replace(self, **changes: Any) -> CoordinatorConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


EnhancedCoordinatorConfig = CoordinatorConfig
