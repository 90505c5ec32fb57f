"""What a prompt may be, checked once before any request is made for it."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..exceptions import InvalidInputError

Prompt = str | list[int]


def check_prompt(value: Any, name: str) -> Prompt:
    """`value` if it is a prompt: a non-empty string that can be sent as UTF-8 (no lone
    surrogates), or a non-empty list of non-negative integer token ids. Anything else
    raises `InvalidInputError` naming `name` (e.g. ``"line 12, teacher_prompt"``);
    floats are refused rather than truncated, booleans are not ids."""
    if isinstance(value, str):
        if not value:
            raise InvalidInputError(f"{name}: empty string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidInputError(
                f"{name}: not valid Unicode ({err.reason} at character {err.start}: {value[err.start]!r})"
            ) from None
        return value
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidInputError(f"{name}: empty list of token ids")
        if set(map(type, value)) == {int} and min(value) >= 0:  # the common case, at C speed
            return list(value)
        for i, t in enumerate(value):
            if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 0:
                raise InvalidInputError(
                    f"{name}: element {i} is {t!r}; token-id prompts are lists of non-negative integers"
                )
        return [int(t) for t in value]
    raise InvalidInputError(
        f"{name}: expected a string or a list of non-negative token ids, got {type(value).__name__} {value!r:.60}"
    )
