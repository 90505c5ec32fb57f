"""What a record should hold, worked out in the test from the engine's own answers and
independently of the package: each position's top-k lists asked of the engines over
plain HTTP, merged, α found with a scalar root-finder, log q* from the definition."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import numpy as np
from scipy.optimize import brentq

# (ids, raw log probabilities) of a model's top-k at the next position of a context
TopK = tuple[list[int], list[float]]


def vllm_topk(url: str, model: str, ids: list[int], k: int) -> TopK:
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "logprobs": k,
            "return_tokens_as_token_ids": True}  # fmt: skip
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0]
    pairs = sorted(((int(key.split(":")[1]), float(v)) for key, v in top.items()), key=lambda p: -p[1])[:k]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def sglang_topk(url: str, model: str, ids: list[int], k: int) -> TopK:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
            "top_logprobs_num": k}  # fmt: skip
    r = httpx.post(url + "/generate", json=body, timeout=60)
    r.raise_for_status()
    triples = r.json()["meta_info"]["output_top_logprobs"][0]
    return [int(t[1]) for t in triples], [float(t[0]) for t in triples]


def vllm_prompt_logprobs(url: str, model: str, ids: list[int], start: int) -> list[float]:
    """log π(ids[i] | ids[:i]) for i from `start`, from vLLM's own prompt log probabilities."""
    body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0, "prompt_logprobs": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    r.raise_for_status()
    entries = r.json()["choices"][0]["prompt_logprobs"]
    return [float(entries[i][str(ids[i])]["logprob"]) for i in range(start, len(ids))]


def sglang_prompt_logprobs(url: str, model: str, ids: list[int], start: int) -> list[float]:
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True,
            "logprob_start_len": 0}  # fmt: skip
    r = httpx.post(url + "/generate", json=body, timeout=60)
    r.raise_for_status()
    entries = r.json()["meta_info"]["input_token_logprobs"]
    return [float(entries[i][0]) for i in range(start, len(ids))]


def _bound(lp: list[float]) -> float:
    """log min(smallest listed probability, unlisted mass), the mass at least 1e-12."""
    total = float(np.logaddexp.reduce(lp))
    return min(min(lp), float(np.log(max(-np.expm1(min(total, 0.0)), 1e-12))))


def expected_step(theta: TopK, teacher: TopK, token: int, forced: bool) -> tuple[float, float, float, float]:
    """(α, log q*(token), log π_θ(token), log π_t(token)) for the default settings:
    kl_symmetry, missing "bound", temperature 1, no support constraint, nothing
    excluded; the first token forced to the teacher. The last two are the models' raw
    values where listed, else the bound."""
    ids = list(dict.fromkeys([*theta[0], *teacher[0]]))
    raw = []
    for listed_ids, listed_lp in (theta, teacher):
        table = dict(zip(listed_ids, listed_lp, strict=True))
        fill = _bound(listed_lp)
        raw.append(np.array([table.get(i, fill) for i in ids]))
    a = raw[0] - np.logaddexp.reduce(raw[0])
    b = raw[1] - np.logaddexp.reduce(raw[1])
    d = b - a

    def mean_d(alpha: float) -> float:
        w = a + alpha * d
        q = np.exp(w - np.logaddexp.reduce(w))
        return float(q @ d)

    if forced:
        alpha = 1.0
    elif np.ptp(d) < 1e-12:
        alpha = 0.5
    else:
        lo, hi = mean_d(0.0), mean_d(1.0)
        alpha = 0.0 if lo >= 0 else 1.0 if hi <= 0 else brentq(mean_d, 0.0, 1.0, xtol=1e-13)
    w = a + alpha * d
    logq = w - np.logaddexp.reduce(w)
    k = ids.index(token)
    return alpha, float(logq[k]), float(raw[0][k]), float(raw[1][k])


def check_record(
    record_ids: list[int],
    prompt_theta: list[int],
    prompt_t: list[int],
    alphas: list[float],
    logq: list[float],
    logp_theta: list[float],
    logp_t: list[float],
    topk_theta: Callable[[list[int]], TopK],
    topk_t: Callable[[list[int]], TopK],
    tol: float,
) -> int:
    """Every position of a record against `expected_step` on the engines' own lists;
    returns the number of positions checked."""
    for i, token in enumerate(record_ids):
        theta = topk_theta(prompt_theta + record_ids[:i])
        teacher = topk_t(prompt_t + record_ids[:i])
        alpha, lq, lt, lb = expected_step(theta, teacher, token, forced=i == 0)
        assert abs(alphas[i] - alpha) < tol, (i, alphas[i], alpha)
        assert abs(logq[i] - lq) < tol, (i, logq[i], lq)
        assert abs(logp_theta[i] - lt) < tol and abs(logp_t[i] - lb) < tol, (i, logp_theta[i], lt, logp_t[i], lb)
    return len(record_ids)
