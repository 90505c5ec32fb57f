"""The prompt file: checked whole before any server is contacted, then streamed.

A JSONL line is an object with ``prompt``, optionally ``id`` (default: the line number)
and ``teacher_prompt`` (default: ``prompt``); with named teachers, optionally ``teacher``
(the one it goes to), ``teachers`` (a mixture, ``{name: weight}``) and the prompt fields
of teachers that read their own (see `Fields`). Problems that concern the whole run
(bytes that are not UTF-8, a line that is not a JSON object, an id that is not finite
or that appears twice) are refused at start, with line numbers; a prompt of the wrong
kind only fails its own record (see :func:`dualsample_rs.prompts.check_prompt`).

Ids are compared by their canonical JSON text, so ``5`` given explicitly and the
default id of line 5 are the same id, and ``"5"`` is another. The check keeps one
64-bit hash per line, so a million-line file costs 8 MB, not a set of a million objects.
"""

from __future__ import annotations

import array
import hashlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..exceptions import InvalidInputError

if TYPE_CHECKING:
    from ..config.coordinator import TeacherSettings


@dataclass(frozen=True)
class InputRecord:
    """One line of the prompt file, prompts not yet checked. ``teacher`` and ``mix``: the
    teacher and mixture it names (None: none); ``teacher_prompts``: the prompts of
    teachers that read a field of their own, where the line has it."""

    line: int
    id: Any
    prompt: Any
    teacher_prompt: Any
    teacher: Any = None
    mix: Any = None
    teacher_prompts: dict[str, Any] | None = None


@dataclass(frozen=True)
class Fields:
    """The fields of a line that concern named teachers: the teacher's name (`route`), a
    mixture of teachers (`mix`), and the prompt field of each teacher with one of its
    own (`own`: ``((teacher, field), ...)``)."""

    route: str = "teacher"
    mix: str = "teachers"
    own: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, teachers: tuple[tuple[str, TeacherSettings], ...], route: str = "teacher") -> Fields:
        """A run's fields: `route` names a line's teacher, and each teacher with a
        ``prompt_field`` reads its prompt there."""
        return cls(route, own=tuple((name, t.prompt_field) for name, t in teachers if t.prompt_field is not None))


def id_text(value: Any) -> str:
    """The canonical JSON text of a record id: what two ids are compared by."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def id_hash(value: Any) -> int:
    """A 64-bit hash of the id's canonical text (for compact sets of ids)."""
    return int.from_bytes(
        hashlib.blake2b(id_text(value).encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little"
    )


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


def _lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset of the line, bytes) for every line of the file."""
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            yield lineno, offset, raw
            offset += len(raw)


def _parse(
    lineno: int,
    offset: int,
    raw: bytes,
    prompt_field: str,
    teacher_field: str,
    require_id: bool = False,
    fields: Fields | None = None,
) -> InputRecord | None:
    """The record on one line, None for a blank line; InvalidInputError for a broken one
    (with `require_id`, also for one without an id). `fields`: also read the teacher
    fields it names."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInputError(
            f"input, line {lineno} (byte {offset + err.start}): not UTF-8 (byte 0x{raw[err.start]:02x})"
        ) from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise InvalidInputError(f"input, line {lineno}: not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(obj, dict) or prompt_field not in obj:
        raise InvalidInputError(f"input, line {lineno}: expected an object with a {prompt_field!r} field")
    if require_id and "id" not in obj:
        raise InvalidInputError(f"input, line {lineno}: no 'id' field (each line needs one with --ray)")
    record_id = obj.get("id", lineno)
    if record_id is None or not _finite(record_id):
        raise InvalidInputError(f"input, line {lineno}: id {record_id!r} is not a finite JSON value")
    prompt = obj[prompt_field]
    if fields is None:
        return InputRecord(lineno, record_id, prompt, obj.get(teacher_field, prompt))
    own = {name: obj[f] for name, f in fields.own if f in obj} or None
    return InputRecord(
        lineno, record_id, prompt, obj.get(teacher_field, prompt), obj.get(fields.route), obj.get(fields.mix), own
    )


def check_input(
    path: str,
    prompt_field: str = "prompt",
    teacher_field: str = "teacher_prompt",
    done: np.ndarray | None = None,
    require_id: bool = False,
) -> tuple[int, int]:
    """Read the whole file once; return how many records it holds and how many of them
    are not among the sorted id hashes `done`. Raise `InvalidInputError` (with line
    numbers) for anything that would make the run's output ambiguous or unreadable,
    before anything else happens (with `require_id`, a line without an id too)."""
    hashes = array.array("Q")  # 8 bytes per line, not a Python int each
    for lineno, offset, raw in _lines(path):
        rec = _parse(lineno, offset, raw, prompt_field, teacher_field, require_id)
        if rec is not None:
            hashes.append(id_hash(rec.id))
    arr = np.frombuffer(hashes, dtype=np.uint64).copy()
    del hashes
    arr.sort()
    repeated = arr[1:][arr[1:] == arr[:-1]]
    if len(repeated):
        _report_duplicates(path, set(repeated.tolist()), prompt_field, teacher_field)
    remaining = len(arr) - int(np.isin(arr, done).sum()) if done is not None and len(done) else len(arr)
    return len(arr), remaining


def _report_duplicates(path: str, hashes: set[int], prompt_field: str, teacher_field: str) -> None:
    """Second pass, only when the first found repeated hashes: name the lines."""
    seen: dict[str, int] = {}
    dups: list[str] = []
    for lineno, offset, raw in _lines(path):
        rec = _parse(lineno, offset, raw, prompt_field, teacher_field)
        if rec is None or id_hash(rec.id) not in hashes:
            continue
        key = id_text(rec.id)
        if key in seen:
            dups.append(f"id {key} on lines {seen[key]} and {lineno}")
        else:
            seen[key] = lineno
    if dups:
        more = f" (and {len(dups) - 3} more)" if len(dups) > 3 else ""
        raise InvalidInputError(
            f"input: duplicate ids: {'; '.join(dups[:3])}{more}. Each record needs its own id "
            "(a line without one has its line number as id)"
        )


def read_input(
    path: str, prompt_field: str = "prompt", teacher_field: str = "teacher_prompt", fields: Fields | None = None
) -> Iterator[InputRecord]:
    """The records of a file that `check_input` accepted, read lazily (`fields`: also the
    teacher fields it names)."""
    for lineno, offset, raw in _lines(path):
        rec = _parse(lineno, offset, raw, prompt_field, teacher_field, fields=fields)
        if rec is not None:
            yield rec
