"""Ray: `DualSample` through Ray Data's map_batches and `dualsample generate --ray` on a
local cluster give the same records as a single process.

Every test that imports Ray or starts a cluster is marked slow: `make test` runs them
(and installs the ray extra first); `make check` leaves them out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dualsample_rs import CoordinatorConfig
from dualsample_rs.ray import DualSample, record_from_row
from support import doomed_server, generate_cli, read_records, wait_cli, write_input


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    import ray  # here, not at the top: the module's quick tests run without the ray extra

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _reference(urls: tuple[str, str], tmp_path: Path, n: int, *flags: str) -> tuple[Path, dict]:
    inp, out = tmp_path / "in.jsonl", tmp_path / "single.jsonl"
    write_input(inp, n)
    code, err = wait_cli(generate_cli(urls, inp, out, *flags))
    assert code == 0, err
    return inp, {r["id"]: r for r in read_records(out)}


def _map_batches(urls: tuple[str, str], tmp_path: Path, flags: tuple[str, ...], **options: object) -> None:
    import ray

    inp, reference = _reference(urls, tmp_path, 24, *flags)
    config = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], seed=11, **options)  # type: ignore[arg-type]
    kwargs = {"config": config, "max_tokens": 25, "actors": 2}
    mapped = ray.data.read_json(str(inp)).map_batches(
        DualSample, fn_constructor_kwargs=kwargs, concurrency=2, batch_size=5, num_cpus=0.25
    )
    rows = mapped.take_all()
    records = [record_from_row(r) for r in rows]
    assert sorted(r["id"] for r in records) == sorted(reference)
    assert all(r == reference[r["id"]] for r in records)


@pytest.mark.slow
def test_map_batches_gives_the_single_process_records(cluster: None, urls: tuple[str, str], tmp_path: Path) -> None:
    _map_batches(urls, tmp_path, ())


@pytest.mark.slow
def test_map_batches_keeps_rescored_and_speculative_fields(
    cluster: None, sglang_pair: tuple[str, str], tmp_path: Path
) -> None:
    flags = ("--dialect", "sglang", "--speculate", "3", "--rescore")
    _map_batches(sglang_pair, tmp_path, flags, dialect="sglang", speculate=3, rescore=True)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_cli_ray_gives_the_single_process_records(urls: tuple[str, str], tmp_path: Path, suffix: str) -> None:
    inp, reference = _reference(urls, tmp_path, 16)
    out = tmp_path / f"ray{suffix}"
    p = subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
         "--input", str(inp), "--output", str(out), "--max-tokens", "25", "--seed", "11", "--quiet",
         "--ray", "--ray-actors", "2", "--ray-batch-size", "4"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    if suffix == ".jsonl":
        records = [json.loads(line) for line in out.read_text().splitlines()]
    else:  # a directory of Parquet files written by Ray
        import pyarrow.parquet as pq

        records = [record_from_row(row) for row in pq.read_table(out).to_pylist()]
    assert sorted(r["id"] for r in records) == sorted(reference)
    assert all(r == reference[r["id"]] for r in records)


def test_replicas_are_spread_over_actors() -> None:
    from dualsample_rs.ray import _share

    urls = ("http://a", "http://b", "http://c", "http://d")
    shares = [_share(urls, i, 2) for i in range(2)]
    assert shares == [("http://a", "http://c"), ("http://b", "http://d")]
    assert _share(urls[:1], 5, 2) == ("http://a",) and _share("http://a", 3, 4) == "http://a"
    assert _share(urls, 1, 8) == urls  # fewer replicas than actors: each actor gets them all


# ------------------------------------------------------------ the gate before Ray starts
def _ray_cli(urls: tuple[str, str], inp: Path, out: Path, *extra: str, env: dict | None = None, ray: str = "--ray"):
    return subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
         "--input", str(inp), "--output", str(out), "--max-tokens", "25", "--seed", "11", "--quiet", ray, *extra],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def _one_line_refusal(p: subprocess.CompletedProcess, words: str) -> None:
    assert p.returncode == 2, p.stderr[-2000:]
    assert words in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.slow  # the gate comes after `import ray`
def test_ray_runs_pass_the_same_gate(tmp_path: Path) -> None:
    urls = ("http://127.0.0.1:9", "http://127.0.0.1:9")  # never reached: every case is refused first
    inp = tmp_path / "in.jsonl"
    write_input(inp, 20)
    kept = inp.read_text()
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n" * 20)
    _one_line_refusal(_ray_cli(urls, inp, out), "exists")
    assert out.read_text() == "earlier\n" * 20
    _one_line_refusal(_ray_cli(urls, inp, inp, "--overwrite"), "is the input file")
    (tmp_path / "link.jsonl").symlink_to(inp)
    _one_line_refusal(_ray_cli(urls, inp, tmp_path / "link.jsonl", "--overwrite"), "is the input file")
    assert inp.read_text() == kept
    dup = tmp_path / "dup.jsonl"
    dup.write_text(kept + kept.splitlines()[3] + "\n")
    _one_line_refusal(_ray_cli(urls, dup, tmp_path / "o1.jsonl"), "duplicate ids")
    _one_line_refusal(_ray_cli(urls, tmp_path / "missing.jsonl", tmp_path / "o2.jsonl"), "does not exist")
    _one_line_refusal(_ray_cli(urls, inp, tmp_path / "no" / "o3.jsonl"), "does not exist")
    _one_line_refusal(_ray_cli(urls, inp, tmp_path / "o4.jsonl", ray="--ray=not an address"), "expected")
    parquet = tmp_path / "o5.parquet"
    parquet.mkdir()
    (parquet / "notes.txt").write_text("mine")
    _one_line_refusal(_ray_cli(urls, inp, parquet), "not empty")
    _one_line_refusal(_ray_cli(urls, inp, parquet, "--overwrite"), "not Parquet")
    assert (parquet / "notes.txt").read_text() == "mine"
    noid = tmp_path / "noid.jsonl"
    noid.write_text('{"prompt": "a"}\n')
    _one_line_refusal(_ray_cli(urls, noid, tmp_path / "o6.jsonl"), "no 'id' field")


@pytest.mark.slow
def test_an_unreachable_cluster_and_a_missing_extra_are_one_line(tmp_path: Path) -> None:
    urls = ("http://127.0.0.1:9", "http://127.0.0.1:9")
    inp = tmp_path / "in.jsonl"
    write_input(inp, 3)
    t0 = time.monotonic()
    _one_line_refusal(_ray_cli(urls, inp, tmp_path / "a.jsonl", ray="--ray=127.0.0.1:1"), "no Ray cluster answers")
    assert time.monotonic() - t0 < 30
    fake = tmp_path / "fake"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    _one_line_refusal(_ray_cli(urls, inp, tmp_path / "b.jsonl", env=env), "the ray extra is not installed")


@pytest.mark.slow
def test_sigterm_ends_a_ray_run_and_resume_without_ray_completes_it(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, reference = _reference(urls, tmp_path, 40)
    out = tmp_path / "ray.jsonl"
    with doomed_server() as (slow_base, _):
        p = subprocess.Popen(
            [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", slow_base, "--t-url", urls[1],
             "--input", str(inp), "--output", str(out), "--max-tokens", "25", "--seed", "11", "--quiet",
             "--ray", "--ray-actors", "1", "--ray-batch-size", "2", "--max-concurrency", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 2):
            time.sleep(0.2)
        assert out.exists(), "no record came back from Ray"
        p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
        stopped_in = time.monotonic() - t0
    assert p.returncode == 143, err[-2000:]
    assert stopped_in < 30
    assert "stopped by SIGTERM" in err
    partial = out.read_bytes()
    assert partial.endswith(b"\n") and len(partial.splitlines()) < 40
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume"))
    assert code == 0, err
    records = read_records(out)
    assert sorted(r["id"] for r in records) == sorted(reference)
    assert all(r == reference[r["id"]] for r in records)


@pytest.mark.slow
def test_map_batches_with_named_teachers_gives_the_single_process_records(
    cluster: None, urls: tuple[str, str], math_teachers: dict[str, str], tmp_path: Path
) -> None:
    """Lines routed to two teachers and to a mixture, through Ray: the records of one
    process, teacher and mixture fields included."""
    import ray

    inp, out = tmp_path / "in.jsonl", tmp_path / "single.jsonl"
    routes: list[dict] = [{"teacher": "chat"}, {"teacher": "math"}, {"teachers": {"chat": 0.5, "math": 0.5}}, {}]
    with inp.open("w") as f:
        for i in range(12):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question {i}: why?\nAnswer:", **routes[i % 4]}) + "\n")
    teachers = [f"chat={urls[1]}", f"math={math_teachers['vllm']}"]
    code, err = wait_cli(generate_cli(urls, inp, out, teachers=teachers))
    assert code == 0, err
    reference = {r["id"]: r for r in read_records(out)}
    config = CoordinatorConfig(theta_url=urls[0], teachers={"chat": urls[1], "math": math_teachers["vllm"]}, seed=11)
    mapped = ray.data.read_json(str(inp)).map_batches(
        DualSample, fn_constructor_kwargs={"config": config, "max_tokens": 25, "actors": 2}, concurrency=2,
        batch_size=5, num_cpus=0.25,
    )  # fmt: skip
    records = [record_from_row(r) for r in mapped.take_all()]
    assert sorted(r["id"] for r in records) == sorted(reference)
    assert all(r == reference[r["id"]] for r in records)
    assert {reference[f"q{i}"].get("teacher") for i in range(4)} == {"chat", "math", None}
    assert reference["q2"]["teachers"] == {"chat": 0.5, "math": 0.5}
