"""`dualsample generate --output x.parquet` without Ray: a real Parquet file with typed
columns that pyarrow, polars and datasets load, written in row groups that survive a
kill, resumed to the same records as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import QUESTIONS, generate_cli, read_records, wait_cli, write_input

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from dualsample_rs.io.parquet_file import (  # noqa: E402
    ParquetRecordWriter,
    id_kind,
    iter_records,
    record_schema,
)

ROWS = {"DUALSAMPLE_PARQUET_ROWS": "10"}  # many small row groups, so a kill lands between them


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def _cli(
    urls: tuple[str, str], inp: Path, out: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    if env is None:
        return generate_cli(urls, inp, out, *extra)
    cmd = [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
           "--input", str(inp), "--output", str(out), "--max-tokens", "25", "--seed", "11", "--quiet",
           *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _rows(path: Path) -> int:
    """Rows in the file's footer so far (0 while it is being written)."""
    try:
        return pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowInvalid):
        return 0


def _same(records: list[dict]) -> dict:
    """Records keyed by id, as JSON text (NaN in diagnostics compares equal that way)."""
    return {json.dumps(r["id"]): json.dumps(r, sort_keys=True) for r in records}


@pytest.mark.slow
def test_the_file_loads_with_natural_types_in_pyarrow_polars_and_datasets(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    pl = pytest.importorskip("polars")
    datasets = pytest.importorskip("datasets")
    inp, jsonl, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.parquet"
    write_input(inp, 12)
    flags = ("--diagnostics", "--rescore", "--max-tokens", "8")
    for path in (jsonl, out):
        code, err = wait_cli(generate_cli(urls, inp, path, *flags))
        assert code == 0, err
    assert out.read_bytes()[:4] == b"PAR1" and not Path(f"{out}.rowgroups").exists()
    assert _same(list(iter_records(str(out)))) == _same(read_records(jsonl))

    lf, ld, lb = pa.list_(pa.float64()), pa.list_(pa.int64()), pa.list_(pa.bool_())
    expected = {"id": pa.string(), "prompt": pa.string(), "teacher_prompt": pa.string(), "text": pa.string(),
                "token_ids": ld, "alpha": lf, "logp_theta": lf, "logp_t": lf, "logq": lf, "observed_theta": lb,
                "observed_t": lb, "fallback": lb, "finish_reason": pa.string(), "error": pa.string(),
                "logp_theta_exact": lf, "logp_t_exact": lf}  # fmt: skip
    table = pq.read_table(out)
    assert table.num_rows == 12
    for name, kind in expected.items():
        assert table.schema.field(name).type == kind, name
    diag = table.schema.field("diagnostics").type
    assert pa.types.is_struct(diag) and diag.field("kl_t").type.field("mean").type == pa.float64()
    assert "round" not in table.schema.names and "topk_ids_t" not in table.schema.names

    df = pl.read_parquet(out)
    pl_types = {"id": pl.String, "text": pl.String, "token_ids": pl.List(pl.Int64), "alpha": pl.List(pl.Float64),
                "logq": pl.List(pl.Float64), "observed_t": pl.List(pl.Boolean), "fallback": pl.List(pl.Boolean),
                "finish_reason": pl.String, "error": pl.String, "logp_t_exact": pl.List(pl.Float64)}  # fmt: skip
    for name, kind in pl_types.items():
        assert df.schema[name] == kind, name
    assert isinstance(df.schema["diagnostics"], pl.Struct)
    assert df["token_ids"].list.len().to_list() == df["logq"].list.len().to_list()

    ds = datasets.load_dataset("parquet", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    f = ds.features
    assert f["id"] == datasets.Value("string") and f["error"] == datasets.Value("string")
    assert f["token_ids"] == datasets.List(datasets.Value("int64"))
    for name in ("alpha", "logp_theta", "logp_t", "logq", "logp_t_exact"):
        assert f[name] == datasets.List(datasets.Value("float64")), name
    for name in ("observed_theta", "observed_t", "fallback"):
        assert f[name] == datasets.List(datasets.Value("bool")), name
    assert f["diagnostics"]["kl_t"]["mean"] == datasets.Value("float64")
    row = ds[0]
    assert isinstance(row["token_ids"][0], int) and isinstance(row["logq"][0], float)


def test_ids_keep_their_type(urls: tuple[str, str], tmp_path: Path) -> None:
    assert id_kind([1, 2, 3]) == "int" and id_kind(["a", "b"]) == "string"
    assert id_kind([1, "1"]) == "json" and id_kind([1.5]) == "json" and id_kind([True]) == "json"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    inp.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in QUESTIONS[:3]))  # ids: the line numbers
    code, err = wait_cli(generate_cli(urls, inp, out, "--max-tokens", "3"))
    assert code == 0, err
    assert pq.read_schema(out).field("id").type == pa.int64()
    assert sorted(r["id"] for r in iter_records(str(out))) == [1, 2, 3]
    inp.write_text(json.dumps({"id": 1, "prompt": "a"}) + "\n" + json.dumps({"id": "1", "prompt": "b"}) + "\n")
    code, err = wait_cli(generate_cli(urls, inp, out, "--max-tokens", "3", "--overwrite"))
    assert code == 0, err
    assert sorted(pq.read_table(out).column("id").to_pylist()) == ['"1"', "1"]  # the ids' JSON text
    assert sorted((r["id"] for r in iter_records(str(out))), key=str) == [1, "1"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_killed_run_resumes_to_the_records_of_an_uninterrupted_one(
    urls: tuple[str, str], tmp_path: Path, sig: signal.Signals
) -> None:
    inp, full, part = tmp_path / "in.jsonl", tmp_path / "full.parquet", tmp_path / "part.parquet"
    journal = Path(f"{part}.rowgroups")
    write_input(inp, 300)
    code, err = wait_cli(_cli(urls, inp, full, "--max-concurrency", "4", env=_env(**ROWS)))
    assert code == 0, err
    assert pq.read_metadata(full).num_row_groups == 30
    p = _cli(urls, inp, part, "--max-concurrency", "2", env=_env(**ROWS))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and _rows(part) < 20:
        time.sleep(0.01)
    p.send_signal(sig)
    code, err = wait_cli(p)
    assert code == (-sig if sig == signal.SIGKILL else 128 + sig), err
    assert "Traceback" not in err
    if sig == signal.SIGTERM:  # the open row group was written, the footer is final
        assert not journal.exists() and 10 <= pq.read_metadata(part).num_rows < 300
    kept = list(iter_records(str(part)))  # readable after the kill, from the journal if need be
    assert 10 <= len(kept) < 300
    code, err = wait_cli(_cli(urls, inp, part, "--resume", "--max-concurrency", "3", env=_env(**ROWS)))
    assert code == 0, err
    assert not journal.exists() and not Path(f"{part}.lock").exists()
    assert pq.read_table(part).num_rows == 300
    assert _same(list(iter_records(str(part)))) == _same(list(iter_records(str(full))))


@pytest.mark.slow
def test_retry_errors_rewrites_the_file_without_the_failed_records(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write_input(inp, 4)
    code, err = wait_cli(generate_cli(urls, inp, out))
    assert code == 0, err
    clean = list(iter_records(str(out)))
    broken = [dict(r, finish_reason="error", error="APIConnectionError: gone") if r["id"] == "q1" else r for r in clean]
    with ParquetRecordWriter(str(out), pq.read_schema(out), append=False) as writer:
        for record in broken:
            writer.write(record)
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume"))
    assert code == 0, err
    assert _same(list(iter_records(str(out)))) == _same(broken)  # a failed record stays without --retry-errors
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume", "--retry-errors"))
    assert code == 0, err
    assert _same(list(iter_records(str(out)))) == _same(clean)


@pytest.mark.slow
def test_a_file_that_is_not_parquet_is_never_clobbered(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write_input(inp, 2)
    text = json.dumps({"id": "q0", "text": "written by an older version"}) + "\n"
    out.write_text(text)
    for extra in ((), ("--resume",)):
        code, err = wait_cli(generate_cli(urls, inp, out, *extra))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert out.read_text() == text
    assert "not a Parquet file" in err
    code, err = wait_cli(generate_cli(urls, inp, out, "--overwrite"))
    assert code == 0, err
    assert pq.read_table(out).num_rows == 2


def test_a_resume_with_other_columns_is_refused(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write_input(inp, 2)
    code, err = wait_cli(generate_cli(urls, inp, out, "--max-tokens", "3"))
    assert code == 0, err
    before = out.read_bytes()
    code, err = wait_cli(generate_cli(urls, inp, out, "--max-tokens", "3", "--resume", "--rescore"))
    assert code == 2 and "other columns" in err and len(err.strip().splitlines()) == 1, err
    assert out.read_bytes() == before


def test_without_pyarrow_one_line_and_exit_2(tmp_path: Path) -> None:
    blocker = tmp_path / "block" / "pyarrow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('pyarrow is hidden by this test')\n")
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.parquet"
    write_input(inp, 2)
    env = _env(PYTHONPATH=os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")]))
    code, err = wait_cli(_cli(("http://127.0.0.1:9", "http://127.0.0.1:9"), inp, out, env=env))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "dualsample_rs[parquet]" in err and not out.exists()


def test_the_schema_holds_the_optional_columns_only_when_asked() -> None:
    base = record_schema("string").names
    assert "logp_t_exact" not in base and "round" not in base and "topk_ids_t" not in base
    full = record_schema("int", rescore=True, speculate=True, topk_t=True, topk_theta=True)
    assert full.field("topk_ids_t").type == pa.list_(pa.list_(pa.int64()))
    assert full.field("topk_logp_theta").type == pa.list_(pa.list_(pa.float64()))
    assert full.field("round").type == pa.list_(pa.int64()) and full.field("id").type == pa.int64()
