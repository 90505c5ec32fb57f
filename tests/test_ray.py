"""Ray: `DualSample` through Ray Data's map_batches and `dualsample generate --ray` on a
local cluster give the same records as a single process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from dualsample_rs import CoordinatorConfig
from dualsample_rs.ray import DualSample, record_from_row
from dualsample_rs.server import running_server
from support import generate_cli, read_records, wait_cli, write_input


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
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


def test_map_batches_gives_the_single_process_records(cluster: None, urls: tuple[str, str], tmp_path: Path) -> None:
    _map_batches(urls, tmp_path, ())


def test_map_batches_keeps_rescored_and_speculative_fields(cluster: None, tmp_path: Path) -> None:
    with running_server("base", flavor="sglang") as a, running_server("teacher", flavor="sglang") as b:
        flags = ("--dialect", "sglang", "--speculate", "3", "--rescore")
        _map_batches((a, b), tmp_path, flags, dialect="sglang", speculate=3, rescore=True)


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
