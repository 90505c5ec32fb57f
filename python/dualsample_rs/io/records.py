"""Reading a records file back, streamed: the JSONL output, the Parquet output, or the
Parquet directory a Ray run writes. Every record comes as the JSONL output has it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ..exceptions import DualSampleError, InvalidInputError
from .schema import from_row

#: Records read from Parquet per batch.
BATCH = 256


def read_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Each record of `path` with where it is (``"line 3"``, ``"x.parquet row 7"``),
    streamed: JSONL line by line, Parquet batch by batch."""
    if os.path.isdir(path) or path.endswith(".parquet"):
        yield from _parquet_records(path)
        return
    try:
        f = open(path, encoding="utf-8")  # closed by the with below
    except OSError as err:
        raise InvalidInputError(f"input: cannot read {path}: {err.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInputError(f"input: line {n}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise InvalidInputError(f"input: line {n}: not a JSON object")
            yield f"line {n}", record


def _parquet_records(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DualSampleError("a Parquet input needs pyarrow: pip install 'dualsample_rs[parquet]'") from None
    from .parquet_file import is_output_file, iter_records

    if os.path.isdir(path):
        files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".parquet"))
        if not files:
            raise InvalidInputError(f"input: {path} holds no .parquet file")
    else:
        files = [path]
    for name in files:
        where = os.path.basename(name)
        if is_output_file(name):
            # `dualsample generate --output x.parquet`: complete row groups, typed columns.
            for row, record in enumerate(iter_records(name, BATCH)):
                yield f"{where} row {row}", record
            continue
        try:
            reader = pq.ParquetFile(name)
        except (OSError, ValueError) as err:
            raise InvalidInputError(f"input: {name}: not a Parquet file ({err})") from None
        row = 0
        for batch in reader.iter_batches(batch_size=BATCH):
            for record in batch.to_pylist():
                yield f"{where} row {row}", _from_row(record)
                row += 1


def _from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A record from a row of another Parquet file, e.g. the directory of a Ray run
    (`generate --ray`), which keeps the nested fields as JSON text and has null where a
    record lacks an optional key."""
    return from_row(row, decode_json=True)
