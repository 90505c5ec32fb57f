"""The output file: one JSON record per line, safe to resume after a crash.

A record is written with one ``write`` and flushed as its sequence finishes, so a run
killed mid-write leaves at most one partial last line. Resuming drops only that torn
last line; any other line that is not a record stops the run with its line number and
leaves the file as it was. Failed records are removed (``--retry-errors``) only once the
servers are known to be up, by writing a new file beside the old one and renaming it
over, so a crash at any moment leaves either the old file or the new one.

A run holds an exclusive lock on ``<output>.lock`` for its whole life, so two runs
cannot append to the same output.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

from ..exceptions import DualSampleError, InvalidInputError
from .input_file import id_hash


class OutputLockedError(DualSampleError):
    """Another run holds the output file."""


class OutputLock:
    """An exclusive, non-blocking ``flock`` on ``<path>.lock``, which records who holds it."""

    def __init__(self, path: str) -> None:
        self.path = path + ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise InvalidInputError(
                    f"output: cannot create the lock file {self.path} next to it: {err.strerror}"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputLockedError(
                        f"output: {self.path[:-5]} is being written by another run ({holder}); "
                        "wait for it to finish or stop it"
                    ) from None
                raise
            # The holder before us may have removed the file after we opened it: then our
            # lock is on a file nobody else will see, so start again on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(
            fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode()
        )
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class ExistingOutput:
    """What a resumed run finds in its output file.

    Attributes:
        done: sorted 64-bit hashes of the ids of records to keep (see ``id_hash``).
        records: how many complete records the file holds.
        failed: how many of them failed (``finish_reason: "error"``).
        complete_bytes: the length of the file up to the end of its last complete line.
        size: the file's length (larger than ``complete_bytes`` when the last line is torn).
    """

    done: np.ndarray
    records: int
    failed: int
    complete_bytes: int
    size: int

    def is_done(self, record_id: Any) -> bool:
        h = np.uint64(id_hash(record_id))
        i = int(np.searchsorted(self.done, h))
        return i < len(self.done) and self.done[i] == h


def _is_failed(record: dict[str, Any]) -> bool:
    return record.get("finish_reason") == "error"


def scan_output(path: str, retry_errors: bool = False) -> ExistingOutput:
    """Read an existing output without changing it. With `retry_errors`, failed records
    do not count as done. Raises `InvalidInputError` for a broken line that is not the
    torn last one."""
    hashes = array.array("Q")
    records = failed = complete = 0
    if not os.path.exists(path):
        return ExistingOutput(np.zeros(0, dtype=np.uint64), 0, 0, 0, 0)
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                break  # the torn last line of a killed run
            try:
                record = json.loads(raw)
                if not isinstance(record, dict) or "id" not in record:
                    raise ValueError("no id")
                key = id_hash(record["id"])
            except (ValueError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise InvalidInputError(
                    f"output, line {lineno}: not a record ({err}); only a torn last line is dropped on --resume. "
                    f"Repair or remove line {lineno} of {path}; nothing was changed"
                ) from None
            complete += len(raw)
            records += 1
            if _is_failed(record):
                failed += 1
                if retry_errors:
                    continue
            hashes.append(key)
        size = f.seek(0, os.SEEK_END)
    done = np.frombuffer(hashes, dtype=np.uint64).copy()
    done.sort()
    return ExistingOutput(done, records, failed, complete, size)


def fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prepare_resume(path: str, existing: ExistingOutput, retry_errors: bool) -> None:
    """Make the file ready for appending: drop a torn last line and, with
    `retry_errors`, the failed records (through a new file renamed over the old one)."""
    if retry_errors and existing.failed:
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                left = existing.complete_bytes
                for raw in src:
                    if left <= 0:
                        break
                    left -= len(raw)
                    if not _is_failed(json.loads(raw)):
                        dst.write(raw)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        fsync_dir(path)
    elif existing.complete_bytes < existing.size:
        with open(path, "r+b") as f:
            f.truncate(existing.complete_bytes)


def record_line(record: dict[str, Any]) -> bytes:
    """One record as a line of UTF-8 JSON. A string that cannot be UTF-8 (a lone
    surrogate in a prompt) is written escaped, as JSON allows, instead of failing."""
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError:
        return (json.dumps(record, ensure_ascii=True) + "\n").encode("ascii")


class RecordWriter:
    """Appends one JSON record per line, each with one write, flushed at once."""

    def __init__(self, path: str, *, append: bool) -> None:
        # Unbuffered: each record goes to the file in one write call, nothing is held back.
        self._f: IO[bytes] = open(path, "ab" if append else "wb", buffering=0)

    def write(self, record: dict[str, Any]) -> None:
        data = memoryview(record_line(record))
        while data:
            data = data[self._f.write(data) or 0 :]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
