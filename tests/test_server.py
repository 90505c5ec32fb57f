"""The reference server over real sockets: vLLM's shapes, defaults, errors and faults."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from dualsample_rs.server import running_server
from dualsample_rs.server.process import READY_PREFIX
from scipy.stats import chisquare

CHAT = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def base(urls: tuple[str, str]) -> Iterator[httpx.Client]:
    """A client of the shared base server (default flags)."""
    with httpx.Client(base_url=urls[0], timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def teacher() -> Iterator[httpx.Client]:
    with running_server("teacher", max_logprobs=-1, enable_tokenizer_info_endpoint=True) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def complete(client: httpx.Client, **body: object) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def error(client: httpx.Client, path: str = "/v1/completions", **body: object) -> tuple[int, dict]:
    r = client.post(path, json=body)
    return r.status_code, r.json()


def test_info_endpoints(base: httpx.Client) -> None:
    assert base.get("/health").status_code == 200
    models = base.get("/v1/models").json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == "dualsample-base" and card["max_model_len"] == 2048 and card["owned_by"] == "vllm"
    assert "version" in base.get("/version").json()
    assert base.get("/tokenizer_info").status_code == 404  # off unless the flag is given


def test_tokenizer_info_when_enabled(teacher: httpx.Client) -> None:
    info = teacher.get("/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>"
    eos = teacher.post("/tokenize", json={"prompt": info["eos_token"], "add_special_tokens": False}).json()["tokens"]
    assert eos == [256]


def test_logprob_cap_answers_like_vllm(base: httpx.Client) -> None:
    status, body = error(base, prompt="The sun", logprobs=21)
    assert status == 400
    assert body["error"]["message"].startswith("Requested sample logprobs of 21, which is greater than max allowed: 20")
    assert (
        body["error"]["type"] == "BadRequestError"
        and body["error"]["param"] == "logprobs"
        and body["error"]["code"] == 400
    )
    status, body = error(base, prompt="The sun", prompt_logprobs=30)
    assert status == 400 and body["error"]["message"].startswith("Requested prompt logprobs of 30")
    status, body = error(base, prompt="The sun", logprobs=-2)
    assert status == 400 and "must be a positive value or -1" in body["error"]["message"]
    assert complete(base, prompt="The sun", logprobs=20, max_tokens=1)["choices"][0]["logprobs"] is not None


def test_token_id_keys_and_entry_counts(base: httpx.Client) -> None:
    ids = base.post("/tokenize", json={"prompt": "The moon shines because"}).json()["tokens"]
    out = complete(base, prompt=ids, max_tokens=8, logprobs=5, return_tokens_as_token_ids=True, seed=3)
    lp = out["choices"][0]["logprobs"]
    assert all(t.startswith("token_id:") for t in lp["tokens"])
    for tok, top in zip(lp["tokens"], lp["top_logprobs"], strict=True):
        assert all(k.startswith("token_id:") for k in top)
        assert tok in top and len(top) in (5, 6)
        assert next(iter(top)) == tok  # the sampled token comes first
        values = sorted(top.values(), reverse=True)
        if len(top) == 6:  # sampled outside the top 5: it is the smallest
            assert top[tok] == values[-1]
    text = complete(base, prompt=ids, max_tokens=1, logprobs=3, temperature=0)["choices"][0]["logprobs"]
    assert all(not k.startswith("token_id:") for k in text["top_logprobs"][0])


def test_raw_logprobs_ignore_temperature(base: httpx.Client) -> None:
    a = complete(base, prompt="Rain comes", max_tokens=1, logprobs=5, temperature=0)
    b = complete(base, prompt="Rain comes", max_tokens=1, logprobs=5, temperature=1.7, seed=1)
    ta, tb = a["choices"][0]["logprobs"]["top_logprobs"][0], b["choices"][0]["logprobs"]["top_logprobs"][0]
    for k in set(ta) & set(tb):
        assert ta[k] == tb[k]
    assert len(ta) == 5  # greedy: the sampled token is the top one, so exactly k entries


def test_batches_keep_order_and_equal_single_requests(base: httpx.Client) -> None:
    prompts = ["Water is", "The heart", "Bees carry", "A volcano is"]
    ids = [base.post("/tokenize", json={"prompt": p}).json()["tokens"] for p in prompts]
    batch = complete(base, prompt=ids, max_tokens=6, seed=7, logprobs=3, n=2)
    assert [c["index"] for c in batch["choices"]] == list(range(8))
    for p, prompt in enumerate(ids):
        single = complete(base, prompt=prompt, max_tokens=6, seed=7, logprobs=3, n=2)
        for j in range(2):
            got, exp = batch["choices"][p * 2 + j], single["choices"][j]
            assert got["text"] == exp["text"] and got["logprobs"] == exp["logprobs"]
    assert batch["usage"]["prompt_tokens"] == sum(len(i) for i in ids)
    assert batch["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in batch["choices"])
    strings = complete(base, prompt=prompts, max_tokens=6, seed=7, n=2)
    assert [c["text"] for c in strings["choices"]] == [c["text"] for c in batch["choices"]]


def test_greedy_is_deterministic_and_seeds_repeat(base: httpx.Client) -> None:
    g1 = complete(base, prompt="The ocean is", max_tokens=30, temperature=0)["choices"][0]["text"]
    g2 = complete(base, prompt="The ocean is", max_tokens=30, temperature=0)["choices"][0]["text"]
    assert g1 == g2
    s1 = complete(base, prompt="The ocean is", max_tokens=30, seed=5)["choices"][0]["text"]
    s2 = complete(base, prompt="The ocean is", max_tokens=30, seed=5)["choices"][0]["text"]
    s3 = complete(base, prompt="The ocean is", max_tokens=30, seed=6)["choices"][0]["text"]
    assert s1 == s2 and s1 != s3


def test_echo_and_prompt_logprobs(base: httpx.Client) -> None:
    ids = base.post("/tokenize", json={"prompt": "Fire needs heat"}).json()["tokens"]
    out = complete(base, prompt=ids, max_tokens=3, echo=True, logprobs=2, temperature=0)
    c = out["choices"][0]
    assert c["text"].startswith("Fire needs heat")
    assert c["logprobs"]["token_logprobs"][0] is None and len(c["logprobs"]["tokens"]) == len(ids) + 3
    plp = c["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for i in range(1, len(ids)):
        entry = plp[i]
        assert str(ids[i]) in entry and len(entry) in (2, 3)
        # the prompt token's log probability is what a completion at that point reports
        step = complete(base, prompt=ids[:i], max_tokens=1, logprobs=20, temperature=0, return_tokens_as_token_ids=True)
        top = step["choices"][0]["logprobs"]["top_logprobs"][0]
        if f"token_id:{ids[i]}" in top:
            assert top[f"token_id:{ids[i]}"] == pytest.approx(entry[str(ids[i])]["logprob"], abs=1e-12)
    only = complete(base, prompt=ids, max_tokens=1, prompt_logprobs=1)["choices"][0]
    assert only["logprobs"] is None and len(only["prompt_logprobs"]) == len(ids)


def test_teacher_reaches_eos_on_chat_prompts(teacher: httpx.Client) -> None:
    ids = teacher.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    out = complete(teacher, prompt=ids, max_tokens=200, temperature=0)
    c = out["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] is None
    assert out["usage"]["completion_tokens"] < 200
    raw = complete(teacher, prompt=ids, max_tokens=200, temperature=0, skip_special_tokens=False)["choices"][0]
    assert raw["text"].endswith("<|im_end|>\n<|endoftext|>")


def test_stop_ids_strings_and_ignore_eos(teacher: httpx.Client) -> None:
    ids = teacher.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    im_end = 258
    c = complete(teacher, prompt=ids, max_tokens=200, temperature=0, stop_token_ids=[im_end])["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == im_end
    c = complete(teacher, prompt=ids, max_tokens=200, temperature=0, stop=["sun"])["choices"][0]
    assert c["finish_reason"] == "stop" and c["stop_reason"] == "sun" and "sun" not in c["text"]
    c = complete(teacher, prompt=ids, max_tokens=40, temperature=0, ignore_eos=True)["choices"][0]
    assert c["finish_reason"] == "length"


def test_tokenize_messages_applies_the_chat_template(teacher: httpx.Client) -> None:
    by_messages = teacher.post("/tokenize", json={"messages": CHAT}).json()
    text = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
    by_text = teacher.post("/tokenize", json={"prompt": text}).json()
    assert by_messages["tokens"] == by_text["tokens"] and by_messages["count"] == len(by_text["tokens"])
    assert by_messages["tokens"][0] == 257 and 258 in by_messages["tokens"]
    assert by_messages["max_model_len"] == 2048
    strs = teacher.post("/tokenize", json={"prompt": "ab", "return_token_strs": True}).json()["token_strs"]
    assert strs == ["a", "b"]
    back = teacher.post("/detokenize", json={"tokens": by_text["tokens"]}).json()["prompt"]
    assert back == text


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"prompt": ""}, 400, "non-empty"),
        ({"prompt": []}, 400, "non-empty"),
        ({"prompt": [1, 2, 300]}, 400, "Token id 300 is out of vocabulary"),
        ({"prompt": [65] * 2049}, 400, "maximum context length is 2048 tokens"),
        ({"prompt": "hi", "temperature": 3}, 400, "temperature"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "n": "two"}, 400, "n"),
        ({"prompt": "hi", "stop": [""]}, 400, "stop"),
        ({"prompt": "hi", "model": "gpt-9"}, 404, "does not exist"),
    ],
)
def test_error_statuses(base: httpx.Client, body: dict, status: int, needle: str) -> None:
    got, payload = error(base, **body)
    assert got == status and needle in payload["error"]["message"]
    assert payload["error"]["code"] == status


def test_malformed_json_and_unknown_fields(base: httpx.Client) -> None:
    r = base.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert complete(base, prompt="hi", max_tokens=1, definitely_not_a_field=3)["choices"]


def test_api_key() -> None:
    with running_server("base", api_key="sekrit") as url:
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 401
        bad = httpx.post(url + "/v1/completions", json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        ok = httpx.post(
            url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"Authorization": "Bearer sekrit"}
        )
        assert ok.status_code == 200
        assert httpx.get(url + "/health").status_code == 200


def test_queue_limit_answers_503() -> None:
    with running_server("base", max_num_queued_reqs=1) as url:
        long = {"prompt": [[65, 66]] * 64, "max_tokens": 400, "ignore_eos": True, "temperature": 0}
        # On busy cores a quick request can reach the server before the long one and take
        # the only place (the long one then gets the 503): such an attempt is run again.
        for _ in range(5):
            statuses: list[int] = []

            def post_long(out: list[int] = statuses) -> None:
                out.append(httpx.post(url + "/v1/completions", json=long, timeout=60).status_code)

            t = threading.Thread(target=post_long)
            t.start()
            deadline = time.monotonic() + 10
            second = None
            while time.monotonic() < deadline and t.is_alive():
                time.sleep(0.05)
                second = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
                if second.status_code == 503:
                    break
            t.join()
            if statuses == [200]:
                break
        assert second is not None and second.status_code == 503
        assert "busy" in second.json()["error"]["message"]
        assert statuses == [200]
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


@pytest.mark.slow
def test_reported_distribution_is_the_sampled_one(teacher: httpx.Client) -> None:
    """Chi-square: first-token frequencies over many seeded samples against exp(logprobs)."""
    n = 4000
    out = complete(teacher, prompt="The s", max_tokens=1, n=n, seed=123, logprobs=-1, return_tokens_as_token_ids=True)
    probs = {int(k.split(":")[1]): np.exp(v) for k, v in out["choices"][0]["logprobs"]["top_logprobs"][0].items()}
    assert len(probs) == 259 and sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
    counts: dict[int, int] = {}
    for c in out["choices"]:
        tok = int(c["logprobs"]["tokens"][0].split(":")[1])
        counts[tok] = counts.get(tok, 0) + 1
    big = sorted((t for t, p in probs.items() if p * n >= 5), key=lambda t: -probs[t])
    observed = [counts.get(t, 0) for t in big] + [n - sum(counts.get(t, 0) for t in big)]
    expected = [probs[t] * n for t in big] + [n * (1 - sum(probs[t] for t in big))]
    assert len(big) >= 3
    assert chisquare(observed, expected).pvalue > 1e-4


def _statuses(url: str, k: int) -> list[object]:
    out: list[object] = []
    for _ in range(k):
        try:
            r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}, timeout=30)
            try:
                r.json()
                out.append(r.status_code)
            except json.JSONDecodeError:
                out.append("malformed")
        except httpx.RemoteProtocolError:
            out.append("dropped")
    return out


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"error_500_rate": 1.0}, 500),
        ({"error_503_rate": 1.0}, 503),
        ({"drop_rate": 1.0}, "dropped"),
        ({"malformed_rate": 1.0}, "malformed"),
    ],
)
def test_fault_flags(flags: dict, expected: object) -> None:
    with running_server("base", **flags) as url:
        assert _statuses(url, 3) == [expected] * 3
        assert httpx.get(url + "/health").status_code == 200  # health never misbehaves


@pytest.mark.slow
def test_503_carries_retry_after_and_faults_are_seeded() -> None:
    with running_server("base", error_503_rate=1.0, retry_after=2.5) as url:
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}).headers["Retry-After"] == "2.5"
    runs = []
    for _ in range(2):
        with running_server("base", fault_seed=42, error_500_rate=0.3, error_503_rate=0.3, malformed_rate=0.2) as url:
            runs.append(_statuses(url, 12))
    assert runs[0] == runs[1]
    assert len(set(runs[0])) >= 3  # a mix, not all one kind


@pytest.mark.slow
def test_latency_and_slow_bodies() -> None:
    with running_server("base", latency=0.6, latency_rate=1.0) as url:
        t = time.monotonic()
        assert httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200
        assert time.monotonic() - t >= 0.6
    with running_server("base", slow_body_rate=1.0, slow_body_seconds=0.8) as url:
        t = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200 and r.json()["choices"]
        assert time.monotonic() - t >= 0.7


def test_serve_cli_prints_address_and_stops_on_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = subprocess.Popen(
            [sys.executable, "-m", "dualsample_rs", "serve", "--port", "0"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX) and line.strip().rsplit(":", 1)[1].isdigit()
        assert httpx.get(line[len(READY_PREFIX) :].strip() + "/health").status_code == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
        assert "stopped" in proc.stdout.read()
        proc.stdout.close()


def test_json_error_bodies_for_unknown_routes_and_methods(base: httpx.Client) -> None:
    r = base.get("/no/such/path")
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = base.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    # the tokens-in/out route exists only with --enable-scale-out, as in vLLM
    assert base.post("/inference/v1/generate", json={"token_ids": [1]}).status_code == 404


def test_vllm_generate_route_shapes(generate_pair: tuple[str, str]) -> None:
    with httpx.Client(base_url=generate_pair[0], timeout=30) as c:
        body = {"token_ids": [72, 105], "sampling_params": {"max_tokens": 2, "temperature": 0, "logprobs": 3,
                                                             "detokenize": False}}  # fmt: skip
        got = c.post("/inference/v1/generate", json=body).json()
        choice = got["choices"][0]
        assert len(choice["token_ids"]) == 2 and len(choice["logprobs"]["content"]) == 2
        first = choice["logprobs"]["content"][0]
        ids = [e["token_id"] for e in first["top_logprobs"]]
        assert ids[0] == first["token_id"] == choice["token_ids"][0] and len(ids) == 3  # greedy: sampled is top 1
        assert [e["rank"] for e in first["top_logprobs"]] == [1, 2, 3]
        scored = {"token_ids": [72], "sampling_params": {"max_tokens": 1, "logprob_token_ids": [5, 6], "logprobs": 3}}
        r = c.post("/inference/v1/generate", json=scored)
        assert r.status_code == 400 and "must equal" in r.json()["error"]["message"]
        r = c.post("/inference/v1/generate", json={"token_ids": [], "sampling_params": {}})
        assert r.status_code == 400


def test_sglang_flavor_shapes_and_errors() -> None:
    # The /generate below ignores EOS: its shapes are checked over two tokens, and an
    # unseeded draw could otherwise end at EOS first (it did, once in many runs).
    with running_server("teacher", flavor="sglang") as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/v1/models").json()["data"][0]["owned_by"] == "sglang"
        assert c.get("/get_model_info").json()["model_path"] == "dualsample-teacher"
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 404
        tokens = c.post("/tokenize", json={"prompt": "Hi"}).json()
        assert tokens["tokens"] == [72, 105] and tokens["count"] == 2
        assert c.post("/detokenize", json={"tokens": [72, 105]}).json() == {"text": "Hi"}
        one = c.post("/generate", json={"input_ids": [72, 105, 33], "sampling_params": {"max_new_tokens": 2,
                                        "ignore_eos": True}, "return_logprob": True, "top_logprobs_num": 4,
                                        "logprob_start_len": 1, "token_ids_logprob": [10, 11]}).json()  # fmt: skip
        meta = one["meta_info"]
        assert len(one["output_ids"]) == 2 and meta["finish_reason"]["type"] == "length"
        assert [len(p) for p in meta["output_top_logprobs"]] == [4, 4]
        assert [[t[1] for t in p] for p in meta["output_token_ids_logprobs"]] == [[10, 11], [10, 11]]
        # scoring the input from logprob_start_len: None exactly there, as SGLang answers
        assert [t[1] for t in meta["input_token_logprobs"]] == [105, 33] and meta["input_token_logprobs"][0][0] is None
        batch = c.post("/generate", json={"input_ids": [[72], [73, 74]], "sampling_params": {"max_new_tokens": 1}})
        assert isinstance(batch.json(), list) and len(batch.json()) == 2
        r = c.post("/generate", json={"sampling_params": {}})
        assert r.status_code == 400 and r.json()["object"] == "error" and "input_ids" in r.json()["message"]


@pytest.mark.parametrize(
    "path,raw,needle",
    [
        ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}', "not valid Unicode"),
        ("/tokenize", b'{"prompt": "\\ud800"}', "not valid Unicode"),
        ("/tokenize", b'{"messages": [{"content": "hi"}]}', "messages[0].role"),
        ("/tokenize", b'{"messages": [{"role": "user"}]}', "messages[0].content"),
        ("/v1/completions", b'{"prompt": "a", "n": 1000000000000000000000000000000}', "n must be at most"),
        ("/v1/completions", b'{"prompt": "a", "n": 1000, "max_tokens": 2000}', "this server allows"),
        ("/v1/completions", b'{"prompt": "a", "seed": 99999999999999999999}', "int64"),
    ],
)
def test_hostile_requests_get_400_bodies(base: httpx.Client, path: str, raw: bytes, needle: str) -> None:
    r = base.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_negative_seeds_are_valid_and_repeat(base: httpx.Client) -> None:
    a = complete(base, prompt="The sea", max_tokens=8, seed=-5)
    b = complete(base, prompt="The sea", max_tokens=8, seed=-5)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_streaming_sends_server_sent_events(base: httpx.Client) -> None:
    whole = complete(base, prompt="The sea", max_tokens=12, seed=3, logprobs=2)["choices"][0]
    with base.stream("POST", "/v1/completions", json={"prompt": "The sea", "max_tokens": 12, "seed": 3,
                                                      "logprobs": 2, "stream": True}) as r:  # fmt: skip
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"] and len(chunks) == 13
    assert [c["logprobs"]["top_logprobs"][0] for c in chunks[:-1]] == whole["logprobs"]["top_logprobs"]


def test_sigterm_stops_the_server_mid_request() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualsample_rs", "serve", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline()[len(READY_PREFIX) :].strip()
        big = {"prompt": "The sea", "n": 1000, "max_tokens": 1000, "ignore_eos": True}
        threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=big, timeout=60), daemon=True).start()
        time.sleep(1.0)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0 and time.monotonic() - t0 < 10
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def test_served_model_name_and_413_bodies() -> None:
    name = "Qwen/Qwen2.5-1.5B"
    with running_server("base", served_model_name=name) as url, httpx.Client(base_url=url, timeout=60) as c:
        assert c.get("/v1/models").json()["data"][0]["id"] == name
        assert c.post("/v1/completions", json={"model": name, "prompt": "The sea", "max_tokens": 2}).status_code == 200
        r = c.post("/v1/completions", json={"model": "other", "prompt": "The sea"})
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
        r = c.post("/v1/completions", content=b" " * (65 * 1024**2), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == 413


def test_trace_replay_reports_the_model_at_each_given_token(generate_pair: tuple[str, str]) -> None:
    with running_server("teacher", enable_scale_out=True, enable_trace_replay=True) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            prompt = c.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
            trace = [87, 97, 116, 258, 256, 101]  # through <|im_end|> and EOS: nothing stops it early
            body = {"token_ids": prompt, "sampling_params": {"max_tokens": 50, "logprobs": 2, "temperature": 1.0,
                                                             "trace_decode_token_ids": trace}}  # fmt: skip
            choice = c.post("/inference/v1/generate", json=body).json()["choices"][0]
            assert choice["token_ids"] == trace and choice["finish_reason"] == "length"
            got = [p["logprob"] for p in choice["logprobs"]["content"]]
            full = complete(c, prompt=prompt + trace, max_tokens=1, prompt_logprobs=0)["choices"][0]["prompt_logprobs"]
            want = [full[len(prompt) + i][str(t)]["logprob"] for i, t in enumerate(trace)]
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
            r = c.post("/inference/v1/generate", json={**body, "sampling_params": {
                "trace_decode_token_ids": trace, "prompt_logprobs": 1}})  # fmt: skip
            assert r.status_code == 400
    # a teacher serving the generate route without trace replay
    r = httpx.post(generate_pair[1] + "/inference/v1/generate", json=body, timeout=30)
    assert r.status_code == 400 and "trace replay is not enabled" in r.json()["error"]["message"]


def test_latency_per_position_holds_the_model_per_position_computed(monkeypatch: pytest.MonkeyPatch) -> None:
    """--latency-per-position: the model waits that long per context it computes (one
    lock, so positions of concurrent requests wait one after another), and computes the
    same log probabilities."""
    from dualsample_rs.server import app
    from dualsample_rs.server.model import load_preset

    waited: list[float] = []
    monkeypatch.setattr(app.time, "sleep", waited.append)
    model = load_preset("base")
    busy = app.Server(model, app.ServerOptions(latency_per_position=0.25)).model
    contexts = [[5, 6], [5, 6, 7], [8]]
    np.testing.assert_array_equal(busy.next_logprobs(contexts), model.next_logprobs(contexts))
    assert waited == [0.75] and busy.vocab_size == model.vocab_size
    assert app.Server(model, app.ServerOptions()).model is model  # no wrapper by default
    with pytest.raises(ValueError, match="latency_per_position"):
        app.Server(model, app.ServerOptions(latency_per_position=-1.0))
    cli = subprocess.run([sys.executable, "-m", "dualsample_rs", "serve", "--help"], capture_output=True, text=True)
    assert "--latency-per-position" in cli.stdout
