"""Type stubs and documentation for the compiled module `dualsample_rs._core`."""

from collections.abc import Sequence
from typing import Literal, final

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "SamplerConfig",
    "StepResult",
    "__version__",
    "_solve_alpha_sweeps",
    "_with_alpha_solver",
    "build_profile",
    "merge_topk",
    "mix",
    "mix_teachers",
    "parse_completions_topk",
    "parse_generate_positions",
    "parse_generate_topk",
    "parse_sglang_positions",
    "parse_sglang_topk",
    "solve_alpha",
    "step",
    "unlisted_bound",
]

__version__: str
build_profile: Literal["debug", "release"]

_Method = Literal["kl_symmetry", "fixed", "entropy", "ess_balance"]

@final
class SamplerConfig:
    """Settings of one sampling step, validated when built.

    Args:
        method: how α (the weight on the teacher) is chosen at each position:
            ``"kl_symmetry"`` (KL(q‖π_θ) = KL(q‖π_t), the Chernoff point), ``"fixed"``
            (``alpha``), ``"entropy"`` (H(π_θ) / (H(π_θ) + H(π_t))) or ``"ess_balance"``
            (equal effective sample sizes for both models).
        alpha: α for ``method="fixed"``.
        alpha_min, alpha_max: every rule's α is clamped to this range.
        tol: tolerance on α for the iterative rules (> 0).
        max_iter: iteration cap for the iterative rules (>= 1).
        missing: log probability given to a token that one model did not list:
            ``"bound"`` (log min(smallest listed probability, unlisted mass); an
            unlisted mass under 1e-12 is rounding and counts as none, giving -inf),
            ``"drop"`` (keep only tokens both listed) or a float constant.
        temperature: divides the base model's log probabilities (> 0).
        temperature_t: the teacher's temperature; None means ``temperature``.
        top_p: keep the teacher's most probable candidates until their mass reaches
            ``top_p`` (the one crossing it included), in (0, 1]; None keeps all.
        exclude_ids: token ids never sampled (e.g. special tokens).
        stability_js_max: fall back to the teacher (α = 1, ``fallback`` set) where the
            Jensen–Shannon divergence of the two models exceeds this.
        stability_overlap_min: fall back where either model puts less than this mass
            on the tokens both listed.
        diagnostics: also report KL(q‖π_θ), KL(q‖π_t), ESS_θ, ESS_t, H(q) and JS.

    Raises:
        InvalidInputError: a value is out of range; the message names the argument.

    Example:
        >>> SamplerConfig(top_p=0.95, exclude_ids=(0, 1)).top_p
        0.95
    """

    def __new__(
        cls,
        method: _Method = "kl_symmetry",
        alpha: float = 0.5,
        alpha_min: float = 0.0,
        alpha_max: float = 1.0,
        tol: float = 1e-10,
        max_iter: int = 100,
        missing: Literal["bound", "drop"] | float = "bound",
        temperature: float = 1.0,
        temperature_t: float | None = None,
        top_p: float | None = None,
        exclude_ids: tuple[int, ...] | list[int] = (),
        stability_js_max: float | None = None,
        stability_overlap_min: float | None = None,
        diagnostics: bool = False,
    ) -> SamplerConfig: ...
    @property
    def method(self) -> _Method: ...
    @property
    def alpha(self) -> float: ...
    @property
    def alpha_min(self) -> float: ...
    @property
    def alpha_max(self) -> float: ...
    @property
    def tol(self) -> float: ...
    @property
    def max_iter(self) -> int: ...
    @property
    def missing(self) -> Literal["bound", "drop"] | float: ...
    @property
    def temperature(self) -> float: ...
    @property
    def temperature_t(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def exclude_ids(self) -> tuple[int, ...]: ...
    @property
    def stability_js_max(self) -> float | None: ...
    @property
    def stability_overlap_min(self) -> float | None: ...
    @property
    def diagnostics(self) -> bool: ...

@final
class StepResult:
    """What :func:`step` reports, one entry per row.

    ``logp_theta``, ``logp_t`` and ``logq`` are the sampled token's log probability
    under the distributions actually used: after exclusion, temperature, the support
    constraint and renormalisation; ``logq`` after the caller's truncation of q*
    (``q_top_k``, ``q_top_p``, ``q_min_p``), the law the token was drawn from.
    ``n_candidates`` is the number of candidates q* was formed over (before that
    truncation), ``n_merged`` the number of candidates before the support constraint
    (so the constraint removed some where it is larger). ``no_overlap`` marks rows
    where ``missing="drop"`` found no common token and kept the teacher's list;
    ``accepted`` rows whose drafted token was accepted. The diagnostics are None unless
    the config asked for them; they describe q* before the caller's truncation.

    ``top_ids`` and ``top_logq`` (shape (rows, alternatives)) are None unless
    :func:`step` was asked for alternatives: per row, the most probable candidates
    under the final (truncated) law, most probable first, ties to the lower token id,
    with their log probabilities; candidates of probability zero are not listed, and a
    row with fewer is padded with -1 and -inf.
    """

    token_id: NDArray[np.int64]
    alpha: NDArray[np.float64]
    logq: NDArray[np.float64]
    logp_theta: NDArray[np.float64]
    logp_t: NDArray[np.float64]
    observed_theta: NDArray[np.bool_]
    observed_t: NDArray[np.bool_]
    fallback: NDArray[np.bool_]
    accepted: NDArray[np.bool_]
    no_overlap: NDArray[np.bool_]
    n_candidates: NDArray[np.int32]
    n_merged: NDArray[np.int32]
    kl_theta: NDArray[np.float64] | None
    kl_t: NDArray[np.float64] | None
    ess_theta: NDArray[np.float64] | None
    ess_t: NDArray[np.float64] | None
    entropy: NDArray[np.float64] | None
    js: NDArray[np.float64] | None
    top_ids: NDArray[np.int64] | None
    top_logq: NDArray[np.float64] | None
    def __len__(self) -> int: ...

def solve_alpha(
    logp_theta: ArrayLike,
    logp_t: ArrayLike,
    *,
    method: _Method = "kl_symmetry",
    alpha: float = 0.5,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> float | NDArray[np.float64]:
    """α for log probabilities over the same candidates. Each row is normalised inside,
    so log-weights at any level (logits) are accepted too.

    One row (1-D) gives a float, a batch (2-D) one α per row. An entry that is -inf in
    one model only is a token that model cannot produce; -inf in both is padding.

    Example:
        >>> import numpy as np
        >>> solve_alpha(np.log([0.9, 0.1]), np.log([0.1, 0.9]))
        0.5
    """

def _solve_alpha_sweeps(
    logp_theta: ArrayLike,
    logp_t: ArrayLike,
    *,
    solver: Literal["halley", "bisect"],
    method: _Method = "kl_symmetry",
    alpha: float = 0.5,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Not public API: :func:`solve_alpha` by the named root solver, one α per row, and
    each row's count of sweeps over its common support (evaluations of the equation
    whose root α is; 0 where no root is needed).

    ``"halley"`` is what :func:`solve_alpha` and :func:`step` run; ``"bisect"`` is plain
    bisection of the same equation to the same ``tol`` (~34 sweeps at 1e-10), kept only as
    the baseline that ``benches/bench_kernels.py`` and ``tests/test_alpha_solver.py`` put
    beside it. Input is always taken as a batch (1-D: one row).
    """

def _with_alpha_solver(config: SamplerConfig, solver: Literal["halley", "bisect"]) -> SamplerConfig:
    """Not public API: a copy of ``config`` whose α is found by the named root solver (see
    :func:`_solve_alpha_sweeps`), so that the benches can time :func:`step` with
    bisection. The copy compares unequal to ``config`` when the solver differs; its repr
    does not show the solver."""

def mix(logp_theta: ArrayLike, logp_t: ArrayLike, alpha: float | ArrayLike) -> NDArray[np.float64]:
    """Normalised log q* ∝ (1 − α)·logp_theta + α·logp_t, exact at α = 0 and 1.

    ``alpha`` is a float or one value per row.
    """

def unlisted_bound(ids: ArrayLike, logp: ArrayLike) -> float | NDArray[np.float64]:
    """Per row of a top-k list (ids -1 / -inf padded), the log probability the ``"bound"``
    rule gives a token the list lacks: log min(smallest listed probability, unlisted
    mass), the unlisted mass taken as at least 1e-12 (as the merge does)."""

def merge_topk(
    ids_theta: ArrayLike,
    logp_theta: ArrayLike,
    ids_t: ArrayLike,
    logp_t: ArrayLike,
    *,
    missing: Literal["bound", "drop"] | float = "bound",
) -> tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64]]:
    """The union of two top-k lists: ``(ids, logp_theta, logp_t)``, padded with id -1 / -inf.

    Candidates come in a fixed order: the base list as given, then the teacher-only
    tokens as given. Unlisted tokens are valued by ``missing`` (see SamplerConfig).
    """

def mix_teachers(
    ids_list: Sequence[ArrayLike],
    logp_list: Sequence[ArrayLike],
    weights: Sequence[float] | ArrayLike,
    *,
    missing: Literal["bound", "drop"] | float = "bound",
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Several teachers' top-k lists as one mixed teacher, to pass to :func:`step` as
    ``(ids_t, logp_t)``: the step then samples q* ∝ π_θ^(1−a) Π π_i^(a·w_i), with the
    total weight a chosen by the config's α rule between π_θ and the teachers'
    normalised geometric mean π_w ∝ Π π_i^(w_i) (docs/design.md, section 1.4.1).

    Args:
        ids_list, logp_list: one array per teacher, each of shape (k_i,) or (rows, k_i)
            (the same rows for all), token ids and raw log probabilities; id -1 with
            -inf is padding.
        weights: one per teacher, finite, >= 0, summing to 1 (within 1e-9). A teacher
            at weight 0 takes no part.
        missing: the value, for a teacher, of a token another teacher listed (as in
            SamplerConfig); ``"drop"`` keeps the tokens every teacher with positive
            weight listed (all of them, valued as ``"bound"`` does, where they share
            none).

    Returns ``(ids, logp)`` of shape (rows, Σ k_i): teacher i's columns in the i-th block
    of k_i columns, an id an earlier teacher listed left as padding there; ``logp`` is
    Σ w_i log π_i, not renormalised (the step normalises it, and the unlisted mass it
    leaves is what the ``"bound"`` rule reads). One teacher at weight 1 comes back as
    given. Nothing is tempered here: the step's ``temperature_t`` applies to the mixed
    teacher, which is each teacher tempered by it.

    Raises:
        InvalidInputError: weights that are not one per teacher, negative, or not
            summing to 1 (naming ``weights``); malformed lists (naming ``ids_list`` or
            ``logp_list``, the row and the teacher).
        InvalidDtypeError: an argument of a type that cannot be converted safely.

    Example:
        >>> import numpy as np
        >>> teachers_ids = [np.array([5, 2]), np.array([2, 9])]
        >>> ids, logp = mix_teachers(teachers_ids, [np.log([0.5, 0.3]), np.log([0.6, 0.1])], [0.5, 0.5])
        >>> ids.tolist()
        [5, 2, -1, 9]
    """

def step(
    ids_theta: ArrayLike,
    logp_theta: ArrayLike,
    ids_t: ArrayLike,
    logp_t: ArrayLike,
    *,
    config: SamplerConfig | None = None,
    seed: int = 0,
    positions: ArrayLike | None = None,
    row_keys: ArrayLike | None = None,
    force_teacher: ArrayLike | None = None,
    drafts: ArrayLike | None = None,
    q_top_k: ArrayLike | None = None,
    q_top_p: ArrayLike | None = None,
    q_min_p: ArrayLike | None = None,
    alternatives: int = 0,
) -> StepResult:
    """One sampling step from q* for every row: merge, exclude, temperature, normalise,
    stability check, support constraint, α, q*, the caller's truncation of q*, draw.

    Args:
        ids_theta, logp_theta: the base model's top-k token ids and raw log
            probabilities, shape (k,) or (rows, k); id -1 with -inf is padding.
        ids_t, logp_t: the teacher's, shape (k_t,) or (rows, k_t).
        config: the step's settings (default ``SamplerConfig()``).
        seed, positions, row_keys: the uniform for a row is keyed by (seed, row key,
            position), so a token depends only on these and the row's own inputs —
            not on batch size, row order or thread count. Defaults: row key = row
            index, position = 0.
        force_teacher: bool per row; α = 1 there (e.g. the first generated token).
        drafts: per row, a token drafted deterministically to test, or -1. It is
            accepted with probability q*(d) (``accepted``), else the token is drawn from
            q* without d, so the token's law is q* either way (speculative sampling
            with a point-mass draft). The test draws a second uniform at the same key.
        q_top_k, q_top_p, q_min_p: an inference engine's sampling parameters, applied
            to q* over the candidates as vLLM's sampler applies them to its
            distribution, one value per row (None: off for every row). In that order:
            min_p keeps the candidates with probability >= min_p times the largest;
            top_k keeps those at or above the k-th largest probability (ties with it
            all stay); top_p, on what is left renormalised, drops the least probable
            (at equal probability the higher id first) while the mass up to them is at
            most 1 − top_p, never the most probable. The rest are renormalised, and the
            token, ``logq`` and the draft's test use that law, so a drafted token that
            truncation drops is never accepted. Off per row at top_k <= 0, top_p 1,
            min_p 0 (bit for bit as if not given); top_p must lie in (0, 1], min_p in
            [0, 1].
        alternatives: report this many most probable candidates per row
            (``top_ids``, ``top_logq``); 0 for none.

    Raises:
        InvalidInputError: malformed input, naming the argument and the row.
        InvalidDtypeError: an array of a dtype that cannot be converted safely.

    Example:
        >>> import numpy as np
        >>> r = step(np.array([3, 7]), np.log([0.6, 0.3]), np.array([7, 9]), np.log([0.7, 0.2]), seed=1)
        >>> int(r.token_id[0]) in (3, 7, 9)
        True
    """

def parse_completions_topk(
    body: bytes, rows: int, width: int, request_id: str | None = None, prompt_tokens: list[int] | None = None
) -> tuple[NDArray[np.int64], NDArray[np.float64], int | None]:
    """The first position's entries of each choice of a vLLM completions reply
    (``return_tokens_as_token_ids`` keys), read straight from the body's bytes.

    Returns ``(ids, logp, cached_tokens)``: arrays of shape (rows, width), rows in
    ``index`` order, padded with id -1 and -inf (``-9999.0``, vLLM's -inf, becomes -inf),
    and the prompt tokens served from the prefix cache as the reply's
    ``usage.prompt_tokens_details`` says (vLLM: the batch's last prompt), or None.

    With `request_id` and `prompt_tokens` (one count per row), the reply must echo them
    where it reports them (``id`` is ``cmpl-`` and the ``X-Request-Id`` sent;
    ``usage.prompt_tokens`` their sum): a reply to another request is an error.

    Raises:
        InvalidInputError: the body is not such a reply, has not ``rows`` choices, or
            answers another request.
    """

def parse_generate_topk(
    bodies: list[bytes], width: int, request_id: str | None = None, prompt_tokens: list[int] | None = None
) -> tuple[NDArray[np.int64], NDArray[np.float64], int | None]:
    """The first generated position's ``top_logprobs`` of each of a list of vLLM
    ``/inference/v1/generate`` replies (one per row), as ``(ids, logp)`` of shape
    (len(bodies), width), padded with id -1 and -inf, and the cached prompt tokens summed
    over the replies that report them (None if none do). Each reply must echo
    `request_id` in its ``request_id`` (vLLM: ``generate-tokens-`` and the
    ``X-Request-Id`` sent) and reply ``r`` ``prompt_tokens[r]`` as its
    ``usage.prompt_tokens``, where given and reported.

    Raises:
        InvalidInputError: a body is not such a reply, or answers another request (the
            message names its row).
    """

def parse_sglang_topk(
    body: bytes,
    rows: int,
    width: int,
    field: Literal["top", "token_ids"],
    request_id: str | None = None,
    prompt_tokens: list[int] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float64], int | None]:
    """The first generated position's entries of each item of a batched SGLang
    ``/generate`` reply: ``meta_info.output_top_logprobs`` (``field="top"``) or
    ``meta_info.output_token_ids_logprobs`` (``"token_ids"``), as ``(ids, logp)`` of
    shape (rows, width), padded with id -1 and -inf (a null log probability is -inf), and
    ``meta_info.cached_tokens`` summed over the items (None if none report it). Item
    ``r`` must echo ``f"{request_id}-{r}"`` (the ``rid`` sent) as ``meta_info.id`` and
    ``prompt_tokens[r]`` as ``meta_info.prompt_tokens``, where given and reported.

    Raises:
        InvalidInputError: the body is not such a reply, has not ``rows`` items, or
            answers another request.
    """

def parse_generate_positions(
    bodies: list[bytes],
    width: int,
    top_k: int | None = None,
    request_id: str | None = None,
    prompt_tokens: list[int] | None = None,
    lengths: list[int] | None = None,
    tokens: list[int] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64], NDArray[np.int64], int | None]:
    """Every generated position of one vLLM ``/inference/v1/generate`` reply per
    sequence, one row per position: ``(tokens, ids, logp, lengths, cached_tokens)``.
    ``tokens`` are the sampled (or replayed) tokens, ``ids``/``logp`` each position's
    entries (width columns, -1/-inf padding), ``lengths`` the rows of each reply. With
    `top_k`, a position listing more entries drops the first (the sampled token vLLM puts
    first when it is not among the top k). Echoes are checked as in
    :func:`parse_generate_topk`; with `lengths`, each reply must have that many
    positions, and with `tokens` (a replayed trace) those tokens.

    Raises:
        InvalidResponseError: a body is not such a reply, or not the one asked for.
        IncompleteReplyError, MismatchedReplyError: as :func:`parse_generate_topk`.
    """

def parse_sglang_positions(
    body: bytes,
    rows: int,
    width: int,
    field: Literal["top", "token_ids"],
    scored: bool,
    request_id: str | None = None,
    prompt_tokens: list[int] | None = None,
    lengths: list[int] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.float64], NDArray[np.int64], int | None]:
    """Every position of each item of a batched SGLang ``/generate`` reply, one row per
    position, as :func:`parse_generate_positions`. A draft (``scored=False``) reads the
    generated tokens and ``output_*`` lists; the scoring of a continuation given in the
    input (``scored=True``) reads ``input_*`` after its first entry (None from SGLang)
    and the first ``output_*`` position, with tokens -1. Echoes are checked as in
    :func:`parse_sglang_topk`; with `lengths`, item r must have ``lengths[r]`` positions.

    Raises:
        InvalidResponseError: the body is not such a reply, has not ``rows`` items, or
            not the positions asked for.
        IncompleteReplyError, MismatchedReplyError: as :func:`parse_sglang_topk`.
    """
