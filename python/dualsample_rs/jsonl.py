"""Reading prompts and writing records as JSON lines, safe to resume after a crash.

A record is written with one ``write`` and flushed as its sequence finishes. A run killed
mid-write leaves at most one partial last line; resuming drops it, collects the ids
already written, and appends only the missing records, so every input is written once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import IO, Any

from .exceptions import InvalidInputError


def read_prompts(
    path: str, prompt_field: str = "prompt", teacher_field: str = "teacher_prompt"
) -> Iterator[dict[str, Any]]:
    """Input records: ``id`` (default: the line number), ``prompt`` and optionally
    ``teacher_prompt`` (default: ``prompt``); blank lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InvalidInputError(f"input, line {lineno}: not JSON ({err.msg})") from err
            if not isinstance(obj, dict) or prompt_field not in obj:
                raise InvalidInputError(f"input, line {lineno}: expected an object with a {prompt_field!r} field")
            prompt = obj[prompt_field]
            yield {
                "id": obj.get("id", lineno),
                "prompt": prompt,
                "teacher_prompt": obj.get(teacher_field, prompt),
            }


def count_lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def done_ids(path: str, retry_errors: bool = False) -> set[Any]:
    """Ids already in an output file, after cutting off a partial last line. With
    `retry_errors`, records that failed are removed from the file (rewritten through a
    temporary file and an atomic rename) and left out, so they are generated again."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    ids: set[Any] = set()
    kept: list[bytes] = []
    good = 0
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            record = json.loads(line)
            key = _hashable(record["id"])
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            break
        good += len(line)
        if retry_errors and record.get("finish_reason") == "error":
            continue
        ids.add(key)
        kept.append(line)
    if retry_errors and len(kept) < data[:good].count(b"\n"):
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    elif good < len(data):
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids


def _hashable(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, (list, dict)) else value


def is_done(record_id: Any, ids: set[Any]) -> bool:
    return _hashable(record_id) in ids


class RecordWriter:
    """Appends one JSON object per line, flushed as each record is written."""

    def __init__(self, path: str, *, append: bool) -> None:
        self._f: IO[str] = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
