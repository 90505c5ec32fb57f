"""A sequence's context as the servers see it: token ids that grow by one a step."""

from __future__ import annotations

import json
from collections.abc import Iterable


class Context:
    """Token ids kept as the JSON text of an unclosed list (``[1,2,3``).

    Every dialect sends contexts as JSON lists of ids, so keeping the text lets a request
    body be one join of the contexts, and appending a token costs the same at any length
    (a ``bytearray`` grows in place) instead of re-encoding the whole list each step.
    """

    __slots__ = ("_len", "json")

    def __init__(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        self.json = bytearray(b"[" + ",".join(map(str, ids)).encode())
        self._len = len(ids)

    def append(self, token: int) -> None:
        self.json += b",%d" % token if self._len else b"%d" % token
        self._len += 1

    def __len__(self) -> int:
        return self._len

    def ids(self) -> list[int]:
        """The ids as a list (parses the text: for occasional use, not per step)."""
        return json.loads(self.json + b"]")

    def __repr__(self) -> str:
        return f"Context({len(self)} ids)"


def join_lists(contexts: Iterable[Context]) -> bytes:
    """``[[...],[...],...]``: the contexts as one JSON list of lists, in one copy."""
    return b"[" + b"],".join(c.json for c in contexts) + b"]]"
