"""`Joined`: the one-token rounds of `speculate="auto"`'s workers share requests. Driven
by a stand-in strategy that records what it is asked, so the joining, the limit, the
errors and cancellation are each checked without a server."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from dualsample_rs.backends import TopK
from dualsample_rs.engine.strategies import Bundle, Joined
from dualsample_rs.exceptions import APIConnectionError, BadRequestError, Response


class Asked:
    """A strategy whose rows are ints: each row's entry is its own id, so a round can
    tell that it got its own rows back. Requests with a row in `bad` are refused; every
    request takes `seconds`."""

    def __init__(self, serial: bool = False, bad: frozenset[int] = frozenset(), seconds: float = 0.01) -> None:
        self.serial, self.bad, self.seconds = serial, bad, seconds
        self.requests: list[list[int]] = []
        self.in_flight = self.most_in_flight = 0
        self.cancelled = 0
        self.error: BaseException | None = None

    async def __call__(self, rows: list[Any], lengths: list[int], shared: Any = None) -> Bundle:
        assert lengths == [1] * len(rows)
        self.requests.append(list(rows))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1
        if self.error is not None:
            raise self.error
        if self.bad & set(rows):
            raise BadRequestError("a bad row", Response(400, {}, b"", "POST", "http://x/generate"))
        top = TopK(np.array(rows, dtype=np.int64).reshape(-1, 1), np.zeros((len(rows), 1)))
        return Bundle(np.ones(len(rows), dtype=np.int64), top, top)


def _ids(bundle: Bundle) -> list[int]:
    return bundle.base.ids[:, 0].tolist()


def _groups(n: int, size: int) -> list[list[int]]:
    return [list(range(i * size, (i + 1) * size)) for i in range(n)]


def test_rounds_asking_together_share_one_request() -> None:
    async def main() -> tuple[Asked, list[Bundle]]:
        inner = Asked()
        joined = Joined(inner, limit=64)
        got = await asyncio.gather(*(joined(g, [1] * len(g)) for g in _groups(8, 4)))  # type: ignore[arg-type]
        return inner, got

    inner, got = asyncio.run(main())
    assert inner.requests == [list(range(32))]
    assert [_ids(b) for b in got] == _groups(8, 4)


def test_a_request_holds_at_most_limit_sequences() -> None:
    async def main() -> Asked:
        inner = Asked()
        joined = Joined(inner, limit=8)
        await asyncio.gather(*(joined(g, [1] * len(g)) for g in _groups(3, 4)))  # type: ignore[arg-type]
        return inner

    assert asyncio.run(main()).requests == [list(range(8)), list(range(8, 12))]


@pytest.mark.parametrize("serial", [False, True])
def test_one_request_at_a_time_or_two_for_a_serial_strategy(serial: bool) -> None:
    """Rounds that ask while a request is under way wait for it and then go together;
    a strategy asking its servers in series keeps two requests going, as one token per
    step keeps two workers."""

    async def main() -> Asked:
        inner = Asked(serial=serial, seconds=0.05)
        joined = Joined(inner, limit=64)
        first = asyncio.ensure_future(joined([0], [1]))  # type: ignore[list-item]
        await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(joined([i], [1])) for i in (1, 2, 3)]  # type: ignore[list-item]
        await asyncio.sleep(0.01)
        await asyncio.gather(first, *later, joined([4], [1]))  # type: ignore[list-item]
        return inner

    inner = asyncio.run(main())
    if serial:
        assert inner.requests[:2] == [[0], [1, 2, 3]] and inner.most_in_flight == 2
    else:
        assert inner.requests == [[0], [1, 2, 3, 4]] and inner.most_in_flight == 1


def test_a_refused_joined_request_is_asked_again_round_by_round() -> None:
    """A bad sequence fails its own round only, as it would have asking alone."""

    async def main() -> tuple[Asked, list[Any]]:
        inner = Asked(bad=frozenset({5}))
        joined = Joined(inner, limit=64)
        got = await asyncio.gather(*(joined(g, [1] * len(g)) for g in _groups(3, 4)), return_exceptions=True)  # type: ignore[arg-type]
        return inner, got

    inner, got = asyncio.run(main())
    assert inner.requests == [list(range(12)), *_groups(3, 4)]
    assert _ids(got[0]) == [0, 1, 2, 3] and _ids(got[2]) == [8, 9, 10, 11]
    assert isinstance(got[1], BadRequestError)


def test_another_error_is_every_joined_rounds() -> None:
    async def main() -> tuple[Asked, list[Any]]:
        inner = Asked()
        inner.error = APIConnectionError("the server went away")
        joined = Joined(inner, limit=64)
        got = await asyncio.gather(*(joined(g, [1] * len(g)) for g in _groups(3, 4)), return_exceptions=True)  # type: ignore[arg-type]
        return inner, got

    inner, got = asyncio.run(main())
    assert len(inner.requests) == 1 and all(isinstance(g, APIConnectionError) for g in got)


def test_cancelled_rounds_are_not_asked_for() -> None:
    """A round cancelled while it waits is left out of the next request; when every
    round of a request under way is cancelled, the request goes too, and rounds that
    wait behind it are still asked for."""

    async def main() -> tuple[Asked, Bundle]:
        inner = Asked(seconds=0.05)
        joined = Joined(inner, limit=64)
        gone = asyncio.ensure_future(joined([0], [1]))  # type: ignore[list-item]
        await asyncio.sleep(0.01)  # its request is under way
        waiting = asyncio.ensure_future(joined([1], [1]))  # type: ignore[list-item]
        left = asyncio.ensure_future(joined([2], [1]))  # type: ignore[list-item]
        await asyncio.sleep(0)
        left.cancel()
        gone.cancel()
        got = await waiting
        await asyncio.gather(gone, left, return_exceptions=True)
        return inner, got

    inner, got = asyncio.run(main())
    assert inner.requests == [[0], [1]] and inner.cancelled == 1 and _ids(got) == [1]


def test_a_batch_of_several_teachers_asks_alone() -> None:
    """A round given the batch's shared base request does not join (it is already
    shared)."""

    async def main() -> Asked:
        inner = Asked()
        joined = Joined(inner, limit=64)
        shared = object()
        await asyncio.gather(*(joined(g, [1] * len(g), shared) for g in _groups(2, 2)))  # type: ignore[arg-type]
        return inner

    assert asyncio.run(main()).requests == _groups(2, 2)


def test_rounds_cancelled_while_asked_again_take_their_requests_with_them() -> None:
    """The rounds of a refused joined request, cancelled while each is asked again on
    its own: those requests go too, and a round asking later is served."""

    async def main() -> tuple[Asked, Bundle]:
        inner = Asked(bad=frozenset({0}), seconds=0.05)
        joined = Joined(inner, limit=64)
        rounds = [asyncio.ensure_future(joined(g, [1] * len(g))) for g in ([0], [1])]  # type: ignore[arg-type]
        await asyncio.sleep(0.07)  # the joined request was refused; each round is asked again
        assert inner.in_flight == 2
        for r in rounds:
            r.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)
        await asyncio.sleep(0)
        assert inner.in_flight == 0
        return inner, await joined([2], [1])  # type: ignore[list-item]

    inner, got = asyncio.run(main())
    assert inner.requests == [[0, 1], [0], [1], [2]] and inner.cancelled == 2 and _ids(got) == [2]
