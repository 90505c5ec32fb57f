"""Synthetic top-k lists shaped like real ones, for tests, benchmarks and examples.

Two related models over a vocabulary: the base has Zipf-shaped probabilities over a
random ranking of the vocabulary, the teacher re-ranks part of it, so the two top-k
lists overlap partly, as a base and an instruct model's do. Each list holds raw
log-softmax values over the whole vocabulary, as vLLM returns them.
"""

from __future__ import annotations

import numpy as np

__all__ = ["topk_pair"]


def _zipf_logits(rng: np.random.Generator, rows: int, vocab: int, exponent: float) -> np.ndarray:
    ranks = np.argsort(rng.random((rows, vocab)), axis=1) + 1
    return -exponent * np.log(ranks.astype(np.float64)) + 0.3 * rng.standard_normal((rows, vocab))


def _topk(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    m = logits.max(axis=1, keepdims=True)
    logp = logits - (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))
    ids = np.argpartition(-logp, k - 1, axis=1)[:, :k]
    lp = np.take_along_axis(logp, ids, axis=1)
    order = np.argsort(-lp, axis=1)
    return np.take_along_axis(ids, order, axis=1).astype(np.int64), np.take_along_axis(lp, order, axis=1)


def topk_pair(
    rows: int, k: int, *, vocab: int = 4096, overlap: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`(ids_theta, logp_theta, ids_t, logp_t)`, each of shape (rows, k).

    Args:
        rows: number of rows (sequences).
        k: entries per list.
        vocab: vocabulary size.
        overlap: how strongly the teacher's logits follow the base's (0 = unrelated).
        seed: numpy seed.

    Example:
        >>> ids_a, lp_a, ids_b, lp_b = topk_pair(2, 5)
        >>> ids_a.shape
        (2, 5)
    """
    rng = np.random.default_rng(seed)
    base = _zipf_logits(rng, rows, vocab, 1.1)
    other = _zipf_logits(rng, rows, vocab, 1.3)
    teacher = overlap * base + (1.0 - overlap) * other
    return (*_topk(base, k), *_topk(teacher, k))
