"""The gateway's streamed text: from cached token pieces where the base's tokenizer is
additive, else from the whole decode, with stop strings and characters of several
bytes split across tokens. Fake tokenizers stand in for the base's ``/detokenize``:
byte-level (additive), SentencePiece-like (a word's leading space is dropped when it
is decoded alone) and one that cleans up spaces before punctuation."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dualsample_rs.engine.sequence import WorkItem
from dualsample_rs.gateway.engine_sampler import CHECK_EVERY, EngineSampler, _Text
from dualsample_rs.gateway.sampler import Prompt, SampleRequest
from dualsample_rs.io.record import GenerationOutput


class ByteLevel:
    """Ids are UTF-8 bytes: a character of several bytes is several tokens."""

    def __init__(self) -> None:
        self.detokenized = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")


class SentencePieceLike(ByteLevel):
    """Word tokens carry their leading space, which a decode drops at the start."""

    def __init__(self) -> None:
        super().__init__()
        self.words: list[str] = []

    def encode(self, text: str) -> list[int]:
        ids = []
        for i, word in enumerate(text.split(" ")):
            piece = word if i == 0 else " " + word
            if piece not in self.words:
                self.words.append(piece)
            ids.append(self.words.index(piece))
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self.words[i] for i in ids).removeprefix(" ")


class CleansSpaces(ByteLevel):
    def decode(self, ids: list[int]) -> str:
        return super().decode(ids).replace(" .", ".").replace(" ,", ",")


class Base:
    """The base's tokenize and detokenize, counting detokenize calls."""

    def __init__(self, tok: ByteLevel) -> None:
        self.tok = tok
        self.detokenize_calls = 0

    async def tokenize(self, prompt: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(prompt)

    async def detokenize(self, ids: list[int]) -> str:
        self.detokenize_calls += 1
        return self.tok.decode(ids)


class Coord:
    def __init__(self, tok: ByteLevel) -> None:
        self.base = Base(tok)


def _sampler(tok: ByteLevel) -> EngineSampler:
    return EngineSampler(Coord(tok), serving=None)  # type: ignore[arg-type]


def _out(ids: list[int]) -> GenerationOutput:
    n = len(ids)
    return GenerationOutput(
        [1], [1], None, token_ids=list(ids), alpha_history=[0.5] * n, logp_theta=[-1.0] * n, logp_t=[-1.0] * n,
        logq=[-1.0] * n, observed_theta=[True] * n, observed_t=[True] * n, fallback=[False] * n,
    )  # fmt: skip


def _stream(sampler: EngineSampler, ids: list[int], stop: tuple[str, ...] = (), per_round: int = 1) -> list[str]:
    """Feed `ids` to a streamed choice, `per_round` at a time: the text each token sent,
    then what the finishing event sends (the final text past what was sent)."""
    req = SampleRequest(route="completions", prompts=(Prompt(token_ids=(1,)),), stream=True, stop=stop)
    tok: ByteLevel = sampler.coord.base.tok  # type: ignore[attr-defined]

    async def run() -> list[str]:
        text = _Text(sampler, req, WorkItem(0, [1], [1]), None, await sampler.additive())
        out = _out([])
        for start in range(0, len(ids), per_round):
            end = min(start + per_round, len(ids))
            out = _out(ids[:end])
            if await text.take([(out, k, None) for k in range(start, end)]):
                break
        out.finish_reason, out.generated_text = "length", tok.decode(ids)
        sent = [t.text for t in text.tokens]
        final = (await text.result(WorkItem(0, [1], [1]), out)).text
        done = "".join(sent)
        return [*sent, final[len(done) :] if final.startswith(done) else ""]

    return asyncio.run(run())


@pytest.mark.parametrize(("tok", "additive"), [(ByteLevel(), True), (SentencePieceLike(), False),
                                               (CleansSpaces(), False)])  # fmt: skip
def test_the_probe_finds_whether_pieces_add_up(tok: ByteLevel, additive: bool) -> None:
    assert asyncio.run(_sampler(tok).additive()) is additive


TEXTS = ["plain words, then more.", "caf\u00e9 \u4e2d\u6587 \U0001f642 done", "a , b . c 's"]


@pytest.mark.parametrize("per_round", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("tok", [ByteLevel(), SentencePieceLike(), CleansSpaces()], ids=type)
def test_streamed_pieces_concatenate_to_the_decoded_text(tok: ByteLevel, text: str, per_round: int) -> None:
    """Whatever the tokenizer, the texts sent concatenate to the whole decode (what the
    answer that is not streamed holds): by pieces where they add up, else by decoding."""
    sampler = _sampler(tok)
    ids = tok.encode(text)
    sent = _stream(sampler, ids, per_round=per_round)
    assert "".join(sent) == tok.decode(ids)
    # No piece of a character is ever sent alone.
    assert all("\ufffd" not in s for s in sent)


def test_additive_text_needs_no_detokenize_per_step() -> None:
    """Once each token's piece is known, a byte-level stream asks the base nothing per
    step; without pieces (the old way) it would ask once per step."""
    tok = ByteLevel()
    sampler = _sampler(tok)
    ids = tok.encode("abcabcabcabc abc abc")
    _stream(sampler, ids)  # learns the pieces (and runs the probe)
    base: Base = sampler.coord.base  # type: ignore[assignment]
    before = base.detokenize_calls
    assert "".join(_stream(sampler, ids)) == tok.decode(ids)
    assert base.detokenize_calls == before
    # A character of several bytes costs a decode of its run at each of its steps (three
    # bytes: three), and none after it.
    ids = tok.encode("abc\u4e2dabcabc")
    _stream(sampler, ids)
    before = base.detokenize_calls
    _stream(sampler, ids)
    assert base.detokenize_calls - before == 3


@pytest.mark.parametrize("tok", [ByteLevel(), SentencePieceLike()], ids=type)
def test_stop_string_across_tokens_in_either_mode(tok: ByteLevel) -> None:
    sampler = _sampler(tok)
    ids = tok.encode("one two three four five")
    *sent, rest = _stream(sampler, ids, stop=("three f",))
    assert "".join(sent) + rest == "one two "
    # The choice ends at the token that completed the match.
    assert len(sent) == len(tok.encode("one two three f"))


def test_pieces_that_disagree_with_the_final_text_are_dropped() -> None:
    """A choice whose final text is not what the pieces gave turns pieces off."""
    tok = ByteLevel()
    sampler = _sampler(tok)
    assert asyncio.run(sampler.additive())
    req = SampleRequest(route="completions", prompts=(Prompt(token_ids=(1,)),), stream=True)

    async def run() -> Any:
        text = _Text(sampler, req, WorkItem(0, [1], [1]), None, True)
        out = _out(tok.encode("abc"))
        await text.take([(out, k, None) for k in range(3)])
        out.finish_reason = "length"
        out.generated_text = "xyz"  # what the engine decoded: not what was sent
        return await text.result(WorkItem(0, [1], [1]), out)

    assert asyncio.run(run()).text == "xyz"
    assert asyncio.run(sampler.additive()) is False


@pytest.mark.parametrize("per_round", [1, 3, 100])
@pytest.mark.parametrize("tok", [ByteLevel(), SentencePieceLike()], ids=type)
def test_a_stop_string_after_a_split_character_keeps_the_same_tokens_in_any_batch(
    tok: ByteLevel, per_round: int
) -> None:
    """Tokens arriving many at once (speculative rounds, or rounds ahead of the reader)
    keep exactly the tokens up to the one that completed the stop string, also after a
    character of several bytes: what decoding the output at each token would keep."""
    sampler = _sampler(tok)
    ids = tok.encode("caf\u00e9STOP more words")
    *sent, rest = _stream(sampler, ids, stop=("STOP",), per_round=per_round)
    assert len(sent) == len(tok.encode("caf\u00e9STOP"))
    assert "".join(sent) + rest == "caf\u00e9"


class MergedLead(ByteLevel):
    """Byte tokens, plus id 1000: the bytes ``!\\xe4`` (a merge of "!" with the first byte
    of a character of three bytes)."""

    def decode(self, ids: list[int]) -> str:
        return b"".join(b"!\xe4" if i == 1000 else bytes([i]) for i in ids).decode(errors="replace")


@pytest.mark.parametrize("additive", [True, False])
def test_a_stop_string_inside_a_character_not_yet_whole_is_found(additive: bool) -> None:
    """The stop string "!" is in a token whose piece is not whole ("!" and half a
    character), and the output ends there: it is found and cut in either mode."""
    tok = MergedLead()
    sampler = _sampler(tok)
    sampler._additive = additive
    *sent, rest = _stream(sampler, [*tok.encode("ab"), 1000], stop=("!",))
    assert len(sent) == 3 and "".join(sent) + rest == "ab"


def test_whole_answers_text_from_pieces_is_the_decode_and_is_checked() -> None:
    """A whole answer's text comes from its pieces, without a decode, where every piece is
    whole characters, and from one decode where one is not; one in CHECK_EVERY made from
    pieces is decoded after the fact."""
    tok = ByteLevel()
    sampler = _sampler(tok)
    base: Base = sampler.coord.base  # type: ignore[assignment]
    plain, wide = tok.encode("plain words, more words"), tok.encode("caf\u00e9 \u4e2d\u6587")

    async def run() -> None:
        assert await sampler.additive()
        await sampler.text_of(plain)
        await sampler.text_of(wide)  # the pieces are known from here on
        before = base.detokenize_calls
        for _ in range(CHECK_EVERY - 2):
            assert await sampler.text_of(plain) == tok.decode(plain)
        assert base.detokenize_calls == before
        assert await sampler.text_of(wide) == tok.decode(wide)
        assert base.detokenize_calls == before + 1
        assert await sampler.text_of(plain) == tok.decode(plain)  # the CHECK_EVERY-th
        await asyncio.gather(*sampler._checks)
        assert base.detokenize_calls == before + 2

    asyncio.run(run())


class RewritesOneWord(ByteLevel):
    """Additive except for one word its decode rewrites (which the probe does not hold)."""

    def decode(self, ids: list[int]) -> str:
        return super().decode(ids).replace("xyzzy", "plugh")


def test_a_checked_whole_answer_that_disagrees_turns_pieces_off() -> None:
    tok = RewritesOneWord()
    sampler = _sampler(tok)

    async def run() -> None:
        assert await sampler.additive()
        for _ in range(CHECK_EVERY):
            await sampler.text_of(tok.encode("say xyzzy"))
        await asyncio.gather(*sampler._checks)
        assert not await sampler.additive()

    asyncio.run(run())
