"""The output as one Parquet file (``--output x.parquet`` without Ray), safe to resume.

Columns are typed: per-token fields are list columns (``list<int64>`` token ids,
``list<double>`` log probabilities and α, ``list<bool>`` flags, ``list<list<...>>`` for
the top-k keys), text is ``string``, ``error`` is null unless the record failed.
``diagnostics`` is a struct (name → {mean, std, min, max}), null when the record has none:
every reader (pyarrow, polars, datasets) gives it as nested fields that can be selected
or unnested without parsing text, and the names are fixed (``DIAGNOSTIC_NAMES``), so the
struct never changes shape. The ``id`` column keeps the ids' JSON type when they share
one: ``int64`` if every id is an integer, ``string`` if every id is a string, else (ints
mixed with strings, or other JSON values) ``string`` holding each id's canonical JSON
text (``1`` and ``"1"`` stay two ids). The rule used is in the file's key-value metadata
(``dualsample.id``), which is how records are read back.

The schema is fixed when the run starts, from its settings: the rescoring, speculation
and top-k columns exist only when the run produces them; a record without such a key
(a failed record of a rescored run) has nulls there, and reading it back drops them.

Writing and crashes. Records are kept in memory until a row group is due (every
`rows` records or `seconds` seconds), then the row group is encoded, its bytes written
over the old footer, and a new footer written after them, so between row groups the file
is a complete Parquet file. A journal beside it (``<output>.rowgroups``) holds, for each
row group written by this run, where its bytes end and its own footer; it is written
after the row group's bytes and before the new footer, so a kill at any moment (SIGKILL
included) loses at most the open row group: ``--resume`` rebuilds the footer from the
journal (or finds the file complete) and carries on. The journal is removed when the
writer closes. Removing failed records (``--retry-errors``) writes a new file and renames
it over the old one, as for JSONL.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from ..exceptions import DualSampleError, InvalidInputError
from .input_file import id_hash, id_text
from .output_file import ExistingOutput, fsync_dir
from .parquet_footer import FooterError, shift_offsets
from .schema import Condition, arrow_schema, from_row, produced, run_conditions

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..config.coordinator import CoordinatorConfig

# When a row group is written: whichever comes first. Large enough that a file's footer
# (one entry per row group and column) stays small; short enough that a crash loses
# little. The environment may change them (tests write many small row groups).
ROW_GROUP_RECORDS = int(os.environ.get("DUALSAMPLE_PARQUET_ROWS", "1000"))
ROW_GROUP_SECONDS = float(os.environ.get("DUALSAMPLE_PARQUET_SECONDS", "30"))
_MAGIC = b"PAR1"
_ID_KEY = b"dualsample.id"
# Compressed with zstd: every reader here reads it, and it is markedly smaller than snappy
# on log probabilities.
_COMPRESSION = "zstd"


def require_pyarrow() -> None:
    """Raise `InvalidInputError` (one line, exit 2) when the parquet extra is missing."""
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InvalidInputError(
            "--output: writing Parquet needs pyarrow, the parquet extra (pip install 'dualsample_rs[parquet]')"
        ) from None


def id_kind(ids: Iterable[Any]) -> str:
    """The id column's rule for these ids: ``int``, ``string`` or ``json`` (see the module)."""
    kinds = set()
    for value in ids:
        if isinstance(value, str):
            kinds.add("string")
        elif isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63:
            kinds.add("int")
        else:
            return "json"
        if len(kinds) > 1:
            return "json"
    return kinds.pop() if kinds else "string"


def record_schema(
    kind: str,
    *,
    rescore: bool = False,
    speculate: bool = False,
    topk_t: bool = False,
    topk_theta: bool = False,
    teacher: bool = False,
) -> pa.Schema:
    """The columns of a run's records: those of :mod:`.schema` that the run produces."""
    import pyarrow as pa

    flags: dict[Condition, bool] = {"rescore": rescore, "speculate": speculate, "topk_t": topk_t,
                                    "topk_theta": topk_theta, "teachers": teacher}  # fmt: skip
    fields = produced(c for c, on in flags.items() if on)
    return arrow_schema(fields, pa.int64() if kind == "int" else pa.string(), {_ID_KEY: kind.encode()})


def run_schema(config: CoordinatorConfig, speculate: bool, kind: str) -> pa.Schema:
    """The schema of a run from its settings (`speculate`: whether the coordinator runs
    speculative rounds)."""
    import pyarrow as pa

    fields = produced(run_conditions(config, speculate))
    return arrow_schema(fields, pa.int64() if kind == "int" else pa.string(), {_ID_KEY: kind.encode()})


def _kind_of(schema: pa.Schema) -> str:
    kind: bytes = (schema.metadata or {}).get(_ID_KEY, b"json")
    return kind.decode()


def to_table(records: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Records as a table of `schema`; a key the schema has no column for is an error
    (rather than a value silently dropped)."""
    import pyarrow as pa

    names = set(schema.names)
    for record in records:
        extra = set(record) - names
        if extra:
            raise DualSampleError(f"Parquet output: record keys {sorted(extra)} have no column in this run's schema")
    kind = _kind_of(schema)
    columns: dict[str, list[Any]] = {name: [r.get(name) for r in records] for name in schema.names}
    if kind == "json":
        columns["id"] = [id_text(v) for v in columns["id"]]
    columns["diagnostics"] = [d or None for d in columns["diagnostics"]]
    return pa.table(columns, schema=schema)


def record_from_row(row: dict[str, Any], kind: str) -> dict[str, Any]:
    """A record as the JSONL output has it, from a row of the file."""
    record = from_row(row)
    if kind == "json":
        record["id"] = json.loads(record["id"])
    return record


def _encode(table: pa.Table | None, schema: pa.Schema) -> tuple[bytes, bytes]:
    """A one-row-group (or empty) Parquet file in memory: its column chunk bytes (as if
    placed at offset 4) and its serialized footer."""
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    writer = pq.ParquetWriter(buf, schema, compression=_COMPRESSION)
    if table is not None:
        writer.write_table(table, row_group_size=max(1, table.num_rows))
    writer.close()
    data = buf.getvalue()
    n = struct.unpack("<I", data[-8:-4])[0]
    return data[4 : len(data) - 8 - n], data[len(data) - 8 - n : len(data) - 8]


def _metadata(footer: bytes) -> pq.FileMetaData:
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pq.read_metadata(pa.BufferReader(_MAGIC + footer + struct.pack("<I", len(footer)) + _MAGIC))


def _serialize(meta: pq.FileMetaData) -> bytes:
    """`meta` as the tail of a file: the footer, its length and the magic."""
    buf = io.BytesIO()
    meta.write_metadata_file(buf)
    return buf.getvalue()[4:]


def _journal(path: str) -> str:
    return path + ".rowgroups"


def _frame(data_end: int, footer: bytes) -> bytes:
    return struct.pack("<QI", data_end, len(footer)) + footer


def _read_journal(path: str) -> list[tuple[int, bytes]]:
    """The journal's complete frames (a torn last one is dropped)."""
    frames = []
    with open(_journal(path), "rb") as f:
        data = f.read()
    pos = 0
    while pos + 12 <= len(data):
        end, n = struct.unpack_from("<QI", data, pos)
        if pos + 12 + n > len(data):
            break
        frames.append((end, data[pos + 12 : pos + 12 + n]))
        pos += 12 + n
    return frames


def _tail_footer(path: str) -> tuple[int, bytes] | None:
    """Where the column data of a complete Parquet file ends, and its footer; None when
    the file does not end with a footer."""
    size = os.path.getsize(path)
    if size < 12:
        return None
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(size - 8)
        tail = f.read(8)
        if head != _MAGIC or tail[4:] != _MAGIC:
            return None
        n = struct.unpack("<I", tail[:4])[0]
        if n + 12 > size:
            return None
        f.seek(size - 8 - n)
        footer = f.read(n)
    try:
        _metadata(footer)
    except Exception:  # pyarrow raises OSError or ArrowInvalid for a broken footer
        return None
    return size - 8 - n, footer


def _recovered(path: str) -> tuple[int, pq.FileMetaData]:
    """The file's complete state without changing it: where its last complete row group
    ends, and the metadata of all its complete row groups. From the journal of a run that
    did not close, else from the footer. Raises `InvalidInputError` for anything else."""
    if os.path.exists(_journal(path)):
        frames = _read_journal(path)
        if not frames:
            raise InvalidInputError(f"output: {_journal(path)} is empty; remove it if {path} is complete")
        size = os.path.getsize(path)
        data_end, footer = frames[0]
        try:
            meta = _metadata(footer)
            for end, rg_footer in frames[1:]:
                if end > size:
                    break
                meta.append_row_groups(_metadata(rg_footer))
                data_end = end
        except Exception as err:
            raise InvalidInputError(
                f"output: {_journal(path)} is not a row-group journal ({err}); nothing was changed"
            ) from None
        return data_end, meta
    found = _tail_footer(path)
    if found is None:
        raise InvalidInputError(
            f"output: {path} is not a Parquet file (no footer, and no journal {_journal(path)} to rebuild it); "
            "nothing was changed. Use another --output or --overwrite"
        )
    return found[0], _metadata(found[1])


def _open(path: str, meta: pq.FileMetaData) -> pq.ParquetFile:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, metadata=meta)


def is_output_file(path: str) -> bool:
    """Whether `path` is a Parquet output of `dualsample generate` (its footer, or its
    journal, names the id rule); False for any other Parquet file."""
    import pyarrow.parquet as pq

    if os.path.exists(_journal(path)):
        return True
    try:
        return _ID_KEY in (pq.read_schema(path).metadata or {})
    except (OSError, ValueError):
        return False


def iter_records(path: str, batch_rows: int = 1024) -> Iterator[dict[str, Any]]:
    """The records of a Parquet output (complete row groups only), as JSONL has them."""
    _, meta = _recovered(path)
    kind = _kind_of(meta.schema.to_arrow_schema())
    for batch in _open(path, meta).iter_batches(batch_size=batch_rows):
        for row in batch.to_pylist():
            yield record_from_row(row, kind)


def scan_parquet(path: str, retry_errors: bool = False) -> ExistingOutput:
    """What a resumed run finds in a Parquet output, without changing it. With
    `retry_errors`, failed records do not count as done."""
    if not os.path.exists(path) or (os.path.getsize(path) == 0 and not os.path.exists(_journal(path))):
        return ExistingOutput(np.zeros(0, dtype=np.uint64), 0, 0, 0, 0)
    _, meta = _recovered(path)
    kind = _kind_of(meta.schema.to_arrow_schema())
    hashes: list[int] = []
    records = failed = 0
    for batch in _open(path, meta).iter_batches(columns=["id", "finish_reason"]):
        for record_id, reason in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True):
            records += 1
            if reason == "error":
                failed += 1
                if retry_errors:
                    continue
            hashes.append(id_hash(json.loads(record_id) if kind == "json" else record_id))
    done = np.array(hashes, dtype=np.uint64)
    done.sort()
    size = os.path.getsize(path)
    return ExistingOutput(done, records, failed, size, size)


def check_resumable(path: str, schema: pa.Schema) -> None:
    """Refuse to continue a file whose columns differ from this run's (other settings,
    or ids of another kind): a Parquet file has one schema."""
    if not os.path.exists(path) or (os.path.getsize(path) == 0 and not os.path.exists(_journal(path))):
        return
    _, meta = _recovered(path)
    have = meta.schema.to_arrow_schema()
    if have.names != schema.names:
        missing = [n for n in schema.names if n not in have.names]
        extra = [n for n in have.names if n not in schema.names]
        raise InvalidInputError(
            f"output: {path} has other columns than this run writes (missing {missing}, extra {extra}); "
            "resume with the settings that wrote it, or write another --output"
        )
    if _kind_of(have) != _kind_of(schema) or not have.remove_metadata().equals(schema.remove_metadata()):
        raise InvalidInputError(
            f"output: {path} stores ids as {_kind_of(have)}, this input's ids need {_kind_of(schema)}; "
            "write another --output"
        )


def prepare_parquet_resume(path: str, existing: ExistingOutput, retry_errors: bool) -> None:
    """Make the file complete again (footer rebuilt from the journal) and, with
    `retry_errors`, drop failed records through a new file renamed over the old one."""
    if not os.path.exists(path) or (existing.records == 0 and not os.path.exists(_journal(path))):
        return
    data_end, meta = _recovered(path)
    if retry_errors and existing.failed:
        import pyarrow as pa
        import pyarrow.compute as pc

        schema = meta.schema.to_arrow_schema()
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with ParquetRecordWriter(tmp, schema, append=False, journal=False) as writer:
                for batch in _open(path, meta).iter_batches():
                    kept = batch.filter(pc.invert(pc.equal(batch.column("finish_reason"), "error")))
                    writer.write_table(pa.Table.from_batches([kept]))
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(path)
    else:
        tail = _serialize(meta)
        with open(path, "r+b") as f:
            f.seek(data_end)
            f.write(tail)
            f.truncate(data_end + len(tail))
    if os.path.exists(_journal(path)):
        os.unlink(_journal(path))


class ParquetRecordWriter:
    """Writes records into a Parquet file in row groups, every `rows` records or
    `seconds` seconds, whichever first (see the module for what a crash leaves)."""

    def __init__(
        self,
        path: str,
        schema: pa.Schema,
        *,
        append: bool,
        rows: int = ROW_GROUP_RECORDS,
        seconds: float = ROW_GROUP_SECONDS,
        journal: bool = True,
    ) -> None:
        self.path, self.schema, self.rows, self.seconds = path, schema, rows, seconds
        self._journal = journal
        self._pending: list[dict[str, Any]] = []
        self._since = 0.0
        if append and os.path.exists(path) and os.path.getsize(path) > 0:
            found = _tail_footer(path)
            if found is None:
                raise InvalidInputError(f"output: {path} is not a complete Parquet file; nothing was changed")
            self._data_end, footer = found
        else:
            # A file of no rows, made whole beside the output and renamed over it.
            _, footer = _encode(None, schema)
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(_MAGIC + footer + struct.pack("<I", len(footer)) + _MAGIC)
            os.replace(tmp, path)
            self._data_end = len(_MAGIC)
        self._meta = _metadata(footer)
        if journal:
            tmp = f"{_journal(path)}.tmp.{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(_frame(self._data_end, footer))
            os.replace(tmp, _journal(path))
        self._file = open(path, "r+b", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        """Add a record; write the row group when it is due."""
        if not self._pending:
            self._since = time.monotonic()
        self._pending.append(record)
        if len(self._pending) >= self.rows:
            self.flush()
        else:
            self.flush_if_due()

    def flush_if_due(self) -> None:
        """Write the open row group if it is older than `seconds`."""
        if self._pending and time.monotonic() - self._since >= self.seconds:
            self.flush()

    def flush(self) -> None:
        """Write the open row group (if any), then the footer."""
        if not self._pending:
            return
        table = to_table(self._pending, self.schema)
        self._pending = []
        self.write_table(table)

    def write_table(self, table: pa.Table) -> None:
        """Append `table` (of this file's schema) as one row group."""
        if table.num_rows == 0:
            return
        chunks, footer = _encode(table.cast(self.schema), self.schema)
        placed = shift_offsets(footer, self._data_end - len(_MAGIC))
        self._meta.append_row_groups(_metadata(placed))
        f = self._file
        f.seek(self._data_end)
        _write_all(f, chunks)
        self._data_end += len(chunks)
        if self._journal:
            with open(_journal(self.path), "ab", buffering=0) as j:
                _write_all(j, _frame(self._data_end, placed))
        tail = _serialize(self._meta)
        _write_all(f, tail)
        f.truncate(self._data_end + len(tail))

    def close(self) -> None:
        """Write what is open and the final footer; remove the journal."""
        if self._file.closed:
            return
        try:
            self.flush()
        finally:
            self._file.close()
        if self._journal and os.path.exists(_journal(self.path)):
            os.unlink(_journal(self.path))

    def __enter__(self) -> ParquetRecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(f: Any, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view) or 0 :]


__all__ = [
    "ROW_GROUP_RECORDS",
    "ROW_GROUP_SECONDS",
    "FooterError",
    "ParquetRecordWriter",
    "check_resumable",
    "id_kind",
    "iter_records",
    "prepare_parquet_resume",
    "record_schema",
    "require_pyarrow",
    "run_schema",
    "scan_parquet",
]
