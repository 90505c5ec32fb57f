"""A sequence's context as the servers see it: token ids that grow by one a step."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any


class Context:
    """Token ids kept as the JSON text of an unclosed list (``[1,2,3``).

    Every dialect sends contexts as JSON lists of ids, so keeping the text lets a request
    body be one join of the contexts, and appending a token costs the same at any length
    (a ``bytearray`` grows in place) instead of re-encoding the whole list each step.
    """

    __slots__ = ("_len", "json", "replica")

    def __init__(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self.json = bytearray(b"[" + ",".join(map(str, ids)).encode())
        self._len = len(ids)
        # Which replica of its model serves this sequence (set on first use): it stays
        # there, where the server's prefix cache holds it.
        self.replica: int | None = None

    def append(self, token: int) -> None:
        self.json += b",%d" % token if self._len else b"%d" % token
        self._len += 1

    def __len__(self) -> int:
        return self._len

    def ids(self) -> list[int]:
        """The ids as a list (parses the text: for occasional use, not per step)."""
        ids: list[int] = json.loads(self.json + b"]")
        return ids

    def __repr__(self) -> str:
        return f"Context({len(self)} ids)"


def body_with_lists(
    head: dict[str, Any], key: str, contexts: Sequence[Context], tails: Sequence[list[int]] | None = None
) -> bytes:
    """The JSON object `head` plus ``key: [[...],[...],...]`` holding the contexts (each
    followed by its ``tails`` ids, if given), built with one copy of the contexts' bytes
    (one join over all the pieces)."""
    pieces: list[bytes | bytearray] = [json.dumps(head)[:-1].encode(), b',"%s":[' % key.encode()]
    for i, c in enumerate(contexts):
        if i:
            pieces.append(b"],")
        pieces.append(c.json)
        if tails is not None and tails[i]:
            pieces.append(("," if len(c) else "").encode() + ",".join(map(str, tails[i])).encode())
    pieces.append(b"]]}")
    return b"".join(pieces)


def body_with_list(head: dict[str, Any], key: str, context: Context) -> bytes:
    """The JSON object `head` plus ``key: [...]`` holding one context, in one copy."""
    return b"".join((json.dumps(head)[:-1].encode(), b',"%s":' % key.encode(), context.json, b"]}"))
