"""A byte-level tokenizer with ChatML special tokens, shared by both reference models."""

from __future__ import annotations

import re
from collections.abc import Callable

from .corpus import chat

SPECIAL_TOKENS = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")
_ID_TO_SPECIAL = {v: k for k, v in SPECIAL_TOKENS.items()}


def encode_with_specials(text: str, encode_part: Callable[[str], list[int]]) -> list[int]:
    """Special-token strings become their ids; the text between them goes to `encode_part`."""
    ids: list[int] = []
    for part in _SPECIAL_RE.split(text):
        if part in SPECIAL_TOKENS:
            ids.append(SPECIAL_TOKENS[part])
        elif part:
            ids.extend(encode_part(part))
    return ids


class ByteTokenizer:
    """Ids 0–255 are bytes; 256–258 are ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``."""

    vocab_size = 259
    eos_token = "<|endoftext|>"
    eos_token_id = SPECIAL_TOKENS["<|endoftext|>"]

    def __init__(self, reversed_bytes: bool = False) -> None:
        self.special_tokens = dict(SPECIAL_TOKENS)
        # A different numbering of the same bytes (b -> 255 - b): a tokenizer that looks
        # alike but does not share ids, for testing vocabulary checks.
        self._flip = reversed_bytes

    def encode(self, text: str) -> list[int]:
        """Special-token strings in the text become their ids; everything else is UTF-8 bytes."""
        return encode_with_specials(text, lambda part: [255 - b if self._flip else b for b in part.encode("utf-8")])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        out: list[str] = []
        buf = bytearray()
        for i in ids:
            if i in _ID_TO_SPECIAL:
                out.append(buf.decode("utf-8", errors="replace"))
                buf.clear()
                if not skip_special_tokens:
                    out.append(_ID_TO_SPECIAL[i])
            else:
                buf.append(255 - i if self._flip else i)
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_text(self, token_id: int) -> str:
        """One token's text, as a logprob key: a byte that is not valid UTF-8 on its own
        becomes "" (as vLLM does for byte fragments), so such keys collide."""
        if token_id in _ID_TO_SPECIAL:
            return _ID_TO_SPECIAL[token_id]
        try:
            return bytes([255 - token_id if self._flip else token_id]).decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return chat(messages, add_generation_prompt)
