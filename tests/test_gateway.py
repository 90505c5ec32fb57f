"""`dualsample gateway` end to end: the gateway in front of the reference servers, in
every dialect, asked through the official `openai` client and raw request bodies; its
answers against `dualsample generate`'s records; disconnect, a killed teacher, and
pause / resume passed through to the base."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import math
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web
from dualsample_rs.backends.replicas import DETOKENIZE_IDS
from dualsample_rs.config.coordinator import CoordinatorConfig
from dualsample_rs.gateway import GatewayOptions, choice_key, open_gateway
from dualsample_rs.gateway.sampler import SampleRequest
from dualsample_rs.server.app import PROMPT_KEY_IDS
from hypothesis import given
from hypothesis import strategies as st
from support import pair_config, read_records
from test_gateway_protocol import BODIES

QUESTION = "Question: Why is the sky blue?\nAnswer:"
DIALECTS = {"vllm-completions": "vllm", "vllm-generate": "vllm", "sglang": "sglang"}


def config_for(flavors: dict[str, tuple[str, str]], dialect: str, **options: Any) -> CoordinatorConfig:
    return pair_config(flavors[DIALECTS[dialect]], dialect=dialect, seed=5, **options)


# The openai clients a test made, closed before its event loop ends.
closing: list[openai.AsyncOpenAI] = []


def run(config: CoordinatorConfig, body: Callable[[Any], Awaitable[None]], **gateway: Any) -> None:
    async def go() -> None:
        async with open_gateway(config, **gateway) as gw:
            try:
                await body(gw)
            finally:
                while closing:
                    await closing.pop().close()

    asyncio.run(go())


def ext(choice: Any) -> dict[str, Any]:
    extra = choice.model_extra if hasattr(choice, "model_extra") else choice
    return dict(extra["dualsample"])


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_openai_client_whole_and_streamed_in_every_dialect(flavors: dict[str, tuple[str, str]], dialect: str) -> None:
    async def body(gw: Any) -> None:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        closing.append(client)
        ask = {"model": "m", "prompt": QUESTION, "max_tokens": 12, "seed": 3, "n": 2, "logprobs": 0,
               "extra_body": {"return_token_ids": True}}  # fmt: skip
        whole = await client.completions.create(**ask)
        assert len(whole.choices) == 2
        for c in whole.choices:
            e = ext(c)
            ids = c.model_extra["token_ids"]
            assert 1 <= len(ids) <= 12 and c.finish_reason in ("stop", "length")
            assert len(c.logprobs.token_logprobs) == len(ids) == len(e["alpha"])
            assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
            assert all(0 <= a <= 1 for a in e["alpha"])
        # choices are keyed by (seed, choice): different draws, same for the same seed
        again = await client.completions.create(**ask)
        assert [c.model_extra["token_ids"] for c in again.choices] == [
            c.model_extra["token_ids"] for c in whole.choices
        ]
        streamed: dict[int, dict[str, Any]] = {}
        async for chunk in await client.completions.create(**ask, stream=True):
            for c in chunk.choices:
                got = streamed.setdefault(c.index, {"text": "", "ids": [], "lp": []})
                got["text"] += c.text
                got["ids"] += c.model_extra.get("token_ids") or []
                if c.logprobs is not None:
                    got["lp"] += c.logprobs.token_logprobs
        for c in whole.choices:
            assert streamed[c.index] == {"text": c.text, "ids": c.model_extra["token_ids"],
                                         "lp": c.logprobs.token_logprobs}  # fmt: skip

        chat = {"model": "m", "messages": [{"role": "user", "content": "Why is the sky blue?"}], "max_tokens": 10,
                "seed": 9, "logprobs": True, "n": 2, "extra_body": {"return_token_ids": True}}  # fmt: skip
        whole_chat = await client.chat.completions.create(**chat)
        parts: dict[int, dict[str, Any]] = {}
        async for chunk in await client.chat.completions.create(**chat, stream=True):
            for c in chunk.choices:
                got = parts.setdefault(c.index, {"text": "", "lp": []})
                got["text"] += c.delta.content or ""
                if c.logprobs is not None and c.logprobs.content:
                    got["lp"] += [x.logprob for x in c.logprobs.content]
        for c in whole_chat.choices:
            assert len(c.logprobs.content) == len(c.model_extra["token_ids"]) >= 1
            assert parts[c.index] == {"text": c.message.content or "", "lp": [x.logprob for x in c.logprobs.content]}

    run(config_for(flavors, dialect), body)


def test_sampling_parameters_apply_to_q_star(flavors: dict[str, tuple[str, str]]) -> None:
    """top_k, top_p, min_p and temperature 0 truncate q* itself: each token is drawn from,
    and reported under, the law after them, whose alternatives (`logprobs` N) are that
    law's most probable tokens; neutral values change nothing."""

    async def body(gw: Any) -> None:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        closing.append(client)

        async def ask(seed: int = 1, logprobs: int = 5, extra_body: dict[str, Any] | None = None, **extra: Any) -> Any:
            # tokens as ids: distinct tokens with the same text would share a key
            body = {"return_tokens_as_token_ids": True, **(extra_body or {})}
            got = await client.completions.create(model="m", prompt=QUESTION, max_tokens=12, seed=seed,
                                                  logprobs=logprobs, extra_body=body, **extra)  # fmt: skip
            return got.choices[0]

        def laws(c: Any) -> list[tuple[float, dict[str, float]]]:
            return list(zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs, strict=True))

        plain = await ask()
        for lp, top in laws(plain):
            # the sampled token is listed with its own log probability; the list is ranked
            assert lp in top.values() and 5 <= len(top) <= 6
            assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-9
        # top_k 1 and temperature 0: the most probable token of q*, with log probability 0
        for extra in ({"extra_body": {"top_k": 1}}, {"temperature": 0}):
            greedy = [await ask(seed=s, **extra) for s in (1, 2)]
            assert greedy[0].text == greedy[1].text  # no randomness left
            for lp, top in laws(greedy[0]):
                assert abs(lp) < 1e-12 and len(top) == 1
        # top_k 3: at most three tokens have mass, and their probabilities sum to 1
        for _, top in laws(await ask(extra_body={"top_k": 3})):
            assert len(top) <= 3 and abs(sum(math.exp(v) for v in top.values()) - 1) < 1e-9
        # top_p 0.5: a few tokens keep all the mass (q*'s 20 most probable do not)
        for _, top in laws(await ask(top_p=0.5, logprobs=20)):
            assert abs(sum(math.exp(v) for v in top.values()) - 1) < 1e-9
        # min_p 0.5: every kept token has at least half the probability of the most probable
        for _, top in laws(await ask(extra_body={"min_p": 0.5}, logprobs=20)):
            assert min(top.values()) >= max(top.values()) + math.log(0.5) - 1e-12
        # neutral values (AReaL's top_k 1e8, prime-rl's -1 and min_p 0) draw what no value draws
        for extra in ({"top_p": 1.0, "extra_body": {"top_k": 10**8, "min_p": 0.0}}, {"extra_body": {"top_k": -1}}):
            same = await ask(**extra)
            assert (same.text, same.logprobs.token_logprobs) == (plain.text, plain.logprobs.token_logprobs)
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model="m", prompt=QUESTION, max_tokens=3, extra_body={"min_tokens": 3})
        assert "min_tokens" in str(err.value)

    run(pair_config(flavors["vllm"], seed=5), body)


def test_id_and_seed_draw_the_generate_record(flavors: dict[str, tuple[str, str]], tmp_path: Path) -> None:
    urls = flavors["vllm"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"id": "q7", "prompt": QUESTION, "teacher_prompt": "Why is the sky blue?"}, {"id": 12, "prompt": QUESTION}]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
         "--input", str(inp), "--output", str(out), "--max-tokens", "20", "--seed", "23", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = {r["id"]: r for r in read_records(out)}

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:
            for line in lines:
                request = {"prompt": line["prompt"], "max_tokens": 20, "logprobs": 0, "id": line["id"], "seed": 1,
                           "return_token_ids": True}  # fmt: skip
                if "teacher_prompt" in line:
                    request["teacher_prompt"] = line["teacher_prompt"]
                async with http.post(gw.url + "/v1/completions", json=request) as resp:
                    assert resp.status == 200, await resp.text()
                    choice = (await resp.json())["choices"][0]
                rec, e = records[line["id"]], choice["dualsample"]
                assert choice["token_ids"] == rec["token_ids"]
                assert choice["text"] == rec["text"]
                assert choice["finish_reason"] == rec["finish_reason"]
                for got, want in [(choice["logprobs"]["token_logprobs"], rec["logq"]), (e["alpha"], rec["alpha"]),
                                  (e["logp_base"], rec["logp_theta"]), (e["logp_teacher"], rec["logp_t"])]:  # fmt: skip
                    assert got == pytest.approx(want, abs=1e-12, rel=0)
                assert e["observed_base"] == rec["observed_theta"] and e["observed_teacher"] == rec["observed_t"]

    run(pair_config(urls, seed=23), body)


def test_choice_keys_are_stated_functions_of_id_seed_and_index() -> None:
    from dualsample_rs.engine.sequence import stable_key

    req = SampleRequest("completions", (), n=3, id="r1")
    assert [choice_key(req, i) for i in range(3)] == [stable_key("r1"), stable_key(("r1", 1)), stable_key(("r1", 2))]
    seeded = SampleRequest("completions", (), n=2, seed=4)
    assert choice_key(seeded, 1) == stable_key(("seed", 4, 1)) != choice_key(seeded, 0)
    assert choice_key(SampleRequest("completions", ()), 0) != choice_key(SampleRequest("completions", ()), 0)


def test_seeded_tokens_do_not_depend_on_what_else_is_in_flight(flavors: dict[str, tuple[str, str]]) -> None:
    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:

            async def ask(prompt: str, seed: int) -> list[int]:
                body = {"prompt": prompt, "max_tokens": 15, "seed": seed, "return_token_ids": True}
                async with http.post(gw.url + "/v1/completions", json=body) as resp:
                    return list((await resp.json())["choices"][0]["token_ids"])

            alone = await ask(QUESTION, 77)
            crowd = await asyncio.gather(*(ask(f"Question: what is {i}?\nAnswer:", i) for i in range(6)),
                                         ask(QUESTION, 77))  # fmt: skip
            assert crowd[-1] == alone

    run(pair_config(flavors["vllm"], seed=5, max_batch_size=4), body)


async def _events(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON events of a streamed answer, in order."""
    async with http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        raw = (await resp.read()).decode()
    return [json.loads(e[len("data: ") :]) for e in raw.split("\n\n") if e.startswith("data: {")]


def test_stream_interval_groups_tokens_as_the_engines_do(flavors: dict[str, tuple[str, str]]) -> None:
    """The gateway's --stream-interval 3: a choice's first token in an event of its own,
    then three per event, the rest with the finish (an event of its own, without tokens,
    when none are left: the end is known only after the last token). A request's stream_interval raises it
    on the OpenAI routes (vLLM's rule: 2 stays 3, 5 makes 5) and replaces it on SGLang's
    /generate (2 makes 2). The events add up to the whole answer."""

    def counts(events: list[dict[str, Any]], key: str) -> dict[int, list[int]]:
        per: dict[int, list[int]] = {}
        for e in events:
            for c in e["choices"]:
                if (ids := c.get(key)) is not None and (ids or c.get("finish_reason")):
                    per.setdefault(c["index"], []).append(len(ids))
        return per

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:
            ask = {"model": "m", "prompt": QUESTION, "max_tokens": 11, "ignore_eos": True, "seed": 4, "n": 2,
                   "logprobs": 1, "return_token_ids": True}  # fmt: skip
            async with http.post(gw.url + "/v1/completions", json=ask) as resp:
                whole = (await resp.json())["choices"]
            for own, sizes in ((2, [1, 3, 3, 3, 1]), (5, [1, 5, 5, 0]), (None, [1, 3, 3, 3, 1])):
                extra = {} if own is None else {"stream_interval": own}
                events = await _events(http, gw.url + "/v1/completions", {**ask, **extra, "stream": True})
                assert counts(events, "token_ids") == {0: sizes, 1: sizes}, own
                for c in whole:
                    mine = [x for e in events for x in e["choices"] if x["index"] == c["index"]]
                    assert "".join(x["text"] for x in mine) == c["text"]
                    assert [i for x in mine for i in x["token_ids"]] == c["token_ids"]
                    lps = [lp for x in mine if x["logprobs"] for lp in x["logprobs"]["token_logprobs"]]
                    assert lps == c["logprobs"]["token_logprobs"]
                    tops = [t for x in mine if x["logprobs"] for t in x["logprobs"]["top_logprobs"]]
                    assert tops == c["logprobs"]["top_logprobs"]
                    alphas = [a for x in mine for a in x["dualsample"]["alpha"]]
                    assert alphas == c["dualsample"]["alpha"]
            chat = {
                "model": "m",
                "messages": [{"role": "user", "content": "Why?"}],
                "max_tokens": 7,
                "ignore_eos": True,
                "seed": 2,
                "stream": True,
                "stream_interval": 5,
                "return_token_ids": True,
            }
            events = await _events(http, gw.url + "/v1/chat/completions", chat)
            assert counts(events, "token_ids") == {0: [1, 5, 1]}
            ids = await gw.coordinator.base.tokenize(QUESTION)
            sgl = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": 7, "ignore_eos": True,
                   "stream_interval": 2, "sampling_seed": 1}}  # fmt: skip
            events = await _events(http, gw.url + "/generate", sgl)
            assert [len(e["output_ids"]) for e in events] == [1, 3, 5, 7, 7]  # the last: with its finish
            assert events[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 7}

    run(pair_config(flavors["vllm"], seed=5), body, options=GatewayOptions(stream_interval=3))


def test_sglang_route_and_vllm_generate_route(flavors: dict[str, tuple[str, str]]) -> None:
    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:
            ids = await gw.coordinator.base.tokenize(QUESTION)
            # slime's body (slime/rollout/sglang_rollout.py)
            slime = {"input_ids": ids, "return_logprob": True, "sampling_params": {
                "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 8, "stop": None,
                "stop_token_ids": None, "skip_special_tokens": False, "no_stop_trim": True,
                "spaces_between_special_tokens": False}}  # fmt: skip
            async with http.post(gw.url + "/generate", json=slime) as resp:
                assert resp.status == 200, await resp.text()
                got = await resp.json()
            meta = got["meta_info"]
            assert 1 <= meta["completion_tokens"] <= 8 and meta["finish_reason"]["type"] in ("stop", "length")
            assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
            assert all(lp <= 0 and isinstance(tid, int) for lp, tid, *_ in meta["output_token_logprobs"])
            # prime-rl / SkyRL: vLLM's tokens-in/out route
            skyrl = {"token_ids": ids, "model": "m", "sampling_params": {"min_tokens": 1, "skip_special_tokens": True,
                     "include_stop_str_in_output": True, "max_tokens": 8, "temperature": 1.0, "top_p": 1.0,
                     "top_k": -1, "min_p": 0.0, "logprobs": 0, "seed": 2}}  # fmt: skip
            async with http.post(gw.url + "/inference/v1/generate", json=skyrl) as resp:
                assert resp.status == 200, await resp.text()
                choice = (await resp.json())["choices"][0]
            assert 1 <= len(choice["token_ids"]) <= 8
            assert len(choice["logprobs"]["content"]) == len(choice["token_ids"])

    run(config_for(flavors, "sglang"), body)


def test_stop_strings_cut_the_text(flavors: dict[str, tuple[str, str]]) -> None:
    async def body(gw: Any) -> None:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        closing.append(client)
        free = await client.completions.create(model="m", prompt=QUESTION, max_tokens=30, seed=8)
        text = free.choices[0].text
        word = next(w for w in text.split() if len(w) >= 2 and w[0].isalpha())
        stop = word[:2]
        cut = await client.completions.create(model="m", prompt=QUESTION, max_tokens=30, seed=8, stop=[stop])
        c = cut.choices[0]
        assert c.text == text[: text.index(stop)] and c.finish_reason == "stop" and c.stop_reason == stop
        streamed = ""
        async for chunk in await client.completions.create(model="m", prompt=QUESTION, max_tokens=30, seed=8,
                                                           stop=[stop], stream=True):  # fmt: skip
            streamed += "".join(x.text for x in chunk.choices)
        assert streamed == c.text

    run(pair_config(flavors["vllm"], seed=5), body)


def test_a_disconnected_client_has_its_sequences_dropped(flavors: dict[str, tuple[str, str]]) -> None:
    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:
            req = {"prompt": QUESTION, "max_tokens": 100000, "ignore_eos": True, "stream": True, "n": 2}
            async with http.post(gw.url + "/v1/completions", json=req) as resp:
                got = 0
                async for _ in resp.content:
                    got += 1
                    if got > 6:
                        break
            assert gw.serving.in_flight >= 1 or gw.metrics.cancelled._value.get() >= 1
            for _ in range(100):
                if gw.serving.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert gw.serving.in_flight == 0
            assert gw.metrics.cancelled._value.get() == 2
            assert gw.coordinator.stats.sequences == 2  # dropped, not left running

    run(pair_config(flavors["vllm"], seed=5), body)


class _Proxy:
    """A TCP proxy on a fixed port in front of a server: `stop` kills it (connections
    refused and those open cut), `start` brings it back on the same port."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.server: asyncio.Server | None = None
        self.port = 0
        self.writers: set[asyncio.StreamWriter] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is None:
            return
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        self.writers.clear()
        await self.server.wait_closed()
        self.server = None


def test_a_killed_teacher_gives_503_naming_it_and_the_gateway_serves_again(flavors: dict[str, tuple[str, str]]) -> None:
    base, teacher = flavors["vllm"]

    async def go() -> None:
        proxy = _Proxy(teacher)
        teacher_url = await proxy.start()
        config = pair_config((base, teacher_url), seed=5, max_retries=0, retry_delay=0.01, request_timeout=5.0)
        try:
            await killed_and_back(proxy, teacher_url, config)
        finally:
            await proxy.stop()

    async def killed_and_back(proxy: _Proxy, teacher_url: str, config: CoordinatorConfig) -> None:
        async with open_gateway(config) as gw, aiohttp.ClientSession() as http:
            body = {"prompt": QUESTION, "max_tokens": 5, "seed": 1}
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
            await proxy.stop()
            async with http.post(gw.url + "/v1/completions", json=body) as resp:
                assert resp.status == 503
                assert teacher_url in (await resp.json())["error"]["message"]
            async with http.get(gw.url + "/metrics") as resp:
                failed = f'dualsample_gateway_upstream_errors_total{{server="{teacher_url}"}} '
                assert any(x.startswith(failed) and float(x.split()[1]) >= 1 for x in (await resp.text()).splitlines())
            async with http.get(gw.url + "/health") as resp:
                assert resp.status == 200  # the base still answers
            await proxy.start()
            for _ in range(40):
                async with http.post(gw.url + "/v1/completions", json=body) as resp:
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.25)
            assert resp.status == 200

    asyncio.run(go())


@contextlib.asynccontextmanager
async def _http_proxy(target: str, answer: Callable[[web.Request], web.Response | None]) -> AsyncIterator[str]:
    """An HTTP proxy in front of `target`: a request `answer` answers (not None) is
    answered there, everything else forwarded."""

    async def handle(request: web.Request) -> web.StreamResponse:
        mine = answer(request)
        if mine is not None:
            return mine
        sent = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with aiohttp.ClientSession() as s, s.request(request.method, target + request.rel_url.path_qs,
                                                           data=await request.read(), headers=sent) as r:  # fmt: skip
            hop = ("content-length", "content-encoding", "transfer-encoding", "connection")
            back = {k: v for k, v in r.headers.items() if k.lower() not in hop}
            return web.Response(body=await r.read(), status=r.status, headers=back)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _base_with_pause(target: str) -> AsyncIterator[tuple[str, list[str]]]:
    """The base behind a proxy that answers the engines' control routes itself
    (recording them)."""
    calls: list[str] = []

    def control(request: web.Request) -> web.Response | None:
        if request.path in ("/pause", "/resume", "/areal_update_weights"):
            calls.append(request.path)
            return web.json_response({"ok": True})
        return None

    async with _http_proxy(target, control) as url:
        yield url, calls


def test_a_server_refusing_a_round_is_a_400_naming_it_and_fails_only_that_request(
    flavors: dict[str, tuple[str, str]],
) -> None:
    """A teacher that answers a round with vLLM's 400 fails the request whose round it
    was with a 400 naming the server and its reason; the next request is served."""
    base, teacher = flavors["vllm"]
    refuse = {"on": False}

    def refusing(request: web.Request) -> web.Response | None:
        if refuse["on"] and request.path == "/v1/completions":
            body = {"error": {"message": "the engine says no", "type": "BadRequestError", "param": None, "code": 400}}
            return web.json_response(body, status=400)
        return None

    async def go() -> None:
        async with _http_proxy(teacher, refusing) as teacher_url:
            config = pair_config((base, teacher_url), seed=5, dialect="vllm-completions")
            async with open_gateway(config) as gw, aiohttp.ClientSession() as http:
                body = {"prompt": QUESTION, "max_tokens": 3, "seed": 1}
                refuse["on"] = True
                async with http.post(gw.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 400
                    message = (await resp.json())["error"]["message"]
                    assert teacher_url in message and "the engine says no" in message
                refuse["on"] = False
                async with http.post(gw.url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200

    asyncio.run(go())


def test_pause_and_resume_pass_through_and_rounds_wait(flavors: dict[str, tuple[str, str]]) -> None:
    base, teacher = flavors["vllm"]

    async def go() -> None:
        async with _base_with_pause(base) as (base_url, calls):
            config = pair_config((base_url, teacher), seed=5, dialect="vllm-completions")
            async with open_gateway(config, passthrough_paths=["/areal_update_weights"]) as gw:
                async with aiohttp.ClientSession() as http:
                    async with http.post(gw.url + "/pause?mode=keep") as resp:
                        assert resp.status == 200
                    assert gw.serving.paused
                    body = {
                        "prompt": QUESTION,
                        "max_tokens": 5,
                        "seed": 1,
                        "ignore_eos": True,
                        "return_token_ids": True,
                    }
                    waiting = asyncio.ensure_future(http.post(gw.url + "/v1/completions", json=body))
                    await asyncio.sleep(0.5)
                    assert not waiting.done()  # rounds wait while the base is paused
                    async with http.post(gw.url + "/areal_update_weights", json={"path": "/x"}) as resp:
                        assert resp.status == 200
                    async with http.post(gw.url + "/resume") as resp:
                        assert resp.status == 200
                    resp = await asyncio.wait_for(waiting, 30)
                    assert resp.status == 200
                    assert len((await resp.json())["choices"][0]["token_ids"]) == 5  # it ran after resume
                    resp.release()
            assert calls == ["/pause", "/areal_update_weights", "/resume"]

    asyncio.run(go())


def test_cli_lists_and_parses_the_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    from dualsample_rs.cli.parsing import main

    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0 and "gateway" in capsys.readouterr().out
    assert main(["gateway", "--port", "70000"]) == 2
    assert "--port: must be in [0, 65535]" in capsys.readouterr().err
    assert main(["gateway", "--stream-interval", "0"]) == 2
    assert "--stream-interval: must be at least 1, got 0" in capsys.readouterr().err


def test_options_given_still_follow_the_base_for_error_shape_and_model(flavors: dict[str, tuple[str, str]]) -> None:
    """Options that leave flavor and model_name out (as the command passes its flags)
    take them from the base: an SGLang base's flat error body."""

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:
            async with http.post(gw.url + "/v1/completions", json={"prompt": "x", "n": 0}) as resp:
                got = await resp.json()
            assert resp.status == 400 and got["object"] == "error" and got["param"] == "n", got
            async with http.post(gw.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}) as resp:
                assert (await resp.json())["model"] == gw.coordinator.base.model

    run(config_for(flavors, "sglang"), body, options=GatewayOptions(max_concurrent_requests=8, stream_interval=2))


def test_metrics_count_the_tokens_of_whole_and_streamed_answers(flavors: dict[str, tuple[str, str]]) -> None:
    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:

            async def generated() -> float:
                async with http.get(gw.url + "/metrics") as resp:
                    lines = (await resp.text()).splitlines()
                return float(
                    next(x for x in lines if x.startswith("dualsample_gateway_generated_tokens_total ")).split()[1]
                )

            counted = 0
            for stream, stop in ((False, None), (True, None), (False, ["\u0000"])):
                req = {
                    "prompt": QUESTION,
                    "max_tokens": 5,
                    "ignore_eos": True,
                    "stream": stream,
                    "seed": 2,
                    "stop": stop,
                }
                async with http.post(gw.url + "/v1/completions", json=req) as resp:
                    assert resp.status == 200
                    await resp.read()
                counted += 5
                assert await generated() == counted, (stream, stop)

    run(pair_config(flavors["vllm"], seed=5), body)


def test_metrics_time_every_call_to_each_server(flavors: dict[str, tuple[str, str]]) -> None:
    """Sampled requests' calls to the base and the teacher are timed per server (failed
    calls are counted per server in test_a_killed_teacher...)."""
    base, teacher = flavors["vllm"]

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:

            async def series(name: str) -> dict[str, float]:
                async with http.get(gw.url + "/metrics") as resp:
                    text = await resp.text()
                out = {}
                for line in text.splitlines():
                    if line.startswith(f"dualsample_gateway_{name}"):
                        key, value = line.rsplit(" ", 1)
                        out[key] = float(value)
                return out

            before = await series("upstream_seconds_count")
            req = {"prompt": QUESTION, "max_tokens": 3, "ignore_eos": True, "seed": 1}
            async with http.post(gw.url + "/v1/completions", json=req) as resp:
                assert resp.status == 200
            after = await series("upstream_seconds_count")
            for url in (base, teacher):
                key = f'dualsample_gateway_upstream_seconds_count{{server="{url}"}}'
                assert after[key] > before.get(key, 0), (url, after)

    run(pair_config(flavors["vllm"], seed=5), body)


@pytest.fixture(scope="module")
def live_gateway(flavors: dict[str, tuple[str, str]]) -> Iterator[str]:
    """A gateway on the reference servers, in an event loop of its own thread, for
    synchronous clients (the fuzzer)."""
    loop = asyncio.new_event_loop()
    url: concurrent.futures.Future[str] = concurrent.futures.Future()
    done = asyncio.Event()

    async def serve() -> None:
        try:
            async with open_gateway(pair_config(flavors["vllm"], seed=5)) as gw:
                url.set_result(gw.url)
                await done.wait()
        except BaseException as err:
            if not url.done():
                url.set_exception(err)
            raise

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        yield url.result(60)
    finally:
        loop.call_soon_threadsafe(done.set)
        thread.join(30)


@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/inference/v1/generate", "/generate"]),
    body=BODIES,
    raw=st.none() | st.binary(max_size=40),
)
def test_fuzzed_bodies_never_fail_the_gateway_on_the_real_sampler(
    live_gateway: str, path: str, body: Any, raw: bytes | None
) -> None:
    """Bodies from the protocol fuzzer, against the round engine: every answer is a 200
    or an engine-shaped 400, and the gateway serves a plain request after each."""
    if isinstance(body, dict) and not {"max_tokens", "max_completion_tokens", "sampling_params"} & set(body):
        body = {**body, "max_tokens": 8}  # a chat body would otherwise run to the context's end
    content = raw if raw is not None else json.dumps(body).encode()
    with httpx.Client(timeout=60) as http:
        resp = http.post(live_gateway + path, content=content, headers={"Content-Type": "application/json"})
        assert resp.status_code in (200, 400), resp.text
        if resp.status_code == 400:
            assert "error" in resp.json()
        ok = http.post(live_gateway + "/v1/completions", json={"prompt": "ok", "max_tokens": 2})
        assert ok.status_code == 200, ok.text


def test_the_frameworks_bodies_on_the_round_engine(live_gateway: str) -> None:
    """The frameworks' own request bodies (their sources are cited beside the same bodies
    in test_gateway_protocol.py), answered by the round engine and read as each client
    reads them: token ids and one log probability per token, each ≤ 0."""
    prompt = list(b"Why is the sky blue?")
    areal = {"top_p": 1.0, "top_k": int(1e8), "max_tokens": 8, "temperature": 1.0, "stop_token_ids": [],
             "ignore_eos": False, "skip_special_tokens": True, "return_tokens_as_token_ids": True, "logprobs": 0,
             "use_beam_search": False, "stream": False, "prompt": prompt}  # fmt: skip
    rllm = {"model": "m", "prompt": "Why is the sky blue?", "max_tokens": 6, "logprobs": True,
            "return_token_ids": True}  # fmt: skip
    prime = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "logprobs": True,
             "top_k": -1, "min_p": 0.0, "return_token_ids": True, "cache_salt": "7"}  # fmt: skip
    sky = {"model": "m", "token_ids": prompt, "sampling_params": {"min_tokens": 1, "skip_special_tokens": True,
           "include_stop_str_in_output": True, "max_tokens": 8, "temperature": 1.0, "top_p": 1.0, "top_k": -1,
           "min_p": 0.0, "logprobs": 0, "stop": None, "n": 1}}  # fmt: skip
    slime = {"input_ids": prompt, "return_logprob": True, "sampling_params": {"temperature": 1.0, "top_p": 1.0,
             "top_k": -1, "max_new_tokens": 9, "stop": None, "stop_token_ids": None, "skip_special_tokens": True,
             "no_stop_trim": True, "spaces_between_special_tokens": False, "sampling_seed": 11}}  # fmt: skip
    with httpx.Client(timeout=60) as http:

        def post(path: str, body: Any) -> Any:
            resp = http.post(live_gateway + path, json=body)
            assert resp.status_code == 200, (path, resp.text)
            return resp.json()

        c = post("/v1/completions", areal)["choices"][0]  # AReaL: "token_id:N" strings and token_logprobs
        tokens = [int(t.split(":")[1]) for t in c["logprobs"]["tokens"]]
        assert len(tokens) == len(c["logprobs"]["token_logprobs"]) > 0
        c = post("/v1/completions", rllm)["choices"][0]  # rLLM: logprobs true reads as 1 alternative
        assert c["prompt_token_ids"] == prompt and len(c["token_ids"]) == len(c["logprobs"]["token_logprobs"]) > 0
        assert all(1 <= len(top) <= 2 for top in c["logprobs"]["top_logprobs"])
        c = post("/v1/chat/completions", prime)["choices"][0]  # prime-rl
        assert len(c["token_ids"]) == len(c["logprobs"]["content"]) > 0
        c = post("/inference/v1/generate", sky)["choices"][0]  # SkyRL
        assert len(c["token_ids"]) == len([x["logprob"] for x in c["logprobs"]["content"]]) > 0
        out = post("/generate", slime)  # slime: meta_info.output_token_logprobs as (logprob, id, text)
        pairs = out["meta_info"]["output_token_logprobs"]
        assert [p[1] for p in pairs] == out["output_ids"] and len(pairs) == out["meta_info"]["completion_tokens"]
        assert all(p[0] <= 0 for p in pairs)


def test_named_teachers_and_a_mixture_per_request_draw_the_generate_records(
    flavors: dict[str, tuple[str, str]], math_teachers: dict[str, str], tmp_path: Path
) -> None:
    """`teacher` and `teachers` in a request route it as those fields route an input line
    of `dualsample generate` with the same named teachers: the same records."""
    base, chat_url = flavors["vllm"]
    math_url = math_teachers["vllm"]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines: list[dict[str, Any]] = [
        {"id": "m", "prompt": QUESTION, "teacher": "math"},
        {"id": "c", "prompt": QUESTION},  # the default teacher
        {"id": "x", "prompt": QUESTION, "teachers": {"chat": 0.25, "math": 0.75}},
    ]
    inp.write_text("".join(json.dumps(x) + "\n" for x in lines))
    done = subprocess.run(
        [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", base, "--teacher", f"chat={chat_url}",
         "--teacher", f"math={math_url}", "--default-teacher", "chat", "--input", str(inp), "--output", str(out),
         "--max-tokens", "12", "--seed", "23", "--quiet"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = {r["id"]: r for r in read_records(out)}
    config = CoordinatorConfig(theta_url=base, teachers={"chat": chat_url, "math": math_url}, default_teacher="chat",
                               seed=23)  # fmt: skip

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:
            for line in lines:
                routing = {k: line[k] for k in ("teacher", "teachers") if k in line}
                request = {"prompt": QUESTION, "max_tokens": 12, "logprobs": 0, "id": line["id"],
                           "return_token_ids": True, **routing}  # fmt: skip
                async with http.post(gw.url + "/v1/completions", json=request) as resp:
                    assert resp.status == 200, await resp.text()
                    choice = (await resp.json())["choices"][0]
                rec, e = records[line["id"]], choice["dualsample"]
                assert choice["token_ids"] == rec["token_ids"], line
                assert choice["logprobs"]["token_logprobs"] == pytest.approx(rec["logq"], abs=1e-12, rel=0)
                assert e["logp_teacher"] == pytest.approx(rec["logp_t"], abs=1e-12, rel=0)
                assert e["teacher"] == {"m": "math", "c": "chat", "x": "chat=0.25,math=0.75"}[line["id"]]
            # The two teachers differ: routing shows in the numbers.
            assert records["m"]["logp_t"] != records["c"]["logp_t"]

    run(config, body)


def test_teacher_messages_and_the_teacher_system_message(flavors: dict[str, tuple[str, str]]) -> None:
    """A chat request's `teacher_messages`, with the gateway's `--teacher-system` put first,
    reach the teacher rendered by its own chat template; the base renders `messages`. The
    same draws as a completions request given both renderings as ids, with the same seed."""
    base, teacher = flavors["vllm"]
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    # Short, and different from the first id on, so that the servers' prompt keys (their
    # first PROMPT_KEY_IDS ids) tell the teacher's prompt from the base's.
    teacher_messages = [{"role": "user", "content": "Hint: Rayleigh scattering. Why is the sky blue?"}]
    system = "T"

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:

            async def rendered(url: str, msgs: list[dict[str, str]]) -> list[int]:
                payload = {"messages": msgs, "add_generation_prompt": True, "add_special_tokens": False}
                async with http.post(url + "/tokenize", json=payload) as resp:
                    return list((await resp.json())["tokens"])

            base_ids = await rendered(base, messages)
            teacher_ids = await rendered(teacher, [{"role": "system", "content": system}, *teacher_messages])
            ask = {"max_tokens": 10, "seed": 4, "logprobs": True, "return_token_ids": True}
            chat_body = {**ask, "messages": messages, "teacher_messages": teacher_messages}
            async with http.post(gw.url + "/v1/chat/completions", json=chat_body) as resp:
                assert resp.status == 200, await resp.text()
                chat = await resp.json()
            # The servers count the prompts they were asked to continue, by their first ids:
            # the teacher was given its own messages after the system message, the base not.
            key = ",".join(map(str, teacher_ids[:PROMPT_KEY_IDS]))
            for url, seen in ((teacher, True), (base, False)):
                async with http.get(url + "/dualsample/prompts") as resp:
                    assert (key in await resp.json()) is seen, url
            plain_body = {**ask, "logprobs": 0, "prompt": base_ids, "teacher_prompt": teacher_ids}
            async with http.post(gw.url + "/v1/completions", json=plain_body) as resp:
                assert resp.status == 200, await resp.text()
                plain = (await resp.json())["choices"][0]
            c = chat["choices"][0]
            assert chat["prompt_token_ids"] == base_ids
            assert c["token_ids"] == plain["token_ids"]
            assert c["dualsample"]["logp_teacher"] == plain["dualsample"]["logp_teacher"]

    run(pair_config((base, teacher), seed=5), body, teacher_system=system)


def test_answers_whole_and_streamed_ask_the_base_no_detokenize_once_pieces_are_known(
    flavors: dict[str, tuple[str, str]],
) -> None:
    """With the reference base's additive tokenizer, an answer's text, whole or streamed,
    comes from the cached pieces: after a first answer has taught them, more answers over
    the same ids cost the base no /detokenize (the sampled check, one in CHECK_EVERY, is
    not reached), and the text is still the base's decode of the token ids. Answers of 24
    tokens: the base's client remembers the texts of id lists of at most DETOKENIZE_IDS."""
    base, teacher = flavors["vllm"]
    prompt = [72, 105, 33, 32]  # "Hi! " in the byte-level vocabulary

    async def body(gw: Any) -> None:
        async with aiohttp.ClientSession() as http:

            async def count() -> int:
                async with http.get(base + "/dualsample/requests") as resp:
                    return int((await resp.json()).get("/detokenize", 0))

            async def answer(stream: bool, seed: int) -> tuple[list[int], str]:
                ask = {"prompt": prompt, "max_tokens": 24, "seed": seed, "return_token_ids": True, "stream": stream}
                async with http.post(gw.url + "/v1/completions", json=ask) as resp:
                    assert resp.status == 200, await resp.text()
                    if not stream:
                        c = (await resp.json())["choices"][0]
                        return c["token_ids"], c["text"]
                    ids, text = [], ""
                    for event in (await resp.text()).split("\n\n"):
                        if event.startswith("data: {"):
                            for c in json.loads(event[6:])["choices"]:
                                ids += c.get("token_ids") or []
                                text += c.get("text") or ""
                    return ids, text

            for stream in (False, True):
                await answer(stream, 1)  # learns the pieces of these draws
                before = await count()
                ids, text = await answer(stream, 1)
                assert len(ids) > DETOKENIZE_IDS
                assert await count() == before, f"stream={stream}: the text was decoded by the base"
                async with http.post(base + "/detokenize", json={"tokens": ids}) as resp:
                    assert text == (await resp.json())["prompt"]

    run(pair_config((base, teacher), seed=5), body)
