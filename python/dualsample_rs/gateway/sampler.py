"""The boundary between the gateway's protocol layer and the sampling engine.

The HTTP layer parses each route's body into one :class:`SampleRequest`, asks the
:class:`Sampler` for the base's prompt ids (which checks the prompts), then runs one
:meth:`Sampler.sample` per choice and renders the :class:`ChoiceResult` in the route's
own shape. Choice ``i`` of a request belongs to prompt ``i // n`` and is that prompt's
sample ``i % n``, as vLLM and SGLang number a batch's choices.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = ["ChoiceResult", "FinishReason", "Prompt", "Route", "SampleRequest", "Sampler", "TokenResult"]

Route = Literal["completions", "chat", "vllm_generate", "sglang_generate"]
FinishReason = Literal["stop", "length", "abort"]


@dataclass(frozen=True)
class Prompt:
    """One prompt, exactly one of: text, token ids, or chat messages (each message a
    mapping with ``role`` and a string ``content``, other keys kept as sent)."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[Mapping[str, Any], ...] | None = None


@dataclass(frozen=True)
class SampleRequest:
    """A generation request, whatever route it came by.

    Sampling fields left out by the client are None (the sampler's defaults apply);
    ``top_k`` None also stands for the engines' neutral values (-1, 0). ``logprobs`` is
    the number of alternatives wanted per position (0: the sampled token's only; None:
    no log probabilities). ``max_tokens`` None means up to the context.
    """

    route: Route
    prompts: tuple[Prompt, ...]
    n: int = 1
    max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    echo: bool = False
    return_token_ids: bool = False
    tokens_as_ids: bool = False
    stream: bool = False
    include_usage: bool = False
    # Tokens per streamed event (the engines' ``stream_interval``); None: the gateway's.
    stream_interval: int | None = None
    model: str | None = None
    # Chat only: passed to the chat template.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: tuple[Mapping[str, Any], ...] | None = None
    chat_template_kwargs: Mapping[str, Any] | None = None
    # Extensions the engines would ignore.
    teacher_prompts: tuple[Prompt, ...] | None = None
    teacher: str | None = None
    teachers: Mapping[str, float] | None = None
    id: str | int | None = None
    # SGLang /generate: one prompt sent bare (not a list), its rid(s), text in logprobs.
    single: bool = True
    rids: tuple[str, ...] | None = None
    return_text_in_logprobs: bool = False
    # Fields the client sent that the sampler may want (cache_salt, priority, ...).
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def num_choices(self) -> int:
        """Choices in the answer: prompts × n."""
        return len(self.prompts) * self.n

    def prompt_index(self, choice_index: int) -> int:
        """The prompt a choice samples from."""
        return choice_index // self.n

    def teacher_prompt(self, choice_index: int) -> Prompt | None:
        """The teacher's own context for a choice, if the request gave one."""
        if self.teacher_prompts is None:
            return None
        return self.teacher_prompts[self.prompt_index(choice_index)]


@dataclass(frozen=True)
class TokenResult:
    """One sampled token.

    Attributes:
        token_id: the token.
        text: the output text this token adds, as it may be sent now (a sampler holds
            text back while it may still become a stop string, so the texts of a
            choice's tokens concatenate to a prefix of its final text).
        logprob: log q*(token) under the law it was drawn from, after the request's
            temperature, top_p, top_k and min_p.
        top: the most probable tokens under that same law, most probable first, as
            ``(token_id, logprob)``; at least ``SampleRequest.logprobs`` of them.
        pieces: each listed id's own text (the sampled token's and every id of `top`),
            for logprob keys when ids are not asked for.
        alpha: α at this position.
        logp_base: log π_θ(token), None if the base did not score it.
        logp_teacher: log π_t(token), None if no teacher scored it.
        observed_base: whether the base's value was observed (not inferred).
        observed_teacher: likewise for the teacher.
        fallback: whether the position fell back (α forced to 1).
    """

    token_id: int
    text: str
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    pieces: Mapping[int, str] = field(default_factory=dict)
    alpha: float = 0.0
    logp_base: float | None = None
    logp_teacher: float | None = None
    observed_base: bool = False
    observed_teacher: bool = False
    fallback: bool = False


@dataclass(frozen=True)
class ChoiceResult:
    """A finished choice.

    Attributes:
        tokens: every generated token, in order.
        text: the final output text (stop string cut unless asked to keep it).
        finish_reason: ``stop`` (EOS, a stop id or a stop string), ``length`` or ``abort``.
        stop_reason: the stop id or string matched, None for EOS or a length finish.
        teacher: the teacher (or mixture) the choice was sampled with.
    """

    tokens: tuple[TokenResult, ...]
    text: str
    finish_reason: FinishReason
    stop_reason: int | str | None = None
    teacher: str | None = None


class Sampler(Protocol):
    """What the gateway needs of the sampling engine.

    Errors: a bad prompt raises :class:`~dualsample_rs.gateway.errors.RequestError` (a
    400 naming the field); a server down past its retries raises
    :class:`~dualsample_rs.gateway.errors.UpstreamError` (a 503 naming the server).
    """

    async def tokenize(self, req: SampleRequest) -> list[list[int]]:
        """The base's prompt ids, one list per prompt of `req` (text tokenized, messages
        rendered with the base's chat template), each checked: non-empty, ids in the
        vocabulary, room in the context."""
        ...

    async def detokenize(self, token_ids: list[int]) -> str:
        """The base's text for ids (used to echo a prompt given as ids)."""
        ...

    async def sample(
        self,
        req: SampleRequest,
        choice_index: int,
        prompt_ids: list[int],
        on_token: Callable[[TokenResult], None] | None = None,
    ) -> ChoiceResult:
        """Sample choice `choice_index` of `req` from q*, calling `on_token` with each
        token as it is drawn. Cancelling the call drops the sequence."""
        ...
