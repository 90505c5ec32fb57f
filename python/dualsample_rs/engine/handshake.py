"""Start-up: probe each server once into a `ServerInfo`, then check that the two agree.

A probe goes through the backend of the server's dialect (detected and built by
`backends.open_backend`) and finds the model and its context length, how a fixed text
and the known special tokens tokenise, the tokenizer's end-of-sequence string where the
server tells it, and whether the server returns as many log probabilities as asked.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from ..backends import Backend, Context
from ..backends.base import VLLM_MAX_SCORED_IDS
from ..backends.constants import KNOWN_EOS_STRINGS, KNOWN_SPECIAL_STRINGS, VOCAB_PROBE_TEXT
from ..exceptions import BadRequestError, ConfigurationError, LogprobsLimitError

UNLIMITED_LEN = 1 << 62


@dataclass(frozen=True)
class ServerInfo:
    """What the handshake learnt about one server."""

    url: str
    dialect: str
    model: str | None
    max_model_len: int
    probe_ids: tuple[int, ...]
    #: known special strings that the tokenizer maps to a single id
    special_ids: dict[str, int]
    #: ids of the tokenizer's own end-of-sequence strings, where the server tells them
    eos_ids: tuple[int, ...]
    #: how many ids the model knows (an id at or past it is refused before it is sent:
    #: SGLang's whole server falls over on one); None where it could not be found
    vocab_size: int | None = None


async def handshake(backend: Backend, model_name: str | None, top_k: int, scored_ids: int = 0) -> ServerInfo:
    """Probe one server through the backend of its dialect, and say what was found;
    the backend is left set to send the model found (`model_name`, else the first
    served). `scored_ids`: the most ids this server will be asked to score at one position."""
    cards = await backend.models()
    card = next((c for c in cards if model_name is None or c.id == model_name), None)
    if card is None:
        raise ConfigurationError(
            f"model {model_name!r} is not served at {backend.base_url} (it serves {[c.id for c in cards]})"
        )
    backend.model = card.id
    probe = await backend.tokenize(VOCAB_PROBE_TEXT, add_special_tokens=False)
    names = sorted(set(KNOWN_EOS_STRINGS) | set(KNOWN_SPECIAL_STRINGS))
    tokenised = await asyncio.gather(*(backend.tokenize(s, add_special_tokens=False) for s in names))
    specials = {s: t[0] for s, t in zip(names, tokenised, strict=True) if len(t) == 1}
    eos_ids = await _eos_ids(backend, specials)
    vocab_size = await _vocab_size(backend, probe)
    if vocab_size is not None and top_k > vocab_size:
        raise ConfigurationError(f"top_k={top_k} is more than the {vocab_size} ids {backend.base_url}'s model knows")
    await _check_logprobs(backend, top_k, probe, scored_ids)
    return ServerInfo(
        url=backend.base_url,
        dialect=backend.dialect,
        model=card.id,
        max_model_len=card.max_model_len or UNLIMITED_LEN,
        probe_ids=tuple(probe),
        special_ids=specials,
        eos_ids=eos_ids,
        vocab_size=vocab_size,
    )


# How far a top-k value may be from the prompt log probability of the same token: float32
# engines compute the two in different kernels.
RAW_TOLERANCE = 1e-3
# The largest vocabulary searched for (a model knowing more ids is taken as unbounded).
MAX_VOCAB = 1 << 24


async def _vocab_size(backend: Backend, probe: list[int]) -> int | None:
    """The number of ids the server's model knows: the first id it refuses to score,
    found by doubling then bisection (about 2·log2 of the size in one-token requests,
    each a 400 or a tiny answer). None when even the probe's own ids cannot be scored
    (a server without scoring), so that nothing is refused on a guess."""
    context = [Context(probe[:1] or [0])]
    failures = backend.stats.failures  # a refusal here is an answer, not a failure
    try:
        return await _first_unknown_id(backend, context, max(probe, default=0))
    finally:
        backend.stats.failures = failures


async def _first_unknown_id(backend: Backend, context: list[Context], good: int) -> int | None:
    async def known(token: int) -> bool:
        try:
            await backend.score(context, np.array([[token]], dtype=np.int64))
        except BadRequestError:
            return False
        return True

    if not await known(good):
        return None
    bad = max(2 * good, 1024)
    while await known(bad):
        good = bad
        if bad >= MAX_VOCAB:
            return None
        bad *= 2
    while bad - good > 1:
        mid = (good + bad) // 2
        if await known(mid):
            good = mid
        else:
            bad = mid
    return bad


async def _eos_ids(backend: Backend, specials: dict[str, int]) -> tuple[int, ...]:
    facts = await backend.tokenizer_info()
    eos = facts.eos_token if facts is not None else None
    if eos is None:
        return ()
    if eos in specials:  # already tokenised
        return (specials[eos],)
    ids = await backend.tokenize(eos, add_special_tokens=False)
    return (ids[0],) if len(ids) == 1 else ()


async def _check_logprobs(backend: Backend, top_k: int, probe: list[int], scored_ids: int) -> None:
    if backend.max_scored_ids is not None and scored_ids > backend.max_scored_ids:
        raise ConfigurationError(
            f"top_k={top_k} with scoring='exact': {backend.base_url} ({backend.dialect}) scores at most "
            f"{backend.max_scored_ids} ids per position (the teacher's top-k); use top_k <= {VLLM_MAX_SCORED_IDS}"
        )
    context = probe[:4] or [0]
    try:
        top = await backend.topk([Context(context)], top_k)
    except LogprobsLimitError as err:
        raise ConfigurationError(
            f"top_k={top_k} is above the number of log probabilities {backend.base_url} returns "
            f"({err.message}). Start vLLM with --max-logprobs {top_k} (or more), or lower top_k."
        ) from err
    # The values must be the model's raw log-softmax. A server can be set to return
    # processed ones (vLLM --logprobs-mode processed_logprobs, with a model's
    # generation_config.json supplying top_k / top_p / temperature): ask, do not trust a
    # flag. Prompt log probabilities are raw in every mode, so they are the yardstick.
    token, value = int(top.ids[0, 0]), float(top.logp[0, 0])
    raw = (await backend.sequence_logprobs([*context, token], len(context)))[0]
    if abs(raw - value) > RAW_TOLERANCE:
        raise ConfigurationError(
            f"{backend.base_url} returns processed log probabilities, not the model's raw log-softmax (token "
            f"{token}: {value:.6f} in its top-k, {raw:.6f} as a prompt log probability): restart vLLM without "
            "--logprobs-mode processed_logprobs (raw_logprobs is the default)"
        )


def agree(a: ServerInfo, b: ServerInfo) -> None:
    """Refuse two servers whose tokenizers differ: they could not share token ids."""
    if a.probe_ids != b.probe_ids:
        raise ConfigurationError(
            "the two servers do not share a vocabulary: the same probe text tokenises to different ids "
            f"({a.url}: {list(a.probe_ids[:8])}..., {b.url}: {list(b.probe_ids[:8])}...)"
        )
    if a.special_ids != b.special_ids:
        raise ConfigurationError(
            f"the two servers' special tokens differ: {a.url} {a.special_ids}, {b.url} {b.special_ids}"
        )


def stop_and_excluded_ids(
    a: ServerInfo,
    b: ServerInfo,
    stop_token_ids: tuple[int, ...] | None,
    exclude: bool,
    special_ids: tuple[int, ...] | None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The ids that end a sequence (given, else the servers' end-of-sequence ids, else
    every known end-of-sequence string that is one token) and the ids never sampled
    (given or the known special tokens, when `exclude`; stop ids are never excluded)."""
    if stop_token_ids is not None:
        stop = tuple(stop_token_ids)
    elif a.eos_ids or b.eos_ids:
        stop = tuple(sorted(set(a.eos_ids) | set(b.eos_ids)))
    else:
        stop = tuple(sorted({i for s, i in a.special_ids.items() if s in KNOWN_EOS_STRINGS}))
    excluded: tuple[int, ...] = ()
    if exclude:
        found = special_ids
        if found is None:
            found = tuple(i for s, i in a.special_ids.items() if s in KNOWN_SPECIAL_STRINGS)
        excluded = tuple(sorted(set(found) - set(stop)))
    return stop, excluded
