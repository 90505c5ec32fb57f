"""Which prompt tokens a real server would serve from its prefix cache, so that the
reference server can report it: full blocks of 16 tokens, each keyed by everything
before it, least recently used dropped first. A prompt entirely in the cache still has
its last token computed, as in vLLM."""

from __future__ import annotations

from collections import OrderedDict

BLOCK = 16


class PrefixCache:
    def __init__(self, capacity_blocks: int = 1 << 18) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def use(self, ids: list[int]) -> int:
        """How many of `ids` the cache serves; the prompt's blocks are cached after."""
        key, cached, hit = 0, 0, True
        for start in range(0, len(ids) - len(ids) % BLOCK, BLOCK):
            key = hash((key, tuple(ids[start : start + BLOCK])))
            if hit and key in self._blocks:
                cached += BLOCK
                self._blocks.move_to_end(key)
            else:
                hit = False
                self._blocks[key] = None
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)
        return min(cached, (len(ids) - 1) // BLOCK * BLOCK)
