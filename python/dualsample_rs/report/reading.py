"""Records files read as chunks of flat per-token arrays, a bounded number of records at a time.

A report looks at every token of a file that may hold millions of records, so nothing
is kept per record beyond one chunk: each chunk holds its records' per-token lists laid
end to end (one float array per field, aligned with ``token_ids``), the records' token
counts, finish reasons and diagnostics. JSONL is read line by line; Parquet (a file,
or a directory of part files as Ray writes them) by row batches through pyarrow, whose
list columns already are flat arrays with offsets.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..exceptions import InvalidInputError

# Per-token fields a report reads; booleans are read as 0.0/1.0. A record without one of
# them (a run without --rescore or --speculate, a failed record of a rescored run) has
# NaN there, so every array keeps the layout of token_ids.
TOKEN_FIELDS = (
    "alpha", "logp_theta", "logp_t", "logq", "observed_theta", "observed_t", "fallback",
    "logp_theta_exact", "logp_t_exact", "round", "drafted",
)  # fmt: skip
# A chunk ends at this many records or tokens, whichever comes first: enough tokens that
# numpy's per-call cost vanishes, few enough that the parsed JSON of a chunk (~30 bytes per
# value as Python floats in lists, eleven values per token) stays near 20 MB however long
# the sequences.
CHUNK_RECORDS = 2048
CHUNK_TOKENS = 1 << 16


@dataclass
class Chunk:
    """Consecutive records, per-token fields flattened in record order.

    Attributes:
        lengths: token count of each record.
        finish_reasons: each record's ``finish_reason`` (None where absent).
        diagnostics: each record's ``diagnostics`` mapping ({} where absent).
        tokens: field name -> float64 array of ``lengths.sum()`` values; NaN where a
            record lacks the field. Only fields some record of the chunk has.
    """

    lengths: np.ndarray
    finish_reasons: list[str | None]
    diagnostics: list[dict[str, Any]]
    tokens: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.finish_reasons)


def record_files(path: str) -> list[str]:
    """The files a records path stands for: the file itself, or a directory's ``*.parquet``
    / ``*.jsonl`` files in name order (Ray writes one part file per block)."""
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if n.endswith((".parquet", ".jsonl")) and not n.startswith("."))
        if not names:
            raise InvalidInputError(f"RECORDS: directory {path!r} has no .parquet or .jsonl files")
        return [os.path.join(path, n) for n in names]
    if not os.path.exists(path):
        raise InvalidInputError(f"RECORDS: {path!r} does not exist")
    return [path]


def _is_parquet(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def iter_chunks(path: str, chunk_records: int = CHUNK_RECORDS, chunk_tokens: int = CHUNK_TOKENS) -> Iterator[Chunk]:
    """Every record of the file(s) at `path`, in chunks of at most `chunk_records` records
    (and, from JSONL, at most `chunk_tokens` tokens unless one record has more).

    Raises:
        InvalidInputError: a line that is not a JSON object, a per-token list whose length
            is not that of ``token_ids``, a Parquet file without pyarrow (naming the
            file and line or row).
    """
    for name in record_files(path):
        if _is_parquet(name):
            yield from _parquet_chunks(name, chunk_records)
        else:
            yield from _jsonl_chunks(name, chunk_records, chunk_tokens)


# ---------------------------------------------------------------- JSONL


def _jsonl_chunks(path: str, chunk_records: int, chunk_tokens: int) -> Iterator[Chunk]:
    batch: list[tuple[str, dict[str, Any]]] = []
    tokens = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise InvalidInputError(f"RECORDS: {where}: not a JSON record ({err})") from None
            if not isinstance(record, dict):
                raise InvalidInputError(f"RECORDS: {where}: not a JSON object")
            batch.append((where, record))
            ids = record.get("token_ids")
            tokens += len(ids) if isinstance(ids, list) else 0
            if len(batch) == chunk_records or tokens >= chunk_tokens:
                yield _chunk_of(batch)
                batch, tokens = [], 0
    if batch:
        yield _chunk_of(batch)


def _token_count(where: str, record: dict[str, Any]) -> int:
    ids = record.get("token_ids")
    if not isinstance(ids, (list, range)):
        raise InvalidInputError(f"RECORDS: {where}: 'token_ids' is not a list")
    return len(ids)


def _chunk_of(rows: Sequence[tuple[str, dict[str, Any]]]) -> Chunk:
    """A chunk from parsed records (`where` names each for errors)."""
    lengths = np.fromiter((_token_count(w, r) for w, r in rows), dtype=np.int64, count=len(rows))
    chunk = Chunk(
        lengths=lengths,
        finish_reasons=[r.get("finish_reason") for _, r in rows],
        diagnostics=[_diagnostics(w, r.get("diagnostics")) for w, r in rows],
    )
    total = int(lengths.sum())
    for name in TOKEN_FIELDS:
        if not any(r.get(name) is not None for _, r in rows):
            continue
        parts: list[Any] = []
        for (where, record), n in zip(rows, lengths.tolist(), strict=True):
            values = record.get(name)
            if values is None:
                parts.append(itertools.repeat(math.nan, n))
            elif len(values) != n:
                raise InvalidInputError(f"RECORDS: {where}: {name!r} has {len(values)} entries, 'token_ids' {n}")
            else:
                parts.append(values)
        try:
            flat = np.fromiter(itertools.chain.from_iterable(parts), dtype=np.float64, count=total)
        except (TypeError, ValueError):
            bad = next(w for w, r in rows if not _numbers(r.get(name)))
            raise InvalidInputError(f"RECORDS: {bad}: {name!r} holds a value that is not a number") from None
        chunk.tokens[name] = flat
    return chunk


def _numbers(values: Any) -> bool:
    return values is None or all(isinstance(v, (int, float)) for v in values)


def _diagnostics(where: str, value: Any) -> dict[str, Any]:
    """The diagnostics mapping; Ray's Parquet keeps it as JSON text."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value else {}
        except json.JSONDecodeError:
            raise InvalidInputError(f"RECORDS: {where}: 'diagnostics' is not JSON") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"RECORDS: {where}: 'diagnostics' is not a mapping")
    return value


# ---------------------------------------------------------------- Parquet


def _parquet_chunks(path: str, chunk_records: int) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InvalidInputError(
            f"RECORDS: {path} is Parquet, which needs pyarrow (pip install 'dualsample_rs[parquet]')"
        ) from None
    parquet = pq.ParquetFile(path)
    present = set(parquet.schema_arrow.names)
    if "token_ids" not in present:
        raise InvalidInputError(f"RECORDS: {path}: no 'token_ids' column")
    wanted = [c for c in ("token_ids", "finish_reason", "diagnostics", *TOKEN_FIELDS) if c in present]
    row = 0
    for batch in parquet.iter_batches(batch_size=chunk_records, columns=wanted):
        yield _arrow_chunk(path, row, batch)
        row += batch.num_rows


def _arrow_chunk(path: str, first_row: int, batch: Any) -> Chunk:
    """A chunk from a pyarrow RecordBatch: list columns taken flat, without Python objects
    per token, unless a record lacks the list (a null), which takes the slow path."""
    import pyarrow.compute as pc

    ids = batch.column("token_ids")
    if ids.null_count:
        bad = first_row + next(i for i, v in enumerate(ids.is_null().to_pylist()) if v)
        raise InvalidInputError(f"RECORDS: {path}, row {bad}: 'token_ids' is null")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
    names = batch.schema.names
    reasons = batch.column("finish_reason").to_pylist() if "finish_reason" in names else [None] * len(lengths)
    raw_diagnostics = batch.column("diagnostics").to_pylist() if "diagnostics" in names else [None] * len(lengths)
    chunk = Chunk(
        lengths=lengths,
        finish_reasons=reasons,
        diagnostics=[_diagnostics(f"{path}, row {first_row + i}", d) for i, d in enumerate(raw_diagnostics)],
    )
    for name in TOKEN_FIELDS:
        if name not in names:
            continue
        column = batch.column(name)
        if column.null_count == len(column):
            continue
        counts = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        if column.null_count == 0 and np.array_equal(counts, lengths):
            flat = column.flatten().to_numpy(zero_copy_only=False)
            chunk.tokens[name] = np.asarray(flat, dtype=np.float64)
            continue
        rows = [(f"{path}, row {first_row + i}", {"token_ids": range(n), name: v})
                for i, (n, v) in enumerate(zip(lengths.tolist(), column.to_pylist(), strict=True))]  # fmt: skip
        chunk.tokens[name] = _chunk_of(rows).tokens[name]
    return chunk
