"""Running over a Ray cluster (the ``ray`` extra: ``pip install 'dualsample_rs[ray]'``).

:class:`DualSample` is a callable class for Ray Data's ``map_batches``: each actor runs a
coordinator, with its own event loop, over the batches it is given::

    ray.data.read_json("prompts.jsonl").map_batches(
        DualSample, fn_constructor_kwargs={"config": {"theta_url": [...], "t_url": [...]}},
        concurrency=4, batch_size=256,
    ).write_parquet("samples/")

Every draw is keyed by (seed, record id, position), so the records do not depend on how
the work is split or retried: a Ray run gives the same records as a single process.
Input rows need an ``id`` (there are no line numbers to default to).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import zlib
from typing import Any

import numpy as np

from .config.coordinator import CoordinatorConfig
from .engine.coordinator import Coordinator
from .engine.sequence import WorkItem, stable_key
from .exceptions import InvalidInputError
from .io.input_file import Fields
from .io.record import GenerationOutput
from .io.schema import FIELDS, from_row, produced, run_conditions


def _plain(value: Any) -> Any:
    """A Python value from what Ray Data hands over (numpy scalars and arrays)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _share(urls: str | tuple[str, ...], index: int, actors: int) -> str | tuple[str, ...]:
    """This actor's share of a model's replicas: all of them when there are fewer
    replicas than actors, else every `actors`-th one from `index`."""
    if isinstance(urls, str) or len(urls) < actors:
        return urls
    mine = urls[index % actors :: actors]
    return mine[0] if len(mine) == 1 else mine


class DualSample:
    """A Ray Data ``map_batches`` class: batches of prompt rows in, record rows out.

    Args:
        config: a `CoordinatorConfig`, or its fields as a dict.
        max_tokens, temperature, teacher_chat, diagnostics: as for
            :meth:`Coordinator.iter_generate`.
        prompt_field, teacher_field: the input columns (the teacher's defaults to the prompt).
        actors: how many actors share the replicas; each takes its share of them (by a
            hash of its actor id), or all when there are fewer replicas than actors.
    """

    def __init__(
        self,
        config: CoordinatorConfig | dict[str, Any],
        max_tokens: int = 100,
        temperature: float = 1.0,
        teacher_chat: bool = False,
        diagnostics: bool = False,
        prompt_field: str = "prompt",
        teacher_field: str = "teacher_prompt",
        actors: int = 1,
        route_field: str = "teacher",
    ) -> None:
        cfg = config if isinstance(config, CoordinatorConfig) else CoordinatorConfig(**config)
        if actors > 1:
            index = _actor_index()
            cfg = cfg.replace(
                theta_url=_share(cfg.transport.theta_url, index, actors),
                t_url=_share(cfg.transport.t_url, index, actors),
                teachers=tuple(
                    (name, dataclasses.replace(t, urls=_share(t.urls, index, actors))) for name, t in cfg.teachers
                ),
            )
        self.fields = Fields.of(cfg.teachers, route_field)
        self.max_tokens, self.temperature = max_tokens, temperature
        self.teacher_chat, self.diagnostics = teacher_chat, diagnostics
        self.prompt_field, self.teacher_field = prompt_field, teacher_field
        self.loop = asyncio.new_event_loop()
        self.coord = Coordinator(cfg)
        self.loop.run_until_complete(self.coord.start())
        # The record's fields as columns; the nested ones go as JSON text.
        self.columns = tuple(f.name for f in produced(run_conditions(cfg, bool(self.coord.speculate))))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        if "id" not in batch:
            raise InvalidInputError("the input rows need an 'id' column")
        ids = _plain(batch["id"])
        prompts = _plain(batch[self.prompt_field])
        teacher = _plain(batch[self.teacher_field]) if self.teacher_field in batch else prompts
        n = len(ids)
        fields = self.fields
        routes = _plain(batch[fields.route]) if fields.route in batch else [None] * n
        mixes = _plain(batch[fields.mix]) if fields.mix in batch else [None] * n
        own = [
            {name: v for name, f in fields.own if f in batch and (v := _plain(batch[f][j])) is not None} or None
            for j in range(n)
        ]
        items = [
            WorkItem(stable_key(i), p, p if t is None else t, i, self.teacher_chat, teacher=r, teacher_prompts=o, mix=m)
            for i, p, t, r, o, m in zip(ids, prompts, teacher, routes, own, mixes, strict=True)
        ]
        outs = self.loop.run_until_complete(self._generate(items))
        records = [_row(o) for o in outs]
        return {name: [r.get(name) for r in records] for name in self.columns}

    async def _generate(self, items: list[WorkItem]) -> list[GenerationOutput]:
        outs: list[GenerationOutput | None] = [None] * len(items)
        async for index, out in self.coord.iter_generate(
            items, self.max_tokens, self.temperature, self.diagnostics, show_progress=False
        ):
            outs[index] = out
        return [o for o in outs if o is not None]

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None and not loop.is_closed():
            loop.run_until_complete(self.coord.aclose())
            loop.close()


def _row(out: GenerationOutput) -> dict[str, Any]:
    record = out.to_record()
    for f in FIELDS:
        if f.json_text_in_ray and f.name in record:
            record[f.name] = json.dumps(record[f.name])
    return record


def record_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """A record as `dualsample generate` writes it, from a row `DualSample` returned."""
    return from_row({name: _plain(value) for name, value in row.items()}, decode_json=True)


def _actor_index() -> int:
    import ray

    return zlib.crc32((ray.get_runtime_context().get_actor_id() or "").encode())
