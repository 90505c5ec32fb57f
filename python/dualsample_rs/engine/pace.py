"""`speculate="auto"`: whether a round drafts (and how many tokens) or makes one token
per sequence, chosen from what each kind of round has been measured to yield per
second on these servers, as the run goes.

Whether drafting pays is a property of the engines, not of the sampler: against servers
whose time is a round trip (the reference servers with latency) a drafting round's
extra positions are almost free and it makes 2-3x the tokens per second; on a
compute-bound CPU engine every position scored costs a forward pass and the same rounds
ran at a third of one token per step (docs/engine-time.md). So `Pace` measures instead
of assuming: each round reports its wall time and the tokens it made, and the fastest
kind is chosen, with a bounded share of rounds of the others so that a change (a
neighbour's load, longer contexts) is noticed. The draft length is one of the kinds:
a cost model of a drafted position (what an earlier `auto` assumed, a tenth of a round
trip) is wrong both ways, since a drafting round is two round trips in series where a
one-token round's two requests run side by side, and on a CPU engine a position costs
about as much as a round trip.

Choices come in blocks of `block` rounds of one kind. With several workers a round of
one kind waits behind the others' requests on the same servers, so a lone probe round
among rounds of the other kind would measure their queue, not its own cost; a block
long enough for every worker's rounds to be of its kind is measured as that kind runs.
Rounds that ran beside a round of another kind are not measured.

Everything here is a function of the calls made to it, so tests drive it with
synthetic timings; the records never depend on it (`Round` draws every position of an
``auto`` run as one token per step would, see round.py).
"""

from __future__ import annotations

from ..exceptions import InvalidInputError

# The kinds of round: K drafted tokens per sequence, 0 for one token per sequence. Few
# values, since SGLang takes one generation length per request.
ARMS = (0, 2, 4, 8)
# Rounds per block of one kind: twice the workers of a speculative run
# (coordinator.SPECULATION_WORKERS), so that about half of a block's rounds run with
# only rounds of their kind beside them.
BLOCK = 16
# One block in PERIOD goes to a kind not chosen (in turn): at most 1/16 of the rounds
# after the first blocks (one of each kind) are exploration.
PERIOD = 16
# Weight of a new measurement in each kind's moving averages (about the last 1/WEIGHT
# measured rounds count).
WEIGHT = 0.2


class Pace:
    """Chooses each round's kind (K drafts, 0: one token) from measured tokens per
    second of round time.

    Args:
        arms: the kinds, as drafted tokens per sequence (0: one token per step).
        block: rounds per block of one kind.
        period: blocks per cycle after the first ones; the cycle's last block is a
            kind not chosen, each in turn (exploration: 1/`period` of the rounds).
        weight: weight of a new measurement in the moving averages.

    `choose` returns the next round's K; the round calls `start` as it begins and then
    ``observe(k, seconds, tokens, lap)`` with the lap `start` gave. The first blocks try
    each kind once, in order; from then on the kind with the higher moving average of
    tokens per second is chosen (ties: the one listed first).
    """

    def __init__(
        self, arms: tuple[int, ...] = ARMS, block: int = BLOCK, period: int = PERIOD, weight: float = WEIGHT
    ) -> None:
        if len(arms) < 2 or len(set(arms)) != len(arms) or any(not isinstance(k, int) or k < 0 for k in arms):
            raise InvalidInputError(f"arms: two or more distinct draft lengths >= 0, got {arms!r}")
        for name, value in (("block", block), ("period", period)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name}: must be a positive integer, got {value!r}")
        if period < 2:
            raise InvalidInputError(f"period: must be at least 2 (one block in it explores), got {period!r}")
        if not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise InvalidInputError(f"weight: must lie in (0, 1], got {weight!r}")
        self.arms, self.block, self.period, self.weight = tuple(arms), block, period, float(weight)
        #: rounds chosen of each kind
        self.rounds: dict[int, int] = dict.fromkeys(self.arms, 0)
        #: rounds measured of each kind (the others ran beside a round of another kind)
        self.measured: dict[int, int] = dict.fromkeys(self.arms, 0)
        # Moving averages of a measured round's seconds and tokens, per kind (None: none yet).
        self._seconds: dict[int, float | None] = dict.fromkeys(self.arms, None)
        self._tokens: dict[int, float | None] = dict.fromkeys(self.arms, None)
        self._chosen = 0
        self._probes = 0
        self._kind = self.arms[0]  # the current block's
        # A round is measured when no round of another kind ran beside it: none in
        # flight when it started, none started since.
        self._in_flight: dict[int, int] = dict.fromkeys(self.arms, 0)
        self._started: dict[int, int] = dict.fromkeys(self.arms, 0)
        self._started_all = 0

    def rate(self, k: int) -> float | None:
        """Tokens per second of round time of kind `k` (moving averages), None before
        its first measured round."""
        seconds, tokens = self._seconds[k], self._tokens[k]
        if seconds is None or tokens is None:
            return None
        return tokens / max(seconds, 1e-9)

    def faster(self) -> int:
        """The measured kind with the highest rate (ties, and nothing measured yet: the
        first listed)."""
        rates = [(r, -i, k) for i, k in enumerate(self.arms) if (r := self.rate(k)) is not None]
        return max(rates)[2] if rates else self.arms[0]

    def choose(self) -> int:
        """The next round's K. Blocks: each kind once, in order; then in each cycle of
        `period` blocks, `period` − 1 of the fastest kind (as measured when the block
        begins) and one of another, each in turn."""
        n = self._chosen
        self._chosen += 1
        if n % self.block == 0:
            b = n // self.block
            if b < len(self.arms):
                self._kind = self.arms[b]
            else:
                best = self.faster()
                self._kind = best
                if (b - len(self.arms)) % self.period == self.period - 1:
                    others = [k for k in self.arms if k != best]
                    self._kind = others[self._probes % len(others)]
                    self._probes += 1
        self.rounds[self._kind] += 1
        return self._kind

    def start(self, k: int) -> tuple[int, bool]:
        """A round of kind `k` begins: its lap, for `observe`."""
        others_started = self._started_all - self._started[k]
        alone = all(n == 0 for kind, n in self._in_flight.items() if kind != k)
        self._in_flight[k] += 1
        self._started[k] += 1
        self._started_all += 1
        return others_started, alone

    def observe(self, k: int, seconds: float, tokens: int, lap: tuple[int, bool] | None = None) -> None:
        """A round of kind `k` took `seconds` and made `tokens` (over its batch). With
        the `lap` of `start`, the round ends, and counts only if no round of another
        kind ran beside it; without, it counts (a caller running one round at a time)."""
        if lap is not None:
            self._in_flight[k] -= 1
            others_started, alone = lap
            if not alone or self._started_all - self._started[k] != others_started:
                return
        if not seconds > 0 or tokens < 0:
            return  # nothing to learn from a round that took no time
        self.measured[k] += 1
        w = self.weight
        old_s, old_t = self._seconds[k], self._tokens[k]
        self._seconds[k] = seconds if old_s is None else (1 - w) * old_s + w * seconds
        self._tokens[k] = tokens if old_t is None else (1 - w) * old_t + w * tokens

    def summary(self) -> dict[int, dict[str, float | int | None]]:
        """Per kind (K): rounds chosen, rounds measured, and tokens per second of round time."""
        return {k: {"rounds": self.rounds[k], "measured": self.measured[k], "tokens_per_second": self.rate(k)}
                for k in self.arms}  # fmt: skip
