"""`dualsample export FORMAT INPUT OUTPUT`: records in the format each trainer reads.

The records file (JSONL, or Parquet: one file or a directory of them) is streamed, so
memory stays flat in the number of records (except for one slime ``.pt``, which is one
pickle: give OUTPUT a ``{rollout_id}`` to write it in files of ``--samples-per-file``).
Failed records (``finish_reason == "error"``) are skipped and counted on stderr. A
record that lacks what the format needs stops the export with one line naming the
record and the flag the run needed.

What each format is, from the trainers' own sources:

- ``messages`` (TRL's SFT, GKD and GOLD trainers): ``messages`` = the prompt as the
  user's turn and the sampled text as the assistant's (TRL's ``is_conversational``; GOLD
  takes the last assistant turn as the completion). JSONL, or Parquet for ``*.parquet``.
- ``axolotl-kd`` (``type: axolotl.integrations.kd.chat_template``, whose ``load`` is the
  v2 strategy): ``messages`` as above, ``target_token_ids`` and ``logprobs`` (the
  default ``logprobs_field``), one row per generated token: the teacher's top-k ids,
  most likely first, and their raw log probabilities (Axolotl renormalises each row).
  Every row of a record is cut to the record's shortest, as Axolotl cuts the log
  probabilities (it would not cut the ids). Axolotl aligns the rows to the end of the
  conversation it tokenises, so tokens its chat template adds after the answer shift
  them: see the README.
- ``slime`` (``--load-debug-rollout-data``: ``torch.load(path)["samples"]`` and
  ``Sample.from_dict`` each): ``tokens`` = prompt ids + generated ids,
  ``response_length``, ``loss_mask`` (ones), ``rollout_log_probs`` = log q*,
  ``teacher_log_probs`` = the teacher's exact log probability of each token, ``status``
  (``completed`` for a stop, ``truncated`` for the length limit). ``reward`` is 0.0, as
  slime's own on-policy distillation sets it. Needs torch (the ``slime`` extra).
- ``verl`` (Parquet): ``prompt_ids``, ``response_ids``, ``rollout_log_probs`` = log q*,
  and ``teacher_ids`` / ``teacher_logprobs`` as verl's teacher loop hands them to its
  distillation loss: one row per token of prompt + response, row p being the teacher's
  top-k of token p + 1 (so the last row, and the prompt's rows, which the run did not
  keep, are verl's padding: id 0, log probability 0.0, outside the response mask).
  ``--teacher token`` gives instead k = 1 rows with the sampled token's exact teacher
  log probability (verl's single-sample KL estimators).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Protocol

from .exceptions import DualSampleError, InvalidInputError
from .io.input_file import id_text
from .io.records import read_records

FORMATS = ("axolotl-kd", "slime", "verl", "messages")
#: Which of a record's prompts a conversation's user turn is.
USER_PROMPTS = ("prompt", "teacher_prompt")
ROLLOUT_ID = "{rollout_id}"
#: Records read from Parquet per batch, and rows per row group written.
BATCH = 256


class ExportRefused(InvalidInputError):
    """The records lack a value the format needs (the message names the flag)."""


# ----------------------------------------------------------------------------- reading


def _pyarrow_parquet(what: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DualSampleError(f"{what} needs pyarrow: pip install 'dualsample_rs[export]'") from None
    return pq


# ----------------------------------------------------------------------------- values


def _tokens(where: str, record: dict[str, Any]) -> list[int]:
    ids = record.get("token_ids")
    if not isinstance(ids, list):
        raise InvalidInputError(f"input: {where}: no token_ids list (is this a records file?)")
    return ids


def _per_token(where: str, record: dict[str, Any], key: str, n: int) -> list[Any]:
    values = record.get(key)
    if not isinstance(values, list) or len(values) != n:
        raise InvalidInputError(f"input: {where}: {key} is not a list of {n} values, one per token")
    return values


def exact_logp(where: str, record: dict[str, Any], model: str) -> list[float]:
    """The model's exact log probability of each token (`model` is ``"t"`` or
    ``"theta"``): the rescored values, else the raw ones when every one was observed."""
    n = len(_tokens(where, record))
    rescored = record.get(f"logp_{model}_exact")
    if rescored is not None:
        return [float(v) for v in _per_token(where, record, f"logp_{model}_exact", n)]
    observed = _per_token(where, record, f"observed_{model}", n)
    if not all(observed):
        raise ExportRefused(
            f"input: {where}: logp_{model} is an estimate at some positions and there is no logp_{model}_exact: "
            "the run needed --rescore or --scoring exact"
        )
    return [float(v) for v in _per_token(where, record, f"logp_{model}", n)]


def teacher_topk(where: str, record: dict[str, Any]) -> tuple[list[list[int]], list[list[float]]]:
    """The teacher's top-k ids and raw log probabilities at each generated position."""
    if record.get("topk_ids_t") is None:
        raise ExportRefused(f"input: {where}: no teacher top-k (topk_ids_t): the run needed --save-topk N")
    n = len(_tokens(where, record))
    ids = _per_token(where, record, "topk_ids_t", n)
    logp = _per_token(where, record, "topk_logp_t", n)
    for i, (a, b) in enumerate(zip(ids, logp, strict=True)):
        if len(a) != len(b):
            raise InvalidInputError(f"input: {where}: topk_ids_t and topk_logp_t differ in length at position {i}")
    return ids, logp


def messages(where: str, record: dict[str, Any], user: str = "prompt") -> list[dict[str, str]]:
    """The record's `user` prompt (``prompt``, the base's, or ``teacher_prompt``) as the
    user's turn, the sampled text as the assistant's."""
    prompt = record.get(user)
    if not isinstance(prompt, str):
        raise ExportRefused(
            f"input: {where}: the {user} is {'missing' if prompt is None else 'token ids'}, not text: "
            "a conversation needs text prompts"
        )
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record.get("text", ""))}]


# ----------------------------------------------------------------------------- formats


def messages_row(where: str, record: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return {"id": ctx.id_value(record), "messages": messages(where, record, ctx.user)}


def axolotl_row(where: str, record: dict[str, Any], ctx: Context) -> dict[str, Any]:
    ids, logp = teacher_topk(where, record)
    k = min((len(r) for r in ids), default=0)
    if k == 0:
        raise ExportRefused(f"input: {where}: a position has no teacher top-k entry (the server listed none)")
    return {
        "id": ctx.id_value(record),
        "messages": messages(where, record, ctx.user),
        "target_token_ids": [[int(t) for t in r[:k]] for r in ids],
        "logprobs": [[float(v) for v in r[:k]] for r in logp],
    }


def slime_sample(where: str, record: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A dict `Sample.from_dict` takes (the keys of `Sample.to_dict` the run has values for)."""
    response = _tokens(where, record)
    n = len(response)
    prompt_ids = ctx.prompt_ids(where, record)
    status = {"stop": "completed", "length": "truncated"}.get(record.get("finish_reason") or "", "completed")
    index = ctx.written
    return {
        "group_index": index,
        "index": index,
        "prompt": record.get("prompt") if isinstance(record.get("prompt"), str) else "",
        "tokens": prompt_ids + [int(t) for t in response],
        "response": str(record.get("text", "")),
        "response_length": n,
        "reward": 0.0,
        "loss_mask": [1] * n,
        "rollout_log_probs": [float(v) for v in _per_token(where, record, "logq", n)],
        "teacher_log_probs": exact_logp(where, record, "t"),
        "status": status,
        "metadata": {"id": record.get("id")},
    }


def verl_row(where: str, record: dict[str, Any], ctx: Context) -> dict[str, Any]:
    response = [int(t) for t in _tokens(where, record)]
    n = len(response)
    prompt_ids = ctx.prompt_ids(where, record)
    if ctx.teacher == "token":
        rows_ids = [[t] for t in response]
        rows_logp = [[v] for v in exact_logp(where, record, "t")]
        k = 1
    else:
        ids, logp = teacher_topk(where, record)
        k = ctx.topk if ctx.topk is not None else min((len(r) for r in ids), default=0)
        if k == 0:
            raise ExportRefused(f"input: {where}: a position has no teacher top-k entry (the server listed none)")
        short = next((i for i, r in enumerate(ids) if len(r) < k), None)
        if short is not None:
            raise ExportRefused(
                f"input: {where}: position {short} has {len(ids[short])} teacher top-k entries, "
                f"fewer than --topk {k}: pass a smaller --topk"
            )
        ctx.topk = k  # every row of the file has the same k, as verl's tensors do
        rows_ids = [[int(t) for t in r[:k]] for r in ids]
        rows_logp = [[float(v) for v in r[:k]] for r in logp]
    # Row p is the teacher's top-k of token p + 1: the prompt's last row holds the first
    # generated token's; the rows before it and the very last row are verl's padding.
    pad_ids, pad_logp = [[0] * k], [[0.0] * k]
    return {
        "id": id_text(record.get("id")),
        "prompt_ids": prompt_ids,
        "response_ids": response,
        "rollout_log_probs": [float(v) for v in _per_token(where, record, "logq", n)],
        "teacher_ids": pad_ids * (len(prompt_ids) - 1) + rows_ids + pad_ids,
        "teacher_logprobs": pad_logp * (len(prompt_ids) - 1) + rows_logp + pad_logp,
    }


# ----------------------------------------------------------------------------- writing


class Sink(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    def __init__(self, path: str) -> None:
        self.f = open(path, "w", encoding="utf-8")  # closed by close()

    def write(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row, ensure_ascii=False, allow_nan=True) + "\n")

    def close(self) -> None:
        self.f.close()


class ParquetSink:
    """Rows written a row group at a time, so memory holds one group."""

    def __init__(self, path: str, schema: Any = None) -> None:
        self.pq = _pyarrow_parquet("Parquet output")
        import pyarrow as pa

        self.pa, self.path, self.schema = pa, path, schema
        self.rows: list[dict[str, Any]] = []
        self.writer: Any = None

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        table = self.pa.Table.from_pylist(self.rows, schema=self.schema)
        if self.writer is None:
            self.schema = table.schema
            self.writer = self.pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table)
        self.rows = []

    def close(self) -> None:
        if self.rows or self.writer is None:
            self._flush()
        self.writer.close()


def verl_schema() -> Any:
    import pyarrow as pa

    return pa.schema(
        [
            ("id", pa.string()),
            ("prompt_ids", pa.list_(pa.int32())),
            ("response_ids", pa.list_(pa.int32())),
            ("rollout_log_probs", pa.list_(pa.float32())),
            ("teacher_ids", pa.list_(pa.list_(pa.int32()))),
            ("teacher_logprobs", pa.list_(pa.list_(pa.float32()))),
        ]
    )


class SlimeSink:
    """Samples into ``{"rollout_id": r, "samples": [...]}`` files with ``torch.save``: one
    file, or with ``{rollout_id}`` in the path one per `per_file` samples."""

    def __init__(self, path: str, per_file: int) -> None:
        try:
            import torch
        except ImportError:
            raise DualSampleError("the slime format writes a torch .pt: pip install 'dualsample_rs[slime]'") from None
        self.torch, self.path, self.per_file = torch, path, per_file
        self.split = ROLLOUT_ID in path
        self.samples: list[dict[str, Any]] = []
        self.rollout = 0

    def write(self, row: dict[str, Any]) -> None:
        self.samples.append(row)
        if self.split and len(self.samples) >= self.per_file:
            self._save()

    def _save(self) -> None:
        path = self.path.replace(ROLLOUT_ID, str(self.rollout)) if self.split else self.path
        self.torch.save({"rollout_id": self.rollout, "samples": self.samples}, path)
        self.rollout += 1
        self.samples = []

    def close(self) -> None:
        if self.samples or self.rollout == 0:
            self._save()


# ----------------------------------------------------------------------------- the run


@dataclass
class Context:
    """What every record's conversion shares: the tokeniser, the k, the counts."""

    backend: Any = None
    teacher: str = "topk"
    topk: int | None = None
    json_ids: bool = True
    #: the record's prompt that is the user's turn of a conversation
    user: str = "prompt"
    written: int = 0
    pending: dict[int, list[int]] = field(default_factory=dict)

    def id_value(self, record: dict[str, Any]) -> Any:
        return record.get("id") if self.json_ids else id_text(record.get("id"))

    def prompt_ids(self, where: str, record: dict[str, Any]) -> list[int]:
        """The base's prompt ids: as the run's record keeps them, given as ids, or (records
        of earlier versions) tokenised on --theta-url."""
        kept = record.get("prompt_token_ids")
        if isinstance(kept, list):
            return [int(t) for t in kept]
        prompt = record.get("prompt")
        if isinstance(prompt, list):
            return [int(t) for t in prompt]
        ids = self.pending.get(id(record))
        if ids is None:
            raise ExportRefused(
                f"input: {where}: the prompt is text and this format needs its token ids: "
                "pass --theta-url (the base server of the run) to tokenise it as the run did"
            )
        return ids


CONVERT = {"messages": messages_row, "axolotl-kd": axolotl_row, "slime": slime_sample, "verl": verl_row}
NEEDS_PROMPT_IDS = {"slime", "verl"}


def _sink(fmt: str, output: str, path: str, per_file: int) -> Sink:
    """The writer of `output`'s format, writing to `path` (renamed to `output` at the end)."""
    if fmt == "slime":
        return SlimeSink(path, per_file)
    if fmt == "verl":
        return ParquetSink(path, verl_schema())
    return ParquetSink(path) if output.endswith(".parquet") else JsonlSink(path)


async def export(
    fmt: str,
    input_path: str,
    output: str,
    *,
    theta_url: str | None = None,
    teacher: str = "topk",
    topk: int | None = None,
    per_file: int = 256,
    user_prompt: str = "prompt",
    progress: bool = False,
) -> dict[str, int]:
    """Write `input_path`'s records to `output` in format `fmt` (see the module's doc).

    Returns:
        ``{"written": n, "skipped_failed": m}``.

    Raises:
        InvalidInputError: a bad argument or record (`ExportRefused` when a record lacks
            what `fmt` needs; the message names the flag the run needed).
    """
    if fmt not in CONVERT:
        raise InvalidInputError(f"format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if topk is not None and topk < 1:
        raise InvalidInputError(f"topk: must be at least 1, got {topk}")
    if per_file < 1:
        raise InvalidInputError(f"samples_per_file: must be at least 1, got {per_file}")
    if user_prompt not in USER_PROMPTS:
        raise InvalidInputError(f"user_prompt: expected one of {', '.join(USER_PROMPTS)}, got {user_prompt!r}")
    if fmt == "verl" and not output.endswith(".parquet"):
        raise InvalidInputError(f"output: verl reads Parquet: name the output *.parquet, got {output}")
    convert = CONVERT[fmt]
    ctx = Context(teacher=teacher, topk=topk, json_ids=not output.endswith(".parquet"), user=user_prompt)
    connection = None
    if theta_url is not None and fmt in NEEDS_PROMPT_IDS:
        from .backends.detect import open_backend
        from .backends.http import Connection

        connection = Connection.open(theta_url)
        ctx.backend = await open_backend(connection, "auto")
    skipped = 0
    records = read_records(input_path)
    bar = _progress(progress)
    sink: Sink | None = None
    tmp = output + ".partial" if ROLLOUT_ID not in output else output
    try:
        while True:
            batch = [r for _, r in zip(range(BATCH), records, strict=False)]
            if not batch:
                break
            failed = [r for _, r in batch if r.get("finish_reason") == "error"]
            skipped += len(failed)
            kept = [(w, r) for w, r in batch if r.get("finish_reason") != "error"]
            if ctx.backend is not None:
                await _tokenise(ctx, kept)
            for where, record in kept:
                row = convert(where, record, ctx)
                if sink is None:
                    sink = _sink(fmt, output, tmp, per_file)
                sink.write(row)
                ctx.written += 1
            ctx.pending.clear()
            bar.update(len(batch))
        if sink is None:
            sink = _sink(fmt, output, tmp, per_file)
        sink.close()
        if tmp != output:
            os.replace(tmp, output)  # a refused or interrupted export leaves no half file under OUTPUT
    finally:
        bar.close()
        if tmp != output and os.path.exists(tmp):
            os.remove(tmp)
        if ctx.backend is not None:
            await ctx.backend.aclose()
        if connection is not None:
            await connection.close()
    return {"written": ctx.written, "skipped_failed": skipped}


async def _tokenise(ctx: Context, kept: list[tuple[str, dict[str, Any]]]) -> None:
    """The text prompts of a batch tokenised on the base server, as the run did
    (``tokenize(prompt)``, the server's special tokens added), a batch at once."""
    texts = [r for _, r in kept if isinstance(r.get("prompt"), str) and r.get("prompt_token_ids") is None]
    got = await asyncio.gather(*(ctx.backend.tokenize(r["prompt"]) for r in texts))
    ctx.pending = {id(r): list(ids) for r, ids in zip(texts, got, strict=True)}


def _progress(show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(unit="rec", disable=None if show else True, dynamic_ncols=True, smoothing=0.1)


# ----------------------------------------------------------------------------- the command line


def add_parser(sub: Any) -> None:
    """``dualsample export``'s flags."""
    p = sub.add_parser("export", help="write a records file in a trainer's format")
    p.add_argument("format", choices=FORMATS, help="the trainer's format")
    p.add_argument("input", help="records: JSONL, a .parquet file or a directory of them")
    p.add_argument("output", help="JSONL or *.parquet (verl: *.parquet; slime: a .pt, or a path with {rollout_id})")
    p.add_argument("--theta-url", help="slime, verl: the run's base server, to tokenise text prompts as the run did")
    p.add_argument("--teacher", choices=("topk", "token"), default="topk",
                   help="verl: teacher top-k (needs --save-topk) or the sampled token's exact logprob")  # fmt: skip
    p.add_argument("--topk", type=int, default=None,
                   help="verl: entries per position (default: the first record's fewest)")  # fmt: skip
    p.add_argument("--samples-per-file", type=int, default=256, help="slime with {rollout_id}: samples per file")
    p.add_argument("--user-prompt", choices=USER_PROMPTS, default="prompt",
                   help="messages, axolotl-kd: the record's prompt that is the user's turn (teacher_prompt: the "
                        "question the teacher was asked, e.g. with --teacher-chat)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run ``dualsample export``; errors are the caller's to print (exit 2)."""
    counts = asyncio.run(
        export(
            args.format,
            args.input,
            args.output,
            theta_url=args.theta_url,
            teacher=args.teacher,
            topk=args.topk,
            per_file=args.samples_per_file,
            user_prompt=args.user_prompt,
            progress=not args.quiet,
        )
    )
    if counts["skipped_failed"]:
        print(f"dualsample export: skipped {counts['skipped_failed']} failed records (finish_reason error)",
              file=sys.stderr)  # fmt: skip
    print(f"dualsample export: wrote {counts['written']} records to {args.output}", file=sys.stderr)
    return 0


__all__ = ["FORMATS", "ExportRefused", "add_parser", "export", "read_records", "run"]
