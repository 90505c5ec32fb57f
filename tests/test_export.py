"""`dualsample export`: each format read back the way its trainer reads it, and each refusal.

None of the trainers installs here within reason (each pulls torch and more), so each
export is checked against the exact contract read from the trainer's source:
- TRL (huggingface/trl@f2cd577): `trl/data_utils.py` `is_conversational`, and GOLD's
  `trl/experimental/gold/gold_trainer.py`, which takes the last assistant turn as the
  completion and the turns before it as the prompt.
- Axolotl (axolotl-ai-cloud/axolotl@067b021): `src/axolotl/integrations/kd/chat_template.py`
  (`load` = `ChatTemplateStrategyWithKDv2`: fields `messages`, `target_token_ids`,
  `logprobs`; rows cut to one k; each row exponentiated, renormalised, logged).
- slime (THUDM/slime@624b824): `slime/observability/rollout_data_utils.py`
  (`torch.load(...)["samples"]`, `Sample.from_dict`, the tensor dtypes of
  `tensorize_rollout_data_for_training`) and `slime/utils/types.py` (`Status` values,
  `_validate_response_metadata_lengths`).
- verl (verl-project/verl@1dda039): `verl/experimental/teacher_loop/teacher_manager.py`
  and `verl/workers/rollout/vllm_rollout/utils.py` (`teacher_ids` int32 and
  `teacher_logprobs` (len(prompt + response), k); row p is token p + 1's; last row 0s),
  read by `verl/trainer/distillation/losses.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from dualsample_rs import export as ex
from dualsample_rs.cli.parsing import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def record(i: int, n: int = 4, *, prompt: Any = None, topk: int | None = 3, exact: str = "rescore",
           finish: str = "stop") -> dict[str, Any]:  # fmt: skip
    """A record in the shape `GenerationOutput.to_record` writes, top-k as `--save-topk` writes it."""
    tokens = [10 + i + j for j in range(n)]
    r: dict[str, Any] = {
        "id": i,
        "prompt": prompt if prompt is not None else f"Question {i}?",
        "teacher_prompt": None,
        "text": f"answer {i}",
        "token_ids": tokens,
        "alpha": [0.5] * n,
        "logp_theta": [-1.0 - j for j in range(n)],
        "logp_t": [-0.5 - j for j in range(n)],
        "logq": [-0.7 - j for j in range(n)],
        "observed_theta": [True] * n,
        "observed_t": [exact == "exact"] * n,
        "fallback": [False] * n,
        "finish_reason": finish,
        "error": "boom" if finish == "error" else None,
        "diagnostics": {},
    }
    if exact == "rescore":
        r["logp_theta_exact"] = [-1.1 - j for j in range(n)]
        r["logp_t_exact"] = [-0.6 - j for j in range(n)]
    if topk is not None:
        # the sampled token first, then others; position 1 lists one fewer (never padded)
        r["topk_ids_t"] = [[t, t + 100, t + 200][: topk - (j == 1)] for j, t in enumerate(tokens)]
        r["topk_logp_t"] = [[-0.2, -2.0, -3.0][: topk - (j == 1)] for j in range(n)]
    return r


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_export(*argv: str) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "dualsample_rs", "export", *argv, "--quiet"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    return p.returncode, p.stderr


# ----------------------------------------------------------------------------- messages (TRL)


def is_conversational(example: dict[str, Any]) -> bool:
    """TRL's test, as `trl/data_utils.py` states it."""
    keys = [k for k in example if k in ("prompt", "chosen", "rejected", "completion", "messages")]
    if not keys:
        return False
    value = example[keys[0]]
    return isinstance(value, list) and isinstance(value[0], dict) and "role" in value[0]


def check_trl(rows: list[dict[str, Any]], records: list[dict[str, Any]]) -> None:
    for row, rec in zip(rows, records, strict=True):
        assert is_conversational(row)
        msgs = row["messages"]
        assert all(set(m) == {"role", "content"} for m in msgs)
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")  # GOLD's completion
        assert msgs[last]["content"] == rec["text"]
        assert msgs[:last] == [{"role": "user", "content": rec["prompt"]}]


@pytest.mark.slow
def test_messages_jsonl_and_parquet(tmp_path: Path) -> None:
    records = [record(0), record(1, finish="error"), record(2, finish="length")]
    src = write_jsonl(tmp_path / "r.jsonl", records)
    code, err = run_export("messages", str(src), str(tmp_path / "m.jsonl"))
    assert code == 0, err
    assert "skipped 1 failed records" in err
    kept = [records[0], records[2]]
    check_trl(read_jsonl(tmp_path / "m.jsonl"), kept)
    code, err = run_export("messages", str(src), str(tmp_path / "m.parquet"))
    assert code == 0, err
    table = pq.read_table(tmp_path / "m.parquet")
    check_trl(table.to_pylist(), kept)
    assert table.schema.field("messages").type == pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def test_the_user_turn_may_be_the_teachers_prompt(tmp_path: Path) -> None:
    records = [{**record(i), "teacher_prompt": f"Why {i}?"} for i in range(2)]
    src = write_jsonl(tmp_path / "r.jsonl", records)
    code, err = run_export("messages", str(src), str(tmp_path / "m.jsonl"), "--user-prompt", "teacher_prompt")
    assert code == 0, err
    rows = read_jsonl(tmp_path / "m.jsonl")
    assert [r["messages"][0] for r in rows] == [{"role": "user", "content": f"Why {i}?"} for i in range(2)]
    # a record without a teacher prompt of text is refused, in one line
    src = write_jsonl(tmp_path / "s.jsonl", [record(0)])
    code, err = run_export("messages", str(src), str(tmp_path / "n.jsonl"), "--user-prompt", "teacher_prompt")
    assert code == 2 and "teacher_prompt is missing" in err and len(err.strip().splitlines()) == 1


def test_parquet_input_file_and_directory(tmp_path: Path) -> None:
    """Records kept as Parquet (the `--output x.parquet` of a run) export the same."""
    records = [record(i) for i in range(600)]  # more than one batch
    # (an empty struct has no Parquet type: how a run keeps diagnostics is not read here)
    rows = [{k: v for k, v in r.items() if k != "diagnostics"} for r in records]
    (tmp_path / "d").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:300]), tmp_path / "d" / "a.parquet", row_group_size=100)
    pq.write_table(pa.Table.from_pylist(rows[300:]), tmp_path / "d" / "b.parquet", row_group_size=100)
    for src in (tmp_path / "d", tmp_path / "d" / "a.parquet"):
        out = tmp_path / "m.jsonl"
        assert run_export("messages", str(src), str(out))[0] == 0
        check_trl(read_jsonl(out), records[: 600 if src.is_dir() else 300])


# ----------------------------------------------------------------------------- axolotl-kd


def axolotl_v2_targets(row: dict[str, Any]) -> tuple[list[list[int]], list[list[float]]]:
    """What `ChatTemplateStrategyWithKDv2.transform_logprobs` makes of one row's fields:
    k from the rows' lengths (its mode rule), the log probabilities cut to k, each row
    exponentiated, renormalised and logged; the ids taken as they are."""
    logprobs, ids = row["logprobs"], row["target_token_ids"]
    lengths = [len(r) for r in logprobs if r]
    k = min(max(set(lengths), key=lengths.count), min(set(lengths), key=lengths.count))
    assert k > 0
    out = []
    for r in (r[:k] for r in logprobs):
        p = [math.exp(v) for v in r]
        s = sum(p)
        out.append([math.log(v / s) for v in p])
    return ids, out


def test_axolotl_kd(tmp_path: Path) -> None:
    records = [record(0), record(1, n=6), record(2, finish="error")]
    src = write_jsonl(tmp_path / "r.jsonl", records)
    code, err = run_export("axolotl-kd", str(src), str(tmp_path / "kd.jsonl"))
    assert code == 0, err
    rows = read_jsonl(tmp_path / "kd.jsonl")
    assert len(rows) == 2
    check_trl(rows, records[:2])  # the chat_template strategy's default field_messages
    for row, rec in zip(rows, records, strict=False):
        ids, logp = axolotl_v2_targets(row)
        n = len(rec["token_ids"])
        assert len(ids) == len(logp) == n  # one row per generated token
        # every row of a record has one k (the record's shortest), so the ids Axolotl
        # does not cut line up with the log probabilities it does
        assert {len(r) for r in ids} == {len(r) for r in logp} == {2}
        assert [r[0] for r in ids] == rec["token_ids"]
        assert row["logprobs"][0] == rec["topk_logp_t"][0][:2]  # raw: Axolotl renormalises
        assert all(math.isfinite(v) for r in logp for v in r)
        assert all(abs(sum(math.exp(v) for v in r) - 1) < 1e-9 for r in logp)


# ----------------------------------------------------------------------------- verl


def check_verl(path: Path, records: list[dict[str, Any]], prompts: list[list[int]], k: int, topk: bool) -> None:
    table = pq.read_table(path)
    schema = table.schema
    assert schema.field("teacher_ids").type == pa.list_(pa.list_(pa.int32()))
    assert schema.field("teacher_logprobs").type == pa.list_(pa.list_(pa.float32()))
    assert schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert schema.field("rollout_log_probs").type == pa.list_(pa.float32())
    rows = table.to_pylist()
    assert len(rows) == len(records)
    for row, rec, prompt in zip(rows, records, prompts, strict=True):
        n, p = len(rec["token_ids"]), len(prompt)
        assert row["prompt_ids"] == prompt and row["response_ids"] == rec["token_ids"]
        assert row["rollout_log_probs"] == pytest.approx(rec["logq"])
        # (len(prompt) + len(response), k), as teacher_manager asserts before padding
        assert len(row["teacher_ids"]) == len(row["teacher_logprobs"]) == p + n
        assert {len(r) for r in row["teacher_ids"]} == {len(r) for r in row["teacher_logprobs"]} == {k}
        assert row["teacher_ids"][-1] == [0] * k and row["teacher_logprobs"][-1] == [0.0] * k
        for i in range(n):  # row p holds token p + 1's distribution
            got_ids, got_logp = row["teacher_ids"][p - 1 + i], row["teacher_logprobs"][p - 1 + i]
            if topk:
                assert got_ids == rec["topk_ids_t"][i][:k]
                assert got_logp == pytest.approx(rec["topk_logp_t"][i][:k])
            else:
                assert got_ids == [rec["token_ids"][i]]
                assert got_logp == pytest.approx([rec["logp_t_exact"][i]])


@pytest.mark.slow
def test_verl_topk_and_token(tmp_path: Path) -> None:
    prompts = [[1, 2, 3], [4, 5]]
    records = [record(0, prompt=prompts[0]), record(1, prompt=prompts[1], finish="error"),
               record(2, prompt=prompts[1], n=3)]  # fmt: skip
    src = write_jsonl(tmp_path / "r.jsonl", records)
    code, err = run_export("verl", str(src), str(tmp_path / "v.parquet"))
    assert code == 0, err
    kept = [records[0], records[2]]
    check_verl(tmp_path / "v.parquet", kept, [prompts[0], prompts[1]], k=2, topk=True)
    code, err = run_export("verl", str(src), str(tmp_path / "v1.parquet"), "--teacher", "token")
    assert code == 0, err
    check_verl(tmp_path / "v1.parquet", kept, [prompts[0], prompts[1]], k=1, topk=False)


def test_verl_prompt_ids_from_the_base_server(tmp_path: Path, urls: tuple[str, str]) -> None:
    """Text prompts are tokenised on --theta-url as the run tokenised them."""
    import asyncio

    from dualsample_rs.backends.detect import open_backend
    from dualsample_rs.backends.http import Connection

    async def tokenize(text: str) -> list[int]:
        conn = Connection.open(urls[0])
        backend = await open_backend(conn, "auto")
        try:
            return await backend.tokenize(text)
        finally:
            await backend.aclose()
            await conn.close()

    records = [record(0), record(1)]
    src = write_jsonl(tmp_path / "r.jsonl", records)
    code, err = run_export("verl", str(src), str(tmp_path / "v.parquet"), "--theta-url", urls[0])
    assert code == 0, err
    prompts = [asyncio.run(tokenize(r["prompt"])) for r in records]
    check_verl(tmp_path / "v.parquet", records, prompts, k=2, topk=True)


# ----------------------------------------------------------------------------- slime


def check_slime_sample(s: dict[str, Any], rec: dict[str, Any], prompt: list[int]) -> None:
    """What `Sample.from_dict` and the training path take of one sample."""
    assert s["status"] in {"pending", "completed", "truncated", "aborted", "failed"}
    assert s["status"] == {"stop": "completed", "length": "truncated"}[rec["finish_reason"]]
    n = s["response_length"]
    assert n == len(rec["token_ids"]) and s["tokens"] == prompt + rec["token_ids"]
    assert len(s["loss_mask"]) == len(s["rollout_log_probs"]) == len(s["teacher_log_probs"]) == n
    assert s["rollout_log_probs"] == rec["logq"]
    assert s["teacher_log_probs"] == (rec.get("logp_t_exact") or rec["logp_t"])
    assert s["response"] == rec["text"] and isinstance(s["reward"], float)


def test_slime_samples(tmp_path: Path) -> None:
    """The sample dicts, checked without torch (what `make test` has)."""
    recs = [record(0, prompt=[7, 8]), record(1, prompt=[9], exact="exact", finish="length")]
    ctx = ex.Context()
    for rec, prompt in zip(recs, [[7, 8], [9]], strict=True):
        check_slime_sample(ex.slime_sample("line 1", rec, ctx), rec, prompt)


def test_slime_pt_read_back_as_slime_does(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch", reason="the slime extra (torch) is not installed")
    recs = [record(i, prompt=[7, i]) for i in range(5)] + [record(9, finish="error")]
    src = write_jsonl(tmp_path / "r.jsonl", recs)
    code, err = run_export("slime", str(src), str(tmp_path / "data_{rollout_id}.pt"), "--samples-per-file", "2")
    assert code == 0, err
    files = sorted(tmp_path.glob("data_*.pt"))
    assert [f.name for f in files] == ["data_0.pt", "data_1.pt", "data_2.pt"]
    got = []
    for rid, f in enumerate(files):
        data = torch.load(str(tmp_path / "data_{rollout_id}.pt").format(rollout_id=rid), weights_only=False)
        assert data["rollout_id"] == rid
        got += data["samples"]
        # plain Python values only: loads under the default weights_only=True as well
        assert torch.load(f, weights_only=True) == data
    for s, rec in zip(got, recs[:5], strict=True):
        check_slime_sample(s, rec, [7, rec["id"]])
        torch.as_tensor(s["tokens"], dtype=torch.long)  # tensorize_rollout_data_for_training
        torch.as_tensor(s["teacher_log_probs"], dtype=torch.float32)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("fmt", "rec", "extra", "says"),
    [
        ("axolotl-kd", record(0, topk=None), [], "the run needed --save-topk N"),
        ("verl", record(0, prompt=[1], topk=None), [], "the run needed --save-topk N"),
        ("verl", record(0, prompt=[1], exact="none"), ["--teacher", "token"], "needed --rescore or --scoring exact"),
        ("slime", record(0, prompt=[1], exact="none"), [], "needed --rescore or --scoring exact"),
        ("slime", record(0), [], "pass --theta-url"),
        ("verl", record(0), [], "pass --theta-url"),
        ("verl", record(0, prompt=[1]), ["--topk", "3"], "fewer than --topk 3"),
        ("messages", record(0, prompt=[1, 2]), [], "needs text prompts"),
    ],
)
def test_refusals(tmp_path: Path, fmt: str, rec: dict[str, Any], extra: list[str], says: str) -> None:
    src = write_jsonl(tmp_path / "r.jsonl", [rec])
    out = tmp_path / ("o.parquet" if fmt == "verl" else "o.pt" if fmt == "slime" else "o.jsonl")
    code, err = run_export(fmt, str(src), str(out), *extra)
    assert code == 2
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_bad_input_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "r.jsonl").write_text(json.dumps(record(0)) + "\n[1]\n")
    assert main(["export", "messages", str(tmp_path / "r.jsonl"), str(tmp_path / "o.jsonl"), "--quiet"]) == 2
    assert "line 2: not a JSON object" in capsys.readouterr().err


# ----------------------------------------------------------------------------- from a real run


@pytest.mark.slow
def test_a_run_with_save_topk_exports_the_same_from_jsonl_and_parquet(urls: tuple[str, str], tmp_path: Path) -> None:
    """End to end: `generate --save-topk` on the reference servers, kept as JSONL and as
    Parquet, exports the same Axolotl KD rows, whose targets are the run's saved lists."""
    from support import write_input

    inp = tmp_path / "in.jsonl"
    write_input(inp, 6)
    rows = {}
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"run.{suffix}"
        done = subprocess.run(
            [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
             "--input", str(inp), "--output", str(out), "--max-tokens", "8", "--seed", "3", "--quiet",
             "--top-k", "6", "--save-topk", "4"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        kd = tmp_path / f"kd-{suffix}.jsonl"
        assert run_export("axolotl-kd", str(out), str(kd))[0] == 0
        rows[suffix] = sorted(read_jsonl(kd), key=lambda r: json.dumps(r["messages"]))
    assert rows["jsonl"] == rows["parquet"] and len(rows["jsonl"]) == 6
    records = {json.dumps(r["prompt"]): r for r in read_jsonl(tmp_path / "run.jsonl")}
    for row in rows["jsonl"]:
        saved = records[json.dumps(row["messages"][0]["content"])]
        k = min(len(ids) for ids in saved["topk_ids_t"])
        assert row["target_token_ids"] == [ids[:k] for ids in saved["topk_ids_t"]]
    # The records keep the base's prompt ids: verl needs no server to tokenise them, and
    # they are the ids the base server gives the prompt.
    rec = next(iter(records.values()))
    ask = urllib.request.Request(f"{urls[0]}/tokenize", json.dumps({"prompt": rec["prompt"]}).encode(),
                                 {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(ask, timeout=30) as reply:
        assert json.loads(reply.read())["tokens"] == rec["prompt_token_ids"]
    for suffix in ("jsonl", "parquet"):
        code, err = run_export("verl", str(tmp_path / f"run.{suffix}"), str(tmp_path / f"verl-{suffix}.parquet"))
        assert code == 0, err
        got = pq.read_table(tmp_path / f"verl-{suffix}.parquet").to_pylist()
        assert sorted(r["prompt_ids"] for r in got) == sorted(r["prompt_token_ids"] for r in records.values())
