"""`speculate="auto"`: whether a round drafts (and how many tokens) or makes one token
per sequence, chosen from what each kind of round has been measured to yield per
second on these servers, as the run goes.

Whether drafting pays is a property of the engines, not of the sampler: against servers
whose time is a round trip (the reference servers with latency) a drafting round's
extra positions are almost free and it makes up to 3x the tokens per second; on a
compute-bound CPU engine every position scored costs a forward pass, and the same
rounds ran at a third to a half of one token per step in some runs
(docs/engine-time.md). So `Pace` measures instead
of assuming: each round reports its wall time and the tokens it made, and the fastest
kind is chosen, with a bounded share of rounds of the others so that a change (a
neighbour's load, longer contexts) is noticed. The draft length is one of the kinds:
a cost model of a drafted position (what an earlier `auto` assumed, a tenth of a round
trip) is wrong both ways, since a drafting round is two round trips in series where a
one-token round's two requests run side by side, and on a CPU engine a position costs
about as much as a round trip.

Choices come in blocks of rounds of one kind. With several workers a round of one kind
waits behind the others' requests on the same servers, so a lone probe round among
rounds of another kind would measure their queue, not its own cost (a one-token round
queued behind drafts of five positions looks as slow as they are); a block of four
rounds per worker runs its middle half with only rounds of its kind beside them, and
only such rounds are measured. Exploration is bounded by round time as well as by
rounds, since on a CPU engine a drafting round can take ten times a one-token round,
and a block that explores, or leaves the kind in use, ends early once it has measured
slower than the best kind.

Everything here is a function of the calls made to it, so tests drive it with
synthetic timings; the records do not depend on it but for their `round` and `drafted`
lists (`Round` draws every position of an ``auto`` run alike, whatever its kind of
round; see round.py).
"""

from __future__ import annotations

from ..exceptions import InvalidInputError

# The kinds of round: K drafted tokens per sequence, 0 for one token per sequence. Few
# values, since SGLang takes one generation length per request.
ARMS = (0, 4, 2, 8)
# Kinds tried in a block each at the start (the first of ARMS); the others are first
# tried by exploration, so that where drafting does not pay, the start costs one block
# of it rather than three.
FIRST = 2
# Rounds per block of one kind when the coordinator does not say (it gives 4 per worker,
# see `block_for`).
BLOCK = 32
# At most one block in PERIOD, and 1/PERIOD of the round time, explores a kind not
# chosen (after the first blocks).
PERIOD = 16
# A block on trial ends after one measured round below this share of the best other
# kind's rate (else after two below it).
FAR_SLOWER = 0.5
# Weight of a new measurement in each kind's moving averages (about the last 1/WEIGHT
# measured rounds count).
WEIGHT = 0.2


def block_for(workers: int) -> int:
    """Rounds per block for `workers` concurrent batches: four each, so that the
    middle half of a block's rounds run with no round of another kind beside them
    (those of the block before have ended; those of the next have not begun)."""
    return 4 * max(1, workers)


class Pace:
    """Chooses each round's kind (K drafts, 0: one token) from measured tokens per
    second of round time.

    Args:
        arms: the kinds, as drafted tokens per sequence (0: one token per step).
        first: how many of them (in order) get a block each at the start.
        block: rounds per block of one kind.
        period: after the start, one block in `period` at most explores a kind not
            chosen (one never measured first, else each in turn), and only once the
            rounds since the last exploration took `period` − 1 times as long as its
            rounds did: exploration is at most 1/`period` of the rounds and of the
            round time.
        weight: weight of a new measurement in the moving averages.
        joined: rounds of one token per sequence (K = 0) that go together in one
            request (`strategies.Joined`: every worker's), and so end together with
            one time between them: each counts as 1/`joined` of a measurement, so
            that one slow request weighs as one round does, not as `joined`.

    `choose` returns the next round's K; the round calls `start` as it begins and then
    ``observe(k, seconds, tokens, lap)`` with the lap `start` gave. A first kind left
    unmeasured by its block (every round ran beside another kind's) gets a block again,
    once per first kind at most. From then on the kind with the highest moving average
    of tokens per second is chosen (ties: the one listed first). A block on trial ends
    early once two of its rounds were measured slower than the best other kind's rate
    (one, at under `FAR_SLOWER` of it), and what it measured then replaces its kind's
    older figures: a kind that loses costs little to look at. A block is on trial when
    it explores (or tries a kind at the start), and when it leaves the kind that last
    ran a whole block, since it was chosen for a figure that may be old: the kind in
    use slows as contexts grow and is measured as it does, while the others' figures
    stay as they were when explored.
    """

    def __init__(
        self,
        arms: tuple[int, ...] = ARMS,
        first: int = FIRST,
        block: int = BLOCK,
        period: int = PERIOD,
        weight: float = WEIGHT,
        joined: int = 1,
    ) -> None:
        if len(arms) < 2 or len(set(arms)) != len(arms) or any(not isinstance(k, int) or k < 0 for k in arms):
            raise InvalidInputError(f"arms: two or more distinct draft lengths >= 0, got {arms!r}")
        for name, value in (("first", first), ("block", block), ("period", period), ("joined", joined)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInputError(f"{name}: must be a positive integer, got {value!r}")
        if first > len(arms):
            raise InvalidInputError(f"first: at most the {len(arms)} arms, got {first!r}")
        if period < 2:
            raise InvalidInputError(f"period: must be at least 2 (one block in it explores), got {period!r}")
        if not isinstance(weight, (int, float)) or not 0 < weight <= 1:
            raise InvalidInputError(f"weight: must lie in (0, 1], got {weight!r}")
        self.arms, self.first, self.block = tuple(arms), first, block
        self.period, self.weight = period, float(weight)
        # The weight of one of `joined` rounds that together make one measurement.
        self._joined_weight = 1 - (1 - self.weight) ** (1 / joined)
        #: rounds chosen of each kind
        self.rounds: dict[int, int] = dict.fromkeys(self.arms, 0)
        #: rounds measured of each kind (the others ran beside a round of another kind)
        self.measured: dict[int, int] = dict.fromkeys(self.arms, 0)
        #: seconds of round time spent exploring (with the start's blocks) and choosing
        self.seconds = {"exploring": 0.0, "chosen": 0.0}
        # Moving averages of a measured round's seconds and tokens, per kind (None: none yet).
        self._seconds: dict[int, float | None] = dict.fromkeys(self.arms, None)
        self._tokens: dict[int, float | None] = dict.fromkeys(self.arms, None)
        self._kind = self.arms[0]  # the current block's
        self._left = 0  # rounds left in it
        self._block = 0  # blocks begun
        self._exploring = False  # the current block explores (or tries a kind at the start)
        self._settled: int | None = None  # the kind of the last block that ran to its end
        self._here = [0, 0.0, 0.0]  # the current block's measured rounds, their seconds, tokens
        self._begun = 0  # blocks begun at the start (the first kinds, and their retries)
        self._since = 0  # blocks chosen since the last exploration
        self._since_seconds = 0.0  # their round time
        self._explored_seconds = 0.0  # round time of the last exploration (and the start's)
        self._turn = 0  # exploration blocks of measured kinds so far
        # A round is measured when no round of another kind ran beside it: none in
        # flight when it began, none begun before it ended.
        self._in_flight: dict[int, int] = dict.fromkeys(self.arms, 0)
        self._begun_of: dict[int, int] = dict.fromkeys(self.arms, 0)
        self._begun_all = 0

    def rate(self, k: int) -> float | None:
        """Tokens per second of round time of kind `k` (moving averages), None before
        its first measured round."""
        seconds, tokens = self._seconds[k], self._tokens[k]
        if seconds is None or tokens is None:
            return None
        return tokens / max(seconds, 1e-9)

    def faster(self, among: tuple[int, ...] | None = None) -> int:
        """The measured kind with the highest rate (ties, and nothing measured yet: the
        first listed), among `among` (every kind)."""
        arms = self.arms if among is None else among
        rates = [(r, -i, k) for i, k in enumerate(arms) if (r := self.rate(k)) is not None]
        return max(rates)[2] if rates else arms[0]

    def choose(self) -> int:
        """The next round's K (see the class)."""
        cut = self._left > 0 and self._on_trial() and self._losing()
        if self._left == 0 or cut:
            if cut:  # what the block measured replaces its kind's older figures
                n, seconds, tokens = self._here
                self._seconds[self._kind], self._tokens[self._kind] = seconds / n, tokens / n
            elif self._block:
                self._settled = self._kind
            self._kind = self._next_block()
            self._left = self.block
            self._block += 1
            self._here = [0, 0.0, 0.0]
        self._left -= 1
        self.rounds[self._kind] += 1
        return self._kind

    def _on_trial(self) -> bool:
        """The current block explores, or leaves the kind that last ran a whole block.
        A block chosen for a kind's rate measured long ago (a kind in use slows as
        contexts grow, the others' figures stay as they were) is a trial too, so that
        a stale figure costs a few rounds, not a block."""
        return self._exploring or (self._settled is not None and self._kind != self._settled)

    def _losing(self) -> bool:
        """The block's kind measured slower than the best other kind over two rounds or
        more of this block, or at under half its rate over one (on a CPU engine a
        losing drafting round takes about ten one-token rounds' time: one is enough)."""
        n, seconds, tokens = self._here
        others = tuple(k for k in self.arms if k != self._kind)
        best = self.rate(self.faster(others))
        if not n or best is None:
            return False
        rate = tokens / max(seconds, 1e-9)
        return rate < (best if n >= 2 else best * FAR_SLOWER)

    def _next_block(self) -> int:
        self._exploring = True
        if self._begun < self.first:
            self._begun += 1
            return self.arms[self._begun - 1]
        firsts = self.arms[: self.first]
        unmeasured = [k for k in firsts if self.rate(k) is None]
        if unmeasured and self._begun < 2 * self.first:
            self._begun += 1
            return unmeasured[0]
        best = self.faster()
        if self._since < self.period - 1 or self._since_seconds < (self.period - 1) * self._explored_seconds:
            self._exploring = False
            self._since += 1
            return best
        self._since, self._since_seconds, self._explored_seconds = 0, 0.0, 0.0
        others = [k for k in self.arms if k != best]
        never = [k for k in others if self.rate(k) is None]
        if never:
            return never[0]
        self._turn += 1
        return others[(self._turn - 1) % len(others)]

    def start(self, k: int) -> tuple[int, bool, int, bool]:
        """A round of kind `k` begins: its lap, for `observe`."""
        alone = all(n == 0 for j, n in self._in_flight.items() if j != k)
        lap = (self._begun_all - self._begun_of[k], alone, self._block, self._exploring)
        self._in_flight[k] += 1
        self._begun_of[k] += 1
        self._begun_all += 1
        return lap

    def observe(self, k: int, seconds: float, tokens: int, lap: tuple[int, bool, int, bool] | None = None) -> None:
        """A round of kind `k` took `seconds` and made `tokens` (over its batch). With
        the `lap` of `start`, the round ends, and is measured only if no round of
        another kind ran beside it; without, it is (a caller running one round at a
        time, in the current block)."""
        block, exploring = (self._block, self._exploring) if lap is None else lap[2:]
        if seconds > 0:  # the time it took counts towards the next exploration either way
            if exploring:
                self._explored_seconds += seconds
                self.seconds["exploring"] += seconds
            else:
                self._since_seconds += seconds
                self.seconds["chosen"] += seconds
        if lap is not None:
            self._in_flight[k] -= 1
            others_begun, alone = lap[:2]
            if not alone or self._begun_all - self._begun_of[k] != others_begun:
                return
        if not seconds > 0 or tokens < 0:
            return  # nothing to learn from a round that took no time
        self.measured[k] += 1
        if block == self._block and k == self._kind:
            self._here[0] += 1
            self._here[1] += seconds
            self._here[2] += tokens
        w = self._joined_weight if k == 0 else self.weight
        old_s, old_t = self._seconds[k], self._tokens[k]
        self._seconds[k] = seconds if old_s is None else (1 - w) * old_s + w * seconds
        self._tokens[k] = tokens if old_t is None else (1 - w) * old_t + w * tokens

    def summary(self) -> dict[int, dict[str, float | int | None]]:
        """Per kind (K): rounds chosen, rounds measured, and tokens per second of round time."""
        return {k: {"rounds": self.rounds[k], "measured": self.measured[k], "tokens_per_second": self.rate(k)}
                for k in self.arms}  # fmt: skip
