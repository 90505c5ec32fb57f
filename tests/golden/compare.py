"""Golden records compared as a user's training code reads them: every token id, text,
flag and count exactly, every float within `TOLERANCE`.

Why not byte for byte: the reference servers' log probabilities come from numpy, whose
vectorised `log`/`exp` take a different path on each CPU (AVX-512 on one machine, the C
library's scalar code on another), so the same run differs in the last bits from one
vendor to the next (measured: 1e-19 to 1e-16 on an AMD EPYC against records written on
an Intel Xeon). α is found to 1e-10 by the kernel, so a last-bit change in its input may
move it by up to that much; the tolerance leaves an order of magnitude above that.
"""

from __future__ import annotations

import json
import math
from typing import Any

# |got - want| <= TOLERANCE * max(1, |want|)
TOLERANCE = 1e-9


def differences(got: Any, want: Any, path: str = "") -> list[str]:
    """Where two decoded JSON values differ beyond the tolerance (empty when they agree)."""
    if type(got) is not type(want):
        return [f"{path}: {got!r} != {want!r}"]
    if isinstance(want, float):
        if math.isfinite(want) and math.isfinite(got):
            if abs(got - want) <= TOLERANCE * max(1.0, abs(want)):
                return []
            return [f"{path}: {got!r} != {want!r} (off by {abs(got - want):.3g})"]
        return [] if want == got or (math.isnan(want) and math.isnan(got)) else [f"{path}: {got!r} != {want!r}"]
    if isinstance(want, dict):
        if got.keys() != want.keys():
            return [f"{path}: keys {sorted(got)} != {sorted(want)}"]
        return [d for k in want for d in differences(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: length {len(got)} != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{path}[{i}]")]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]


def record_differences(got: bytes, want: bytes) -> list[str]:
    """Line by line: the records of one run against the stored ones."""
    got_lines, want_lines = got.splitlines(), want.splitlines()
    if len(got_lines) != len(want_lines):
        return [f"{len(got_lines)} records != {len(want_lines)} stored"]
    return [
        f"record {i}{d}"
        for i, (g, w) in enumerate(zip(got_lines, want_lines, strict=True))
        for d in differences(json.loads(g), json.loads(w))
    ]
