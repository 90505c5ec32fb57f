"""`dualsample generate` never loses data: refusals before anything is touched, one run
per output, resume that only drops a torn last line, signals that end cleanly, and bad
records that fail alone."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from dualsample_rs.io.output_file import OutputLock
from support import QUESTIONS, generate_cli, read_records, wait_cli, write_input

DEAD = ("http://127.0.0.1:9", "http://127.0.0.1:9")  # nothing listens on the discard port


def _refused(urls: tuple[str, str], inp: Path, out: Path, *extra: str) -> str:
    code, err = wait_cli(generate_cli(urls, inp, out, "--retry-delay", "0.01", *extra), timeout=60)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_the_input_is_never_the_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inp = tmp_path / "in.jsonl"
    write_input(inp, 3)
    before = inp.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(inp)
    monkeypatch.chdir(tmp_path)
    for out, extra in ((inp, "--overwrite"), (link, "--overwrite"), (Path("in.jsonl"), "--resume")):
        assert "is the input file" in _refused(DEAD, inp, out, extra)
    assert inp.read_bytes() == before


@pytest.mark.slow
def test_duplicate_ids_are_refused_with_both_lines(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"prompt": "a"}, {"prompt": "b"}, {"id": 1, "prompt": "c"}, {"id": "x", "prompt": "d"}]
    lines += [{"id": "x", "prompt": "e"}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    err = _refused(DEAD, inp, out)
    assert "id 1 on lines 1 and 3" in err and 'id "x" on lines 4 and 5' in err
    assert not out.exists()
    # "1" (a string) is another id than 1: no refusal for that.
    inp.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"id": "1", "prompt": "b"}) + "\n")
    assert "duplicate" not in _refused(DEAD, inp, out)  # refused only because no server is up


def test_non_finite_ids_and_non_utf8_input_are_refused(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text('{"id": "a", "prompt": "x"}\n{"id": NaN, "prompt": "y"}\n')
    assert "line 2: id nan is not a finite JSON value" in _refused(DEAD, inp, out)
    inp.write_bytes(b'{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "\xff"}\n')
    assert "line 2 (byte 50): not UTF-8 (byte 0xff)" in _refused(DEAD, inp, out)


@pytest.mark.slow
def test_bad_paths_and_flags_are_refused_before_any_server(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 2)
    assert "does not exist" in _refused(DEAD, tmp_path / "none.jsonl", out)
    assert "--input" in _refused(DEAD, tmp_path, out) and "is a directory" in _refused(DEAD, tmp_path, out)
    assert "is a directory" in _refused(DEAD, inp, tmp_path)
    assert "does not exist" in _refused(DEAD, inp, tmp_path / "missing" / "out.jsonl")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # root can write anywhere
            assert "cannot create files" in _refused(DEAD, inp, ro / "out.jsonl")
    finally:
        ro.chmod(0o700)
    assert "--missing" in _refused(DEAD, inp, out, "--missing", "abc")
    assert "seed" in _refused(DEAD, inp, out, "--seed", str(2**64))
    assert "--max-tokens" in _refused(DEAD, inp, out, "--max-tokens", "0")
    assert "--stop-token-ids" in _refused(DEAD, inp, out, "--stop-token-ids", "1,x")
    assert "only with --speculate" in _refused(DEAD, inp, out, "--verify-prompt-logprobs")
    assert "--max-reply-mb" in _refused(DEAD, inp, out, "--max-reply-mb", "x")
    # a file beside which no lock can be made
    assert "cannot create the lock file" in _refused(DEAD, inp, Path("/proc/version"), "--overwrite")
    assert not out.exists()


def test_a_second_run_on_the_same_output_is_refused(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 2)
    with OutputLock(str(out)):
        err = _refused(urls, inp, out, "--resume")
        assert f"being written by another run (pid {os.getpid()}" in err
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume"))
    assert code == 0, err
    assert len(read_records(out)) == 2 and not Path(str(out) + ".lock").exists()


def test_resume_refuses_a_corrupt_line_in_the_middle(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 4)
    code, err = wait_cli(generate_cli(urls, inp, out))
    assert code == 0, err
    lines = out.read_text().splitlines(keepends=True)
    broken = "".join([lines[0], lines[1][:30] + "\n", *lines[2:], '{"id": "q3", "tor'])
    out.write_text(broken)
    err = _refused(urls, inp, out, "--resume")
    assert "output, line 2: not a record" in err
    assert out.read_text() == broken  # nothing was changed


@pytest.mark.slow
def test_retry_errors_keeps_failed_records_while_a_server_is_down(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 3)
    code, err = wait_cli(generate_cli(urls, inp, out))
    assert code == 0, err
    records = read_records(out)
    records[1] = dict(records[1], finish_reason="error", error="APIConnectionError: gone")
    text = "".join(json.dumps(r) + "\n" for r in records)
    out.write_text(text)
    code, err = wait_cli(
        generate_cli((urls[0], DEAD[1]), inp, out, "--resume", "--retry-errors", "--retry-delay", "0.01")
    )
    assert code == 2 and "connection error" in err
    assert out.read_text() == text  # the failed record is still there
    code, err = wait_cli(generate_cli(urls, inp, out, "--resume", "--retry-errors"))
    assert code == 0, err
    assert [r["finish_reason"] != "error" for r in read_records(out)] == [True] * 3


def test_bad_prompts_fail_their_own_records(urls: tuple[str, str], tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    bad = [5, None, {}, ["a"], True, 3.5, [72.9, 101.7], [], "", "\ud800", [1, -2]]
    lines = [{"id": "good", "prompt": QUESTIONS[0]}]
    lines += [{"id": f"bad{i}", "prompt": p} for i, p in enumerate(bad)]
    lines += [{"id": "bad_teacher", "prompt": "Water is", "teacher_prompt": 7}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, err = wait_cli(generate_cli(urls, inp, out, "--max-tokens", "3"))
    assert code == 1 and "Traceback" not in err, err
    records = {r["id"]: r for r in read_records(out)}
    assert len(records) == len(lines)
    assert records["good"]["finish_reason"] in ("stop", "length")
    for i in range(len(bad)):
        r = records[f"bad{i}"]
        assert r["finish_reason"] == "error" and f"line {i + 2}, prompt:" in r["error"], r
    assert "teacher_prompt: expected a string" in records["bad_teacher"]["error"]
    assert records["bad9"]["prompt"] == "\ud800"  # written escaped, read back the same


def _kill_and_resume(urls: tuple[str, str], tmp_path: Path, sig: signal.Signals) -> None:
    inp, full, part = tmp_path / "in.jsonl", tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    write_input(inp, 300)
    code, err = wait_cli(generate_cli(urls, inp, full, "--max-concurrency", "4"))
    assert code == 0, err
    p = generate_cli(urls, inp, part, "--max-concurrency", "2")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not part.exists() or part.read_text().count("\n") < 5):
        time.sleep(0.01)
    p.send_signal(sig)
    code, err = wait_cli(p)
    assert code == 128 + sig, err
    assert f"stopped by {sig.name}" in err and "Traceback" not in err
    assert part.read_bytes().endswith(b"\n") and not Path(str(part) + ".lock").exists()
    assert 5 <= len(read_records(part)) < 300
    code, err = wait_cli(generate_cli(urls, inp, part, "--resume", "--max-concurrency", "3"))
    assert code == 0, err
    reference = {r["id"]: r for r in read_records(full)}
    assert sorted(r["id"] for r in read_records(part)) == sorted(reference)
    assert all(r == reference[r["id"]] for r in read_records(part))


@pytest.mark.slow
def test_sigterm_finishes_the_line_and_exits_143(urls: tuple[str, str], tmp_path: Path) -> None:
    _kill_and_resume(urls, tmp_path, signal.SIGTERM)


@pytest.mark.slow
def test_sigint_finishes_the_line_and_exits_130(urls: tuple[str, str], tmp_path: Path) -> None:
    _kill_and_resume(urls, tmp_path, signal.SIGINT)


@pytest.mark.slow
def test_repeated_resume_under_heavy_faults_converges_to_the_clean_records(
    urls: tuple[str, str], tmp_path: Path
) -> None:
    from dualsample_rs.server import running_server

    inp, clean, out = tmp_path / "in.jsonl", tmp_path / "clean.jsonl", tmp_path / "out.jsonl"
    # 24 records and two retries a request: /tokenize and /detokenize retry more on their
    # own, so the faults must fail some steps for the first run to lose records.
    write_input(inp, 24)
    code, err = wait_cli(generate_cli(urls, inp, clean, "--max-tokens", "8", "--teacher-chat"))
    assert code == 0, err
    faults = {"error_503_rate": 0.1, "error_500_rate": 0.1, "drop_rate": 0.05, "malformed_rate": 0.05,
              "slow_body_rate": 0.05, "slow_body_seconds": 0.1, "retry_after": 0.01}  # fmt: skip
    codes = []
    with running_server("base", **faults) as a, running_server("teacher", fault_seed=7, **faults) as b:
        flags = ("--max-tokens", "8", "--max-retries", "2", "--retry-delay", "0.01", "--max-concurrency", "4",
                 "--teacher-chat")  # fmt: skip
        codes.append(wait_cli(generate_cli((a, b), inp, out, *flags))[0])
        while codes[-1] != 0 and len(codes) < 12:
            codes.append(wait_cli(generate_cli((a, b), inp, out, *flags, "--resume", "--retry-errors"))[0])
    assert codes[-1] == 0 and codes[0] == 1, codes  # faults did fail records, and resuming mended them
    assert sorted(read_records(out), key=lambda r: r["id"]) == sorted(read_records(clean), key=lambda r: r["id"])
