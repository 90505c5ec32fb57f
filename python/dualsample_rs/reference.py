"""The sampling step in plain numpy, vectorised over rows.

This is the test oracle for the Rust kernels and the baseline the benchmarks compare
them with. It follows docs/design.md (section 2) step by step and makes the same choices as the Rust
code wherever a choice changes the result: candidates in the merge's order (the base
model's list as given, then the teacher-only tokens as given), ties in the support
constraint going to the earlier candidate, and the same counter-based uniform draw, so
the same inputs give the same tokens. α is found by its own vectorised bracketed Newton
iteration (the Rust solver takes Halley steps from a Hermite guess); the two agree
within the tolerance. It checks less of its input than the Rust functions do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._core import SamplerConfig
from .exceptions import InvalidInputError

# The kernel's defaults, read from the Rust side rather than written again here (the twin
# must take the same defaults as what it is the twin of).
DEFAULTS = SamplerConfig()

__all__ = ["ReferenceStepResult", "merge_topk", "mix", "mix_teachers", "solve_alpha", "step", "uniform"]

NEG_INF = -np.inf
F64 = NDArray[np.float64]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK64 = (1 << 64) - 1
_ACCEPT_SALT = np.uint64(0x6163636570742121)


# ---------------------------------------------------------------- small helpers
def _as_rows(x: ArrayLike, dtype: Any) -> tuple[np.ndarray, bool]:
    arr = np.asarray(x, dtype=dtype)
    return np.atleast_2d(arr), arr.ndim == 1


def _lse(x: F64) -> F64:
    """Row-wise log-sum-exp; -inf for rows that are all -inf."""
    m = x.max(axis=1)
    safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        lse: F64 = safe + np.log(np.exp(x - safe[:, None]).sum(axis=1))
    return lse


def _normalise_probs(x: F64) -> tuple[F64, F64, F64]:
    """Row-wise (log probabilities, probabilities, log normaliser), computed as the Rust
    kernel does: probabilities as exp(x − max) / Σ exp(x − max), exact at ties such as
    1/2. Rows that are all -inf stay as they are, with normaliser -inf."""
    m = x.max(axis=1, keepdims=True)
    fin = np.isfinite(m)
    e = np.exp(x - np.where(fin, m, 0.0))
    total = e.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(fin, m + np.log(total), NEG_INF)
        probs = np.where(fin, e / total, 0.0)
    return np.where(fin, x - np.where(fin, z, 0.0), x), probs, z[:, 0]


def _geometric(a: F64, b: F64, alpha: F64) -> F64:
    """log of π_θ^(1-α) π_t^α per entry, exact at α = 0 and α = 1."""
    al = alpha[:, None]
    both = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        w = np.where(both, a + al * (b - a), NEG_INF)
    return np.where(al <= 0.0, a, np.where(al >= 1.0, b, w))


def _plogp(logp: F64) -> F64:
    fin = np.isfinite(logp)
    return np.where(fin, np.exp(logp) * np.where(fin, logp, 0.0), 0.0)


def _entropy(logp: F64) -> F64:
    h: F64 = np.maximum(-_plogp(logp).sum(axis=1), 0.0)
    return h


def _kl(logp: F64, logr: F64) -> F64:
    fp = np.isfinite(logp)
    infinite = (fp & ~np.isfinite(logr)).any(axis=1)
    diff = np.where(fp & np.isfinite(logr), logp - np.where(np.isfinite(logr), logr, 0.0), 0.0)
    kl = (np.where(fp, np.exp(logp), 0.0) * diff).sum(axis=1)
    return np.where(infinite, np.inf, np.maximum(kl, 0.0))


def _js(a: F64, b: F64) -> F64:
    pa, pb = np.exp(a), np.exp(b)
    m = 0.5 * (pa + pb)
    with np.errstate(divide="ignore"):
        lm = np.log(m)
    ta = np.where(pa > 0, 0.5 * pa * (np.where(pa > 0, a, 0.0) - np.where(m > 0, lm, 0.0)), 0.0)
    tb = np.where(pb > 0, 0.5 * pb * (np.where(pb > 0, b, 0.0) - np.where(m > 0, lm, 0.0)), 0.0)
    js: F64 = np.maximum((ta + tb).sum(axis=1), 0.0)
    return js


def _ess(logpi: F64, logq: F64) -> F64:
    fp = np.isfinite(logpi)
    zero = (fp & ~np.isfinite(logq)).any(axis=1)
    both = fp & np.isfinite(logq)
    s = np.where(both, np.exp(2.0 * np.where(both, logpi, 0.0) - np.where(both, logq, 0.0)), 0.0).sum(axis=1)
    with np.errstate(divide="ignore"):
        out = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), 0.0)
    return np.where(zero, 0.0, out)


def _mix64(z: np.ndarray) -> np.ndarray:
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    mixed: np.ndarray = z ^ (z >> np.uint64(31))
    return mixed


def _key_hash(seed: int, row_keys: ArrayLike, positions: ArrayLike) -> np.ndarray:
    keys = np.atleast_1d(np.asarray(row_keys, dtype=np.int64)).view(np.uint64)
    pos = np.atleast_1d(np.asarray(positions, dtype=np.int64)).view(np.uint64)
    s = _mix64(np.full(keys.shape, np.uint64(int(seed) & _MASK64), dtype=np.uint64))
    return _mix64(_mix64(s ^ keys) ^ pos)


def _unit(h: np.ndarray) -> F64:
    u: F64 = (h >> np.uint64(11)).astype(np.float64) * (1.0 / 2.0**53)
    return u


def uniform(seed: int, row_keys: ArrayLike, positions: ArrayLike) -> F64:
    """The counter-based uniform in [0, 1) that the Rust step draws for each row."""
    return _unit(_key_hash(seed, row_keys, positions))


def accept_uniform(seed: int, row_keys: ArrayLike, positions: ArrayLike) -> F64:
    """The second, independent uniform at the same key: a drafted token's acceptance test."""
    return _unit(_mix64(_key_hash(seed, row_keys, positions) ^ _ACCEPT_SALT))


# ---------------------------------------------------------------- α
def _moments(sa: F64, sd: F64, beta: F64, shift: F64) -> tuple[F64, F64, F64]:
    """log-partition, mean and variance of d under q_β ∝ exp(a + β d) on the support."""
    x = sa + beta[:, None] * sd
    m = x.max(axis=1)
    w = np.exp(x - m[:, None])
    c = sd - shift[:, None]
    wsum = w.sum(axis=1)
    mean_c = (w * c).sum(axis=1) / wsum
    var = np.maximum((w * c * c).sum(axis=1) / wsum - mean_c * mean_c, 0.0)
    return m + np.log(wsum), shift + mean_c, var


def _newton(f: Any, f0: F64, f1: F64, tol: float, max_iter: int) -> F64:
    """The root of an increasing f with f0 < 0 < f1, by Newton steps kept inside a
    shrinking bracket (bisection where a step leaves it), all rows at once."""
    n = f0.shape[0]
    lo, hi = np.zeros(n), np.ones(n)
    x = np.clip(-f0 / (f1 - f0), 0.0, 1.0)
    result: F64 = x.copy()
    active = np.ones(n, dtype=bool)
    for _ in range(max_iter):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        xi = x[idx]
        fx, dfx = f(xi, idx)
        lo[idx] = np.where(fx < 0, xi, lo[idx])
        hi[idx] = np.where(fx > 0, xi, hi[idx])
        with np.errstate(divide="ignore", invalid="ignore"):
            newton = xi - fx / dfx
        converged = np.abs(newton - xi) <= tol
        inside = (newton > lo[idx]) & (newton < hi[idx])
        nxt = np.where(
            converged, np.clip(newton, lo[idx], hi[idx]), np.where(inside, newton, 0.5 * (lo[idx] + hi[idx]))
        )
        zero = fx == 0
        done = zero | converged | (hi[idx] - lo[idx] <= tol)
        result[idx] = np.where(zero, xi, nxt)
        x[idx] = np.where(zero, xi, nxt)
        active[idx[done]] = False
    return result


def _kl_symmetry(sa: F64, sd: F64, tol: float, max_iter: int) -> F64:
    n = sa.shape[0]
    out = np.empty(n)
    _, g0, _ = _moments(sa, sd, np.zeros(n), np.zeros(n))
    _, g1, _ = _moments(sa, sd, np.ones(n), g0)
    low, high = g0 >= 0, g1 <= 0
    out[low] = 0.0
    out[~low & high] = 1.0
    mid = np.flatnonzero(~low & ~high)
    shift = g0[mid].copy()
    sa_m, sd_m = sa[mid], sd[mid]

    def f(x: F64, idx: np.ndarray) -> tuple[F64, F64]:
        _, mean, var = _moments(sa_m[idx], sd_m[idx], x, shift[idx])
        shift[idx] = mean
        return mean, var

    out[mid] = _newton(f, g0[mid], g1[mid], tol, max_iter)
    return out


def _ess_balance(sa: F64, sd: F64, tol: float, max_iter: int) -> F64:
    def f_on(sa_: F64, sd_: F64, x: F64) -> tuple[F64, F64]:
        zero = np.zeros_like(x)
        lse_b, mean_b, _ = _moments(sa_, sd_, -x, zero)
        lse_a, mean_a, _ = _moments(sa_, sd_, 2.0 - x, zero)
        return lse_b - lse_a, mean_a - mean_b

    n = sa.shape[0]
    out = np.empty(n)
    f0, _ = f_on(sa, sd, np.zeros(n))
    f1, _ = f_on(sa, sd, np.ones(n))
    low, high = f0 >= 0, f1 <= 0
    out[low] = 0.0
    out[~low & high] = 1.0
    mid = np.flatnonzero(~low & ~high)
    sa_m, sd_m = sa[mid], sd[mid]
    out[mid] = _newton(lambda x, idx: f_on(sa_m[idx], sd_m[idx], x), f0[mid], f1[mid], tol, max_iter)
    return out


def _solve_normalised(a: F64, b: F64, p: dict[str, Any]) -> F64:
    """α per row for log probabilities already normalised over each row's candidates."""
    n = a.shape[0]
    method = p["method"]
    if method == "fixed":
        raw = np.full(n, float(p["alpha"]))
    elif method == "entropy":
        ha, hb = _entropy(a), _entropy(b)
        tot = ha + hb
        raw = np.where(tot > 0, ha / np.where(tot > 0, tot, 1.0), 0.5)
    elif method in ("kl_symmetry", "ess_balance"):
        both = np.isfinite(a) & np.isfinite(b)
        sa = np.where(both, a, NEG_INF)
        sd = np.where(both, b - np.where(both, a, 0.0), 0.0)
        raw = np.full(n, 0.5)
        dmin = np.where(both, sd, np.inf).min(axis=1)
        dmax = np.where(both, sd, -np.inf).max(axis=1)
        scale = 1.0 + np.where(both, np.abs(np.where(both, a, 0.0)), 0.0).max(axis=1)
        nonempty = both.any(axis=1)
        with np.errstate(invalid="ignore"):
            const = nonempty & (dmax - dmin <= 1e-12 * scale)
            c = 0.5 * (dmin + dmax)
        raw[const] = np.where(np.abs(c) <= 1e-12, 0.5, np.where(c > 0, 0.0, 1.0))[const]
        todo = np.flatnonzero(nonempty & ~const)
        solver = _kl_symmetry if method == "kl_symmetry" else _ess_balance
        if todo.size:
            raw[todo] = solver(sa[todo], sd[todo], float(p["tol"]), int(p["max_iter"]))
    else:
        raise InvalidInputError(f"method: unknown method {method!r}")
    alpha: F64 = np.clip(raw, p["alpha_min"], p["alpha_max"])
    return alpha


def _params(config: Any = None, **overrides: Any) -> dict[str, Any]:
    keys = ("method", "alpha", "alpha_min", "alpha_max", "tol", "max_iter")
    p = {k: getattr(config if config is not None else DEFAULTS, k) for k in keys}
    p.update(overrides)
    return p


def solve_alpha(
    logp_theta: ArrayLike,
    logp_t: ArrayLike,
    *,
    method: str = DEFAULTS.method,
    alpha: float = DEFAULTS.alpha,
    alpha_min: float = DEFAULTS.alpha_min,
    alpha_max: float = DEFAULTS.alpha_max,
    tol: float = DEFAULTS.tol,
    max_iter: int = DEFAULTS.max_iter,
) -> float | F64:
    """numpy twin of :func:`dualsample_rs.solve_alpha`."""
    a, one = _as_rows(logp_theta, np.float64)
    b, _ = _as_rows(logp_t, np.float64)
    a = _normalise_probs(a)[0]
    b = _normalise_probs(b)[0]
    p = _params(method=method, alpha=alpha, alpha_min=alpha_min, alpha_max=alpha_max, tol=tol, max_iter=max_iter)
    out = _solve_normalised(a, b, p)
    return float(out[0]) if one else out


def mix(logp_theta: ArrayLike, logp_t: ArrayLike, alpha: ArrayLike) -> F64:
    """numpy twin of :func:`dualsample_rs.mix`."""
    a, one = _as_rows(logp_theta, np.float64)
    b, _ = _as_rows(logp_t, np.float64)
    al = np.broadcast_to(np.asarray(alpha, dtype=np.float64), (a.shape[0],))
    q = _normalise_probs(_geometric(_normalise_probs(a)[0], _normalise_probs(b)[0], al))[0]
    return q[0] if one else q


# ---------------------------------------------------------------- merge
def _compact(keep: np.ndarray, *arrays: np.ndarray, fills: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    """Left-pack the kept entries of each row, preserving order; pad with `fills`."""
    order = np.argsort(~keep, axis=1, kind="stable")
    width = int(keep.sum(axis=1).max()) if keep.size else 0
    kept = np.take_along_axis(keep, order, axis=1)[:, :width]
    out = []
    for arr, fill in zip(arrays, fills, strict=True):
        packed = np.take_along_axis(arr, order, axis=1)[:, :width]
        out.append(np.where(kept, packed, fill))
    return tuple(out)


def unlisted_bound(ids: np.ndarray, lp: F64) -> F64:
    """Per row, the `bound` rule's value for an id the list lacks (as the Rust merge)."""
    valid = ids >= 0
    smallest = np.where(valid, lp, np.inf).min(axis=1)
    total = _lse(np.where(valid, lp, NEG_INF))
    with np.errstate(divide="ignore"):
        # Unlisted mass under 1e-12 is rounding (as in the Rust merge): the bound then
        # uses 1e-12, never -inf (a model with finite logits gives every token some mass).
        unlisted = np.log(np.maximum(-np.expm1(np.minimum(total, 0.0)), 1e-12))
    bound: F64 = np.minimum(smallest, unlisted)
    return bound


def _lookup(query: np.ndarray, ids: np.ndarray, lp: F64, stride: int) -> tuple[F64, np.ndarray]:
    """Each query id's log probability in the same row of `ids`, and whether it is there."""
    rows = np.arange(ids.shape[0], dtype=np.int64)[:, None]
    keys = np.where(ids >= 0, rows * stride + ids, -1).ravel()
    if keys.size == 0:
        return np.full(query.shape, NEG_INF), np.zeros(query.shape, dtype=bool)
    order = np.argsort(keys, kind="stable")
    skeys, svals = keys[order], lp.ravel()[order]
    want = (rows * stride + query).ravel()
    pos = np.minimum(np.searchsorted(skeys, want), skeys.size - 1)
    found = (skeys[pos] == want) & (query.ravel() >= 0)
    return np.where(found, svals[pos], NEG_INF).reshape(query.shape), found.reshape(query.shape)


def _merge(ids_a: np.ndarray, lp_a: F64, ids_b: np.ndarray, lp_b: F64, missing: Any) -> dict[str, np.ndarray]:
    """Candidates in the order the Rust merge produces: the base list as given, then the
    teacher-only tokens as given."""
    n = ids_a.shape[0]
    stride = int(max(ids_a.max(initial=0), ids_b.max(initial=0))) + 2
    valid_a, valid_b = ids_a >= 0, ids_b >= 0
    b_of_a, a_in_b = _lookup(ids_a, ids_b, lp_b, stride)
    _, b_in_a = _lookup(ids_b, ids_a, lp_a, stride)
    if isinstance(missing, str):
        fill_a, fill_b = unlisted_bound(ids_a, lp_a), unlisted_bound(ids_b, lp_b)
    else:
        fill_a = fill_b = np.full(n, float(missing))
    ids = np.concatenate([ids_a, ids_b], axis=1)
    a = np.concatenate([lp_a, np.broadcast_to(fill_a[:, None], ids_b.shape)], axis=1)
    b = np.concatenate([np.where(a_in_b, b_of_a, fill_b[:, None]), lp_b], axis=1)
    obs_a = np.concatenate([valid_a, np.zeros(ids_b.shape, dtype=bool)], axis=1)
    obs_b = np.concatenate([a_in_b & valid_a, valid_b], axis=1)
    keep = np.concatenate([valid_a, valid_b & ~b_in_a], axis=1)
    no_overlap = np.zeros(n, dtype=bool)
    if missing == "drop":
        common = keep & obs_a & obs_b
        no_overlap = ~common.any(axis=1) & valid_b.any(axis=1)
        keep = np.where(no_overlap[:, None], keep & obs_b, common)
    ids, a, b, obs_a, obs_b = _compact(keep, ids, a, b, obs_a, obs_b, fills=(-1, NEG_INF, NEG_INF, False, False))
    return {"ids": ids, "a": a, "b": b, "obs_a": obs_a, "obs_b": obs_b, "no_overlap": no_overlap}


def merge_topk(
    ids_theta: ArrayLike,
    logp_theta: ArrayLike,
    ids_t: ArrayLike,
    logp_t: ArrayLike,
    *,
    missing: str | float = DEFAULTS.missing,
) -> tuple[np.ndarray, F64, F64]:
    """numpy twin of :func:`dualsample_rs.merge_topk`."""
    ia, one = _as_rows(ids_theta, np.int64)
    la, _ = _as_rows(logp_theta, np.float64)
    ib, _ = _as_rows(ids_t, np.int64)
    lb, _ = _as_rows(logp_t, np.float64)
    m = _merge(ia, la, ib, lb, missing)
    if one:
        return m["ids"][0], m["a"][0], m["b"][0]
    return m["ids"], m["a"], m["b"]


# ---------------------------------------------------------------- several teachers
_WEIGHT_SUM_TOL = 1e-9
_MAX_LOGP = 1e-4


def _mix_weights(weights: ArrayLike, teachers: int) -> F64:
    """The weights among the teachers, checked as the Rust kernel checks them."""
    if teachers == 0:
        raise InvalidInputError("ids_list: at least one teacher is needed")
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size != teachers:
        raise InvalidInputError(f"weights: expected one weight per teacher ({teachers}), got {w.size}")
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():
        i = int(np.argmax(bad))
        raise InvalidInputError(f"weights: weight {i} is {w[i]}; weights must be finite and >= 0")
    if abs(float(w.sum()) - 1.0) > _WEIGHT_SUM_TOL:
        raise InvalidInputError(f"weights: must sum to 1, got {float(w.sum())}")
    return w


def mix_teachers(
    ids_list: list[ArrayLike],
    logp_list: list[ArrayLike],
    weights: ArrayLike,
    *,
    missing: str | float = DEFAULTS.missing,
) -> tuple[np.ndarray, F64]:
    """numpy twin of :func:`dualsample_rs._core.mix_teachers`: the same column blocks and
    the same Σ w_i log π_i, summed in teacher order from −0.0 (so one teacher at weight 1
    comes back bit for bit)."""
    w = _mix_weights(weights, len(ids_list))
    pairs = [(_as_rows(i, np.int64), _as_rows(lp, np.float64)[0]) for i, lp in zip(ids_list, logp_list, strict=True)]
    one = pairs[0][0][1]
    ids_all = [ids for (ids, _), _ in pairs]
    lps = [lp for _, lp in pairs]
    n = ids_all[0].shape[0]
    offsets = np.concatenate([[0], np.cumsum([ids.shape[1] for ids in ids_all])])
    out_ids = np.full((n, int(offsets[-1])), -1, dtype=np.int64)
    out_lp = np.full((n, int(offsets[-1])), NEG_INF)
    active = [i for i in range(len(ids_all)) if w[i] > 0]
    stride = int(max(ids.max(initial=0) for ids in ids_all)) + 2
    fills = {
        i: unlisted_bound(ids_all[i], lps[i]) if isinstance(missing, str) else np.full(n, float(missing))
        for i in active
    }
    # Every active teacher's columns, each valued by every active teacher.
    blocks = []
    for pos, i in enumerate(active):
        cand = ids_all[i]
        earlier = np.zeros(cand.shape, dtype=bool)
        for j in active[:pos]:
            earlier |= _lookup(cand, ids_all[j], lps[j], stride)[1]
        acc = np.full(cand.shape, -0.0)
        listed = np.zeros(cand.shape, dtype=np.int64)
        for j in active:
            val, found = _lookup(cand, ids_all[j], lps[j], stride)
            acc = acc + w[j] * np.where(found, val, fills[j][:, None])
            listed += found
        blocks.append((i, (cand >= 0) & ~earlier, listed == len(active), acc))
    if missing == "drop":
        # The tokens every active teacher listed; with none in a row, the union.
        any_common = np.zeros(n, dtype=bool)
        for _, first, common, _ in blocks:
            any_common |= (first & common).any(axis=1)
        blocks = [(i, first & (common | ~any_common[:, None]), common, acc) for i, first, common, acc in blocks]
    for i, keep, _, acc in blocks:
        cols = slice(int(offsets[i]), int(offsets[i + 1]))
        out_ids[:, cols] = np.where(keep, ids_all[i], -1)
        out_lp[:, cols] = np.where(keep, np.minimum(acc, _MAX_LOGP), NEG_INF)
    if one:
        return out_ids[0], out_lp[0]
    return out_ids, out_lp


# ---------------------------------------------------------------- step
@dataclass(frozen=True)
class ReferenceStepResult:
    """The same fields as :class:`dualsample_rs.StepResult`."""

    token_id: np.ndarray
    alpha: F64
    logq: F64
    logp_theta: F64
    logp_t: F64
    observed_theta: np.ndarray
    observed_t: np.ndarray
    fallback: np.ndarray
    accepted: np.ndarray
    no_overlap: np.ndarray
    n_candidates: np.ndarray
    n_merged: np.ndarray
    kl_theta: F64 | None = None
    kl_t: F64 | None = None
    ess_theta: F64 | None = None
    ess_t: F64 | None = None
    entropy: F64 | None = None
    js: F64 | None = None
    top_ids: np.ndarray | None = None
    top_logq: F64 | None = None


def _top_p_keep(b: F64, pb: F64, top_p: float) -> np.ndarray:
    """The teacher's most probable candidates until their mass reaches top_p (the one
    crossing it included), ties to the earlier candidate."""
    order = np.argsort(-b, axis=1, kind="stable")
    sb = np.take_along_axis(b, order, axis=1)
    p = np.take_along_axis(pb, order, axis=1)
    before = np.concatenate([np.zeros((p.shape[0], 1)), np.cumsum(p, axis=1)[:, :-1]], axis=1)
    keep_sorted = (before < top_p) & np.isfinite(sb)
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep


def _per_row(values: ArrayLike | None, name: str, n: int, dtype: Any, neutral: float) -> np.ndarray:
    """One value per row of an optional argument, `neutral` on every row when not given."""
    if values is None:
        return np.full(n, neutral, dtype=dtype)
    arr = np.asarray(values, dtype=dtype)
    if arr.shape != (n,) and not (arr.ndim == 0 and n == 1):
        raise InvalidInputError(f"{name}: expected one entry per row ({n}), got shape {arr.shape}")
    return arr.reshape(n)


def _truncation_args(
    n: int, top_k: ArrayLike | None, top_p: ArrayLike | None, min_p: ArrayLike | None
) -> tuple[np.ndarray, F64, F64] | None:
    """The per-row (top_k, top_p, min_p), checked as the Rust step checks them; None when
    none was given (then q* is not touched at all)."""
    if top_k is None and top_p is None and min_p is None:
        return None
    k = _per_row(top_k, "q_top_k", n, np.int64, 0)
    p = _per_row(top_p, "q_top_p", n, np.float64, 1.0)
    mp = _per_row(min_p, "q_min_p", n, np.float64, 0.0)
    for name, values, bad, span in (
        ("q_top_p", p, ~((p > 0) & (p <= 1)), "(0, 1]"),
        ("q_min_p", mp, ~((mp >= 0) & (mp <= 1)), "[0, 1]"),
    ):
        if bad.any():
            r = int(np.argmax(bad))
            raise InvalidInputError(f"{name}, row {r}: must lie in {span}, got {values[r]}")
    return k, p, mp


def _rank(ids: np.ndarray, logq: F64) -> np.ndarray:
    """Per row, the candidates by descending probability, ties to the lower token id
    (padding, at -inf, after every real candidate with positive probability)."""
    order: np.ndarray = np.lexsort((ids, -logq), axis=-1)
    return order


def _truncation_keep(ids: np.ndarray, logq: F64, q: F64, top_k: np.ndarray, top_p: F64, min_p: F64) -> np.ndarray:
    """The candidates vLLM's sampler would keep: min_p against the most probable, then
    top_k (ties at the k-th value all kept), then top_p on what is left, renormalised
    (the least probable dropped while the mass up to them stays within 1 − top_p; the
    most probable always kept; at equal probability the higher id goes first)."""
    n = ids.shape[0]
    r = np.arange(n)[:, None]
    keep = ids >= 0
    floor = min_p * q.max(axis=1)
    keep &= ~((min_p > 0)[:, None] & (q < floor[:, None]))
    order = _rank(ids, logq)
    kept_sorted = keep[r, order]
    count = np.cumsum(kept_sorted, axis=1)
    has_k = (top_k > 0) & (count[:, -1] >= top_k)
    kth = logq[r[:, 0], order[r[:, 0], np.argmax(count >= np.maximum(top_k, 1)[:, None], axis=1)]]
    keep &= ~(has_k[:, None] & (logq < kth[:, None]))
    kept_sorted = keep[r, order]
    ascending = np.where(kept_sorted, q[r, order], 0.0)[:, ::-1]
    cum = np.cumsum(ascending, axis=1)
    threshold = (1.0 - top_p) * cum[:, -1]
    drop_sorted = (cum <= threshold[:, None])[:, ::-1]
    drop_sorted[r[:, 0], np.argmax(kept_sorted, axis=1)] = False
    drop_sorted &= (top_p < 1.0)[:, None] & kept_sorted
    drop = np.zeros_like(keep)
    np.put_along_axis(drop, order, drop_sorted, axis=1)
    kept: np.ndarray = keep & ~drop
    return kept


def _truncate(ids: np.ndarray, logq: F64, q: F64, top_k: np.ndarray, top_p: F64, min_p: F64) -> tuple[F64, F64]:
    """q* truncated per row and renormalised over what is kept; rows that lose no
    candidate come back as they are."""
    keep = _truncation_keep(ids, logq, q, top_k, top_p, min_p)
    changed = ((ids >= 0) & ~keep).any(axis=1)[:, None]
    new_logq, new_q, _ = _normalise_probs(np.where(keep, logq, NEG_INF))
    return np.where(changed, new_logq, logq), np.where(changed, new_q, q)


def _alternatives(ids: np.ndarray, logq: F64, n: int) -> tuple[np.ndarray, F64]:
    """The `n` most probable candidates of each row (ties to the lower id) and their log
    probabilities, padded with -1 / -inf; candidates of probability zero left out."""
    r = np.arange(ids.shape[0])[:, None]
    order = _rank(ids, logq)[:, :n]
    top_ids, top_logq = ids[r, order], logq[r, order]
    listed = (top_ids >= 0) & (top_logq > NEG_INF)
    pad = ((0, 0), (0, n - order.shape[1]))
    out_ids = np.pad(np.where(listed, top_ids, -1).astype(np.int64), pad, constant_values=-1)
    out_logq = np.pad(np.where(listed, top_logq, NEG_INF), pad, constant_values=NEG_INF)
    return out_ids, out_logq


def step(
    ids_theta: ArrayLike,
    logp_theta: ArrayLike,
    ids_t: ArrayLike,
    logp_t: ArrayLike,
    *,
    config: Any = None,
    seed: int = 0,
    positions: ArrayLike | None = None,
    row_keys: ArrayLike | None = None,
    force_teacher: ArrayLike | None = None,
    drafts: ArrayLike | None = None,
    q_top_k: ArrayLike | None = None,
    q_top_p: ArrayLike | None = None,
    q_min_p: ArrayLike | None = None,
    alternatives: int = 0,
) -> ReferenceStepResult:
    """numpy twin of :func:`dualsample_rs.step`; `config` is a :class:`SamplerConfig`."""
    if config is None:
        config = DEFAULTS
    ia, _ = _as_rows(ids_theta, np.int64)
    la, _ = _as_rows(logp_theta, np.float64)
    ib, _ = _as_rows(ids_t, np.int64)
    lb, _ = _as_rows(logp_t, np.float64)
    n = ia.shape[0]
    keys = np.arange(n, dtype=np.int64) if row_keys is None else np.asarray(row_keys, dtype=np.int64).reshape(n)
    pos = np.zeros(n, dtype=np.int64) if positions is None else np.asarray(positions, dtype=np.int64).reshape(n)
    force = np.zeros(n, dtype=bool) if force_teacher is None else np.asarray(force_teacher, dtype=bool).reshape(n)
    truncation = _truncation_args(n, q_top_k, q_top_p, q_min_p)
    if alternatives < 0:
        raise InvalidInputError(f"alternatives: must be >= 0, got {alternatives}")

    m = _merge(ia, la, ib, lb, config.missing)
    ids, a, b, obs_a, obs_b = m["ids"], m["a"], m["b"], m["obs_a"], m["obs_b"]
    if config.exclude_ids:
        keep = (ids >= 0) & ~np.isin(ids, np.asarray(config.exclude_ids, dtype=np.int64))
        ids, a, b, obs_a, obs_b = _compact(keep, ids, a, b, obs_a, obs_b, fills=(-1, NEG_INF, NEG_INF, False, False))
    if ids.shape[1] == 0 or not (ids >= 0).any(axis=1).all():
        raise InvalidInputError("a row has no candidates left")
    tau_t = config.temperature if config.temperature_t is None else config.temperature_t
    a = a / config.temperature
    b = b / tau_t
    a, pa, za = _normalise_probs(a)
    b, pb, zb = _normalise_probs(b)
    fa, fb = np.isfinite(za), np.isfinite(zb)
    if not (fa | fb).all():
        raise InvalidInputError("a row has no candidate with positive probability under either model")
    forced = np.where(~fa, 1.0, np.where(~fb, 0.0, np.nan))
    usable = fa & fb
    if config.stability_js_max is not None:
        forced = np.where(usable & (_js(a, b) > config.stability_js_max), 1.0, forced)
    if config.stability_overlap_min is not None:
        common = obs_a & obs_b
        mass = np.minimum(np.where(common, pa, 0.0).sum(1), np.where(common, pb, 0.0).sum(1))
        forced = np.where(usable & np.isnan(forced) & (mass < config.stability_overlap_min), 1.0, forced)
    n_merged = (ids >= 0).sum(axis=1).astype(np.int32)
    if config.top_p is not None:
        # Rows whose teacher has no mass keep every candidate, as in the Rust step.
        keep = np.where(fb[:, None], _top_p_keep(b, pb, config.top_p), ids >= 0)
        fills = (-1, NEG_INF, NEG_INF, False, False)
        ids, a, b, obs_a, obs_b = _compact(keep & (ids >= 0), ids, a, b, obs_a, obs_b, fills=fills)
        b, pb, _ = _normalise_probs(b)
        a, pa, za2 = _normalise_probs(a)
        forced = np.where(fb & ~np.isfinite(za2) & np.isnan(forced), 1.0, forced)
    fallback = ~np.isnan(forced)
    alpha = np.where(fallback, forced, np.where(force, 1.0, np.nan))
    todo = np.flatnonzero(np.isnan(alpha))
    if todo.size:
        alpha[todo] = _solve_normalised(a[todo], b[todo], _params(config))
    # At α = 0 or 1, q* is one of the (already normalised) models, exactly.
    interior = (alpha > 0) & (alpha < 1)
    logq, q, zq = _normalise_probs(_geometric(a, b, alpha))
    empty = interior & ~np.isfinite(zq)
    fallback = fallback | empty
    alpha = np.where(empty, 1.0, alpha)
    to_a, to_b = (alpha <= 0)[:, None], (alpha >= 1)[:, None]
    logq = np.where(to_a, a, np.where(to_b, b, logq))
    q = np.where(to_a, pa, np.where(to_b, pb, q))
    # The diagnostics describe q* itself, before the engine's truncation and the draw.
    diag: dict[str, Any] = {}
    if config.diagnostics:
        diag = {
            "kl_theta": _kl(logq, a),
            "kl_t": _kl(logq, b),
            "ess_theta": _ess(a, logq),
            "ess_t": _ess(b, logq),
            "entropy": _entropy(logq),
            "js": _js(a, b),
        }
    if truncation is not None:
        logq, q = _truncate(ids, logq, q, *truncation)
    if alternatives > 0:
        diag["top_ids"], diag["top_logq"] = _alternatives(ids, logq, alternatives)

    u = uniform(seed, keys, pos)
    r = np.arange(n)
    # A drafted token (point mass) is accepted with probability q*(d); on rejection the
    # draw is from the residual, q* without d.
    d = np.full(n, -1, dtype=np.int64) if drafts is None else np.asarray(drafts, dtype=np.int64).reshape(n)
    at = (ids == d[:, None]) & (d[:, None] >= 0)
    q_d = np.where(at, q, 0.0).sum(axis=1)
    accepted = at.any(axis=1) & (accept_uniform(seed, keys, pos) * q.sum(axis=1) < q_d)
    q = np.where(at, 0.0, q)
    cum = np.cumsum(q, axis=1)
    target = u * cum[:, -1]
    hit = cum > target[:, None]
    last_pos = q.shape[1] - 1 - np.argmax((q > 0)[:, ::-1], axis=1)
    k = np.where(hit.any(axis=1), np.argmax(hit, axis=1), last_pos)
    k = np.where(accepted, np.argmax(at, axis=1), k)
    return ReferenceStepResult(
        token_id=ids[r, k].astype(np.int64),
        alpha=alpha,
        logq=logq[r, k],
        logp_theta=a[r, k],
        logp_t=b[r, k],
        observed_theta=obs_a[r, k],
        observed_t=obs_b[r, k],
        fallback=fallback,
        accepted=accepted,
        no_overlap=m["no_overlap"],
        n_candidates=(ids >= 0).sum(axis=1).astype(np.int32),
        n_merged=n_merged,
        **diag,
    )
