"""A record's fields, declared once: the JSONL record (`GenerationOutput.to_record`), the
Parquet columns, Ray's columns, the records reader and the exports all derive from
`FIELDS`.

Each field has a name (the record's key), a kind (its JSON shape, which fixes its
Parquet type and whether Ray holds it as JSON text), the settings under which a run
produces it (`when`), and whether it is in every record, null or not (`always`). A
field that is not `always` is left out of a record that lacks it (a failed record of a
rescored run has no exact values), and a run whose settings do not produce it has no
such column.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pyarrow as pa

    from ..config.coordinator import CoordinatorConfig

Kind = Literal[
    "id", "text", "prompt", "ids", "floats", "bools", "ints", "diagnostics",
    "weights", "floats_by_teacher", "bools_by_teacher", "ids_per_token", "floats_per_token",
]  # fmt: skip
#: What a run may produce beyond the fields every record has.
Condition = Literal["rescore", "speculate", "teachers", "topk_t", "topk_theta"]

DIAGNOSTIC_NAMES = ("kl_theta", "kl_t", "ess_theta", "ess_t", "entropy", "js")
SUMMARY_NAMES = ("mean", "std", "min", "max")


@dataclass(frozen=True)
class Field:
    """One key of a record."""

    name: str
    kind: Kind
    #: the `GenerationOutput` attribute that holds it
    attr: str
    #: what the run must do for the field to exist (all of them); empty: every run
    when: frozenset[Condition] = frozenset()
    doc: str = ""

    @property
    def always(self) -> bool:
        """In every record, with null as a value (the run's own fields)."""
        return not self.when

    @property
    def json_text_in_ray(self) -> bool:
        """Ray's columns hold it as JSON text (a nested mapping Arrow would not infer)."""
        return self.kind in ("diagnostics", "weights", "floats_by_teacher", "bools_by_teacher")

    @property
    def is_map(self) -> bool:
        """A mapping by teacher name (a Parquet map column, read back as pairs)."""
        return self.kind in ("weights", "floats_by_teacher", "bools_by_teacher")


def _f(name: str, kind: Kind, attr: str | None = None, when: Iterable[Condition] = (), doc: str = "") -> Field:
    return Field(name, kind, attr or name, frozenset(when), doc)


FIELDS: tuple[Field, ...] = (
    _f("id", "id", doc="the input line's id"),
    _f("prompt", "prompt", doc="the base's prompt as given (text, or token ids)"),
    _f("teacher_prompt", "prompt", "prompt_t", doc="the teacher's prompt as given"),
    _f("prompt_token_ids", "ids", doc="the base's prompt as the base tokenised it (null if refused before)"),
    _f("teacher_prompt_token_ids", "ids",
       doc="the teacher's prompt as the teacher tokenised it (null for a mixture, or if refused before)"),
    _f("text", "text", "generated_text", doc="the generated text, without a final stop token"),
    _f("token_ids", "ids", doc="the generated ids, a final stop token included"),
    _f("alpha", "floats", "alpha_history", doc="the weight on the teacher at each token"),
    _f("logp_theta", "floats", doc="the base's raw log probability of each token (or the missing rule's estimate)"),
    _f("logp_t", "floats", doc="the teacher's raw log probability of each token (or the missing rule's estimate)"),
    _f("logq", "floats", doc="log q* of each token: the law it was drawn from"),
    _f("observed_theta", "bools", doc="whether the base listed the token"),
    _f("observed_t", "bools", doc="whether the teacher (every teacher of a mixture) listed the token"),
    _f("fallback", "bools", doc="whether the stability fallback drew the token"),
    _f("finish_reason", "text", doc="stop, length or error"),
    _f("error", "text", doc="why the record failed (null unless it did)"),
    _f("diagnostics", "diagnostics", doc="per diagnostic, mean/std/min/max over the tokens"),
    _f("teacher", "text", when=["teachers"], doc="the named teacher the record was routed to"),
    _f("teachers", "weights", when=["teachers"], doc="a mixture's weights by teacher"),
    _f("logp_teachers", "floats_by_teacher", when=["teachers"], doc="each teacher's raw log probability"),
    _f("observed_teachers", "bools_by_teacher", when=["teachers"], doc="whether each teacher listed the token"),
    _f("logp_teachers_exact", "floats_by_teacher", when=["teachers", "rescore"], doc="each teacher's exact value"),
    _f("logp_theta_exact", "floats", when=["rescore"], doc="the base's exact value from scoring the sequence whole"),
    _f("logp_t_exact", "floats", when=["rescore"], doc="the teacher's exact value from scoring the sequence whole"),
    _f("round", "ints", when=["speculate"], doc="the speculative round that produced each token"),
    _f("drafted", "bools", when=["speculate"], doc="whether each token was a drafted token accepted"),
    _f("topk_ids_t", "ids_per_token", when=["topk_t"], doc="the teacher's top ids at each position"),
    _f("topk_logp_t", "floats_per_token", when=["topk_t"], doc="their raw log probabilities"),
    _f("topk_ids_theta", "ids_per_token", when=["topk_theta"], doc="the base's top ids (or the teacher's ids)"),
    _f("topk_logp_theta", "floats_per_token", when=["topk_theta"], doc="their raw log probabilities"),
)  # fmt: skip

BY_NAME = {f.name: f for f in FIELDS}
#: Keys whose null is a value of the record, not a key it lacks.
ALWAYS = frozenset(f.name for f in FIELDS if f.always)
#: A mixture record's fields, each a mapping by teacher name.
MIXTURE_FIELDS = tuple(f.name for f in FIELDS if f.is_map)


def produced(conditions: Iterable[Condition]) -> tuple[Field, ...]:
    """The fields of a run that does `conditions` (rescores, speculates, ...), in order."""
    have = frozenset(conditions)
    return tuple(f for f in FIELDS if f.when <= have)


def run_conditions(config: CoordinatorConfig, speculate: bool) -> frozenset[Condition]:
    """What a run with these settings produces beyond every record's fields (`speculate`:
    whether start-up left speculative rounds on). The base's top-k too with
    ``save_topk_of="both"``, or with exact scoring (its values of the teacher's ids)."""
    run = config.run
    topk = run.save_topk > 0
    flags: dict[Condition, bool] = {
        "rescore": bool(run.rescore),
        "speculate": speculate,
        "teachers": bool(config.teachers),
        "topk_t": topk,
        "topk_theta": topk and (run.save_topk_of == "both" or config.base_scores_candidates),
    }
    return frozenset(c for c, on in flags.items() if on)


def from_row(row: dict[str, Any], decode_json: bool = False) -> dict[str, Any]:
    """A record as the JSONL output has it, from a table row (Parquet or Ray) holding
    null where the record lacks an optional key; `decode_json`: the nested fields are
    JSON text (Ray's columns)."""
    record: dict[str, Any] = {}
    for name, value in row.items():
        f = BY_NAME.get(name)
        if f is None or (value is None and not f.always):
            if f is None and value is not None:
                record[name] = value  # a column of someone else's: kept as it is
            continue
        if isinstance(value, str) and f.json_text_in_ray and decode_json:
            import json

            value = json.loads(value)
        elif f.is_map and isinstance(value, list):
            value = dict(value)  # a map column reads as (key, value) pairs
        record[name] = value
    if "diagnostics" in record:
        record["diagnostics"] = record["diagnostics"] or {}
    return record


def arrow_schema(fields: Iterable[Field], id_type: pa.DataType, metadata: dict[bytes, bytes]) -> pa.Schema:
    """The Parquet schema of `fields` (the id column's type chosen by the caller)."""
    import pyarrow as pa

    floats, bools = pa.list_(pa.float64()), pa.list_(pa.bool_())
    summary = pa.struct([(name, pa.float64()) for name in SUMMARY_NAMES])
    types: dict[str, pa.DataType] = {
        "id": id_type,
        "text": pa.string(),
        "prompt": pa.string(),
        "ids": pa.list_(pa.int64()),
        "ints": pa.list_(pa.int64()),
        "floats": floats,
        "bools": bools,
        "diagnostics": pa.struct([(name, summary) for name in DIAGNOSTIC_NAMES]),
        "weights": pa.map_(pa.string(), pa.float64()),
        "floats_by_teacher": pa.map_(pa.string(), floats),
        "bools_by_teacher": pa.map_(pa.string(), bools),
        "ids_per_token": pa.list_(pa.list_(pa.int64())),
        "floats_per_token": pa.list_(floats),
    }
    return pa.schema([(f.name, types[f.kind]) for f in fields], metadata=metadata)
