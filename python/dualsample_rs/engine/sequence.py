"""A prompt pair to generate from, and the state of its sequence while in flight."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..backends import Context
from ..io.prompts import Prompt
from ..io.record import GenerationOutput


def stable_key(value: Any) -> int:
    """A 63-bit key for a record id, the same in every run."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass(frozen=True)
class Truncation:
    """An inference engine's sampling parameters, applied to q* as vLLM applies them to
    its own distribution (min_p, then top_k, then top_p; see the kernel's ``q_top_k``):
    the token is drawn from, and its log probability reported under, the law after them.
    Neutral values (top_k 0, top_p 1, min_p 0) change nothing."""

    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    @property
    def neutral(self) -> bool:
        return self.top_k <= 0 and self.top_p >= 1.0 and self.min_p <= 0.0


@dataclass
class WorkItem:
    """One prompt pair to generate from. ``key`` keys the random draws."""

    key: int
    prompt: Prompt
    prompt_t: Prompt
    id: Any = None
    teacher_chat: bool = False
    where: str = ""  # how errors about this item name it, e.g. "line 12"
    #: the teacher it names (None: the run's default teacher)
    teacher: Any = None
    #: prompts for teachers that read their own input field, by teacher name
    teacher_prompts: dict[str, Prompt] | None = None
    #: a mixture of teachers it names, {name: weight} (None: none)
    mix: Any = None
    # Per-item settings (a served request's); None or empty: the call's.
    #: tokens to generate at most
    max_tokens: int | None = None
    #: the temperature multiplying both models' (as a call's `temperature` does)
    temperature: float | None = None
    #: ids that end this item's sequence, beside its teacher's stop ids
    stop_token_ids: tuple[int, ...] = ()
    #: only `stop_token_ids` end the sequence, not the teacher's stop ids (EOS)
    ignore_eos: bool = False
    #: called with the output after each token is appended to it
    on_token: Callable[[GenerationOutput], None] | None = None
    #: makes the finished sequence's text from its ids (None: the base's /detokenize)
    text: Callable[[list[int]], Awaitable[str]] | None = None
    #: sampling parameters applied to q* (None: none)
    truncation: Truncation | None = None
    #: how many of the most probable tokens under the law drawn from to keep per token
    alternatives: int = 0
    #: per token drawn, those tokens as (id, log probability), most probable first
    top: list[tuple[tuple[int, float], ...]] = field(default_factory=list)
    #: set to drop the item's sequence before its next round (finish reason "abort")
    cancelled: bool = False
    #: the error that failed the item, if one did
    failure: BaseException | None = None

    def teacher_prompt(self, name: str) -> Prompt:
        """The prompt teacher `name` is given."""
        if self.teacher_prompts is not None and name in self.teacher_prompts:
            return self.teacher_prompts[name]
        return self.prompt_t


@dataclass
class Sequence:
    """One sequence in flight: both contexts, the output so far, and where it came from."""

    item: WorkItem
    index: int  # position in the caller's items
    ctx_base: Context
    ctx_teacher: Context
    max_tokens: int
    out: GenerationOutput
    #: its route: the name of its teacher ("": the one unnamed teacher), or a mixture's key
    teacher: str = ""
    #: a mixture's contexts for its second teacher on (the first's is ctx_teacher)
    more_teachers: list[Context] = field(default_factory=list)
    #: the temperature multiplying both models' (the call's, or the item's own)
    temperature: float = 1.0
    diag: dict[str, list[float]] = field(default_factory=dict)
    done: bool = False
    # drafted tokens tested and accepted in speculative rounds (for speculate="auto")
    tested: int = 0
    accepted: int = 0

    @property
    def round_key(self) -> tuple[str, float]:
        """The round that advances it: its teacher's (or mixture's) at its temperature."""
        return self.teacher, self.temperature

    def fail(self, err: BaseException) -> None:
        self.out.finish_reason = "error"
        self.out.error = f"{type(err).__name__}: {err}"
        self.item.failure = err
        self.done = True

    def drop(self) -> None:
        """End it unfinished (its item was cancelled): finish reason ``"abort"``."""
        self.out.finish_reason = "abort"
        self.done = True
