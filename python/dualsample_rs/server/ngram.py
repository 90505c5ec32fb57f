"""An interpolated (Witten–Bell) n-gram language model over token ids, in numpy.

Design notes. n-grams are packed into int64 keys in base V (V = vocabulary size), so
counting is one ``np.unique`` per order and a lookup is one ``searchsorted``; with
V = 259 and order 5 the keys stay below 2^41. Witten–Bell interpolation mixes each
order with the next lower one, down to the uniform distribution, so every token keeps
a positive probability.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np


class NGramLM:
    def __init__(self, ids: np.ndarray, vocab_size: int, order: int = 5) -> None:
        self.vocab_size = vocab_size
        self.order = order
        ids = np.asarray(ids, dtype=np.int64)
        v = vocab_size
        self._tables = []
        for h in range(order):
            n = ids.size - h
            ctx = np.zeros(n, dtype=np.int64)
            for j in range(h):
                ctx = ctx * v + ids[j : j + n]
            keys, counts = np.unique(ctx * v + ids[h:], return_counts=True)
            contexts, starts = np.unique(keys // v, return_index=True)
            totals = np.add.reduceat(counts, starts)
            ends = np.append(starts[1:], keys.size)
            lam = totals / (totals + (ends - starts))
            self._tables.append((contexts, starts, ends, keys % v, counts / np.repeat(totals, ends - starts), lam))
        self._cached = lru_cache(maxsize=200_000)(self._logprobs)

    def logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        """log P(next token | context) over the whole vocabulary (a fresh float64 array)."""
        lp: np.ndarray = self._cached(tuple(context[-(self.order - 1) :]) if self.order > 1 else ()).copy()
        return lp

    def _logprobs(self, context: tuple[int, ...]) -> np.ndarray:
        v = self.vocab_size
        p = np.full(v, 1.0 / v)
        for h, (contexts, starts, ends, succ, ml, lam) in enumerate(self._tables):
            if h > len(context):
                break
            key = 0
            for t in context[len(context) - h :]:
                key = key * v + t
            i = int(np.searchsorted(contexts, key))
            if i >= contexts.size or contexts[i] != key:
                break
            s, e = starts[i], ends[i]
            p *= 1.0 - lam[i]
            p[succ[s:e]] += lam[i] * ml[s:e]
        lp: np.ndarray = np.log(p)
        return lp
