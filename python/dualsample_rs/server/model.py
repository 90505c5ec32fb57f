"""The model interface the HTTP layer talks to, and the built-in presets.

A backend implements :class:`Model`; the server needs nothing else, so another backend
(say, a local Hugging Face model) can be added without touching the HTTP code.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .bpe import BPETokenizer
from .corpus import FACTS, WORLD_FACTS, base_documents, teacher_documents
from .math_corpus import math_documents
from .ngram import NGramLM
from .tokenizer import ByteTokenizer

PRESETS = ("base", "teacher", "teacher-math", "base-reversed", "base-bpe", "teacher-bpe")
# The BPE presets learn from text with the multi-byte facts weighted up, so that merges
# inside and across multi-byte characters are learnt too.
BPE_FACTS = FACTS + WORLD_FACTS * 4
BPE_MERGES = 300


@runtime_checkable
class Model(Protocol):
    """What the server needs from a language model."""

    name: str
    vocab_size: int
    max_model_len: int
    eos_token: str
    eos_token_id: int
    special_tokens: dict[str, int]

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str: ...

    def next_logprobs(self, contexts: list[list[int]]) -> np.ndarray:
        """Raw log-softmax over the whole vocabulary for each context: (len(contexts), vocab)."""
        ...


@lru_cache(maxsize=1)
def bpe_tokenizer() -> BPETokenizer:
    """One tokenizer for both BPE presets (trained on both texts), so they share ids."""
    return BPETokenizer(base_documents(facts=BPE_FACTS) + teacher_documents(facts=BPE_FACTS), BPE_MERGES)


class NGramModel:
    """An n-gram model trained at start-up from the package's own text, over a byte-level
    tokenizer or the given one."""

    def __init__(
        self,
        name: str,
        documents: list[str],
        order: int = 5,
        max_model_len: int = 2048,
        reversed_bytes: bool = False,
        tokenizer: Any = None,
    ) -> None:
        self.name = name
        self.tokenizer = tokenizer or ByteTokenizer(reversed_bytes)
        self.vocab_size = self.tokenizer.vocab_size
        self.eos_token = self.tokenizer.eos_token
        self.eos_token_id = self.tokenizer.eos_token_id
        self.special_tokens = dict(self.tokenizer.special_tokens)
        self.max_model_len = max_model_len
        ids = np.fromiter((t for d in documents for t in self.tokenizer.encode(d)), dtype=np.int64)
        self.lm = NGramLM(ids, self.vocab_size, order)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # No BOS: add_special_tokens changes nothing for this tokenizer.
        return self.tokenizer.encode(text)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def next_logprobs(self, contexts: list[list[int]]) -> np.ndarray:
        out = np.empty((len(contexts), self.vocab_size))
        for i, ctx in enumerate(contexts):
            out[i] = self.lm.logprobs(tuple(ctx))
        return out


def load_preset(preset: str, max_model_len: int = 2048) -> NGramModel:
    """``base`` (plain prose), ``teacher`` (ChatML question/answer text), ``teacher-math``
    (a second teacher over the same tokenizer: ChatML arithmetic word problems solved step
    by step), the BPE twins ``base-bpe`` and ``teacher-bpe`` (a learnt BPE vocabulary and
    text with multi-byte characters), or ``base-reversed`` (the base model with its byte
    ids numbered backwards: same text, different vocabulary, for testing that mismatched
    servers are refused)."""
    if preset == "base":
        return NGramModel("dualsample-base", base_documents(), max_model_len=max_model_len)
    if preset == "teacher":
        return NGramModel("dualsample-teacher", teacher_documents(), max_model_len=max_model_len)
    if preset == "teacher-math":
        return NGramModel("dualsample-teacher-math", math_documents(), max_model_len=max_model_len)
    if preset == "base-bpe":
        return NGramModel("dualsample-base-bpe", base_documents(facts=BPE_FACTS), max_model_len=max_model_len,
                          tokenizer=bpe_tokenizer())  # fmt: skip
    if preset == "teacher-bpe":
        return NGramModel("dualsample-teacher-bpe", teacher_documents(facts=BPE_FACTS), max_model_len=max_model_len,
                          tokenizer=bpe_tokenizer())  # fmt: skip
    if preset == "base-reversed":
        return NGramModel(
            "dualsample-base-reversed", base_documents(), max_model_len=max_model_len, reversed_bytes=True
        )
    raise ValueError(f"unknown model preset {preset!r}; expected one of {PRESETS}")
