"""A small byte-level BPE tokenizer, trained at start-up, for the ``*-bpe`` presets.

Real tokenizers merge bytes, and that is what the byte-level presets never show: the
ids of ``a + b`` are not the ids of ``a`` followed by those of ``b`` (merges cross the
join), a token can hold part of a multi-byte character, and distinct tokens can share
the same text (every partial character reads as ""). Ids 0–255 are bytes, 256–258 the
ChatML special tokens, then one id per merge, in the order learnt.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from functools import lru_cache

from .corpus import chat
from .tokenizer import SPECIAL_TOKENS, encode_with_specials

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
# Words with their leading space, runs of other whitespace.
_CHUNK_RE = re.compile(r" ?[^\s]+|\s+")
_ID_TO_SPECIAL = {v: k for k, v in SPECIAL_TOKENS.items()}
FIRST_MERGE = 259


def _merge(seq: tuple[int, ...], pair: tuple[int, int], new: int) -> tuple[int, ...]:
    out: list[int] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return tuple(out)


class BPETokenizer:
    """Learns `merges` merges from `texts` (special tokens are never merged)."""

    eos_token = "<|endoftext|>"
    eos_token_id = SPECIAL_TOKENS["<|endoftext|>"]

    def __init__(self, texts: list[str], merges: int = 160) -> None:
        self.special_tokens = dict(SPECIAL_TOKENS)
        words: Counter[tuple[int, ...]] = Counter()
        for text in texts:
            for part in _SPECIAL_RE.split(text):
                if part and part not in SPECIAL_TOKENS:
                    words.update(tuple(c.encode("utf-8")) for c in _CHUNK_RE.findall(part))
        self.ranks: dict[tuple[int, int], int] = {}
        self.bytes_of: list[bytes] = [bytes([b]) for b in range(256)] + [s.encode() for s in SPECIAL_TOKENS]
        for m in range(merges):
            pairs: Counter[tuple[int, int]] = Counter()
            for w, n in words.items():
                for p in itertools.pairwise(w):
                    pairs[p] += n
            if not pairs:
                break
            best = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))[0]
            new = FIRST_MERGE + m
            self.ranks[best] = new
            self.bytes_of.append(self.bytes_of[best[0]] + self.bytes_of[best[1]])
            words = Counter({_merge(w, best, new): n for w, n in words.items()})
        self.vocab_size = len(self.bytes_of)
        self._encode_chunk = lru_cache(maxsize=1 << 16)(self._encode_chunk_uncached)

    def _encode_chunk_uncached(self, chunk: str) -> tuple[int, ...]:
        seq = tuple(chunk.encode("utf-8"))
        while len(seq) > 1:
            ranked = [(self.ranks.get(p, 1 << 30), p) for p in itertools.pairwise(seq)]
            rank, pair = min(ranked)
            if rank == 1 << 30:
                break
            seq = _merge(seq, pair, rank)
        return seq

    def encode(self, text: str) -> list[int]:
        return encode_with_specials(
            text, lambda part: [t for chunk in _CHUNK_RE.findall(part) for t in self._encode_chunk(chunk)]
        )

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        data = b"".join(b"" if skip_special_tokens and i in _ID_TO_SPECIAL else self.bytes_of[i] for i in ids)
        return data.decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """One token's text, as a logprob key: a token that is not whole UTF-8 reads as ""
        (as vLLM does for byte fragments), so such keys collide."""
        try:
            return self.bytes_of[token_id].decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return chat(messages, add_generation_prompt)
