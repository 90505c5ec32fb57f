"""A run's teachers: one lane per named teacher (or the one unnamed teacher), the
mixtures records name, and where each record goes (docs/design.md, section 3.2.1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..backends.replicas import ReplicaSet
from ..config.coordinator import CoordinatorConfig, TeacherSettings, mix_weights, mixture_problem
from ..exceptions import InvalidInputError
from .handshake import ServerInfo
from .sequence import WorkItem


@dataclass
class Lane:
    """One teacher of a run: its settings, replicas, what its handshake found, and the
    stop ids, excluded ids and speculation in effect for its sequences."""

    name: str
    settings: TeacherSettings
    replicas: ReplicaSet
    info: ServerInfo
    stop_ids: tuple[int, ...] = ()
    exclude_ids: tuple[int, ...] = ()
    speculate: int | str = 0

    @property
    def key(self) -> str:
        """What the rounds know its sequences by."""
        return self.name

    @property
    def lanes(self) -> list[Lane]:
        return [self]

    def config(self, cfg: CoordinatorConfig, temperature: float) -> CoordinatorConfig:
        """The run's settings for this teacher's sequences: its own temperature, if it has
        one (times the call's `temperature`)."""
        if self.settings.temperature is None:
            return cfg
        return cfg.replace(temperature_t=self.settings.temperature * temperature)


@dataclass
class Mixture:
    """A mixture of teachers some records are sampled from: its teachers (weight > 0) in
    the run's order with their weights, and the stop and excluded ids of any of them."""

    key: str
    lanes: list[Lane]
    weights: tuple[float, ...]
    stop_ids: tuple[int, ...]
    exclude_ids: tuple[int, ...]

    def weights_by_name(self) -> dict[str, float]:
        return {lane.name: w for lane, w in zip(self.lanes, self.weights, strict=True)}


@dataclass
class Routes:
    """Where each record goes: the lanes by name, the default one, and the mixtures
    records have named so far (made the first time, by key)."""

    config: CoordinatorConfig
    lanes: dict[str, Lane]
    default: str
    mixtures: dict[str, Mixture] = field(default_factory=dict)

    def route(self, item: WorkItem, where: str) -> Lane | Mixture:
        """The teacher or mixture a record names (else the run's mixture, else the default
        teacher); an unknown name, or a mixture the run cannot sample, fails the record
        (`where`: how errors name it)."""
        if item.mix is not None:
            return self.mixture(item.mix, f"{where}teachers")
        name = item.teacher
        if name is None:
            if self.config.mix is not None:
                return self.mixture(dict(self.config.mix), "mix")
            return self.lanes[self.default]
        if not self.config.teachers:
            raise InvalidInputError(f"{where}teacher: the record names teacher {name!r}, but the run has one "
                                    "unnamed teacher (name them with --teacher NAME=URL)")  # fmt: skip
        if not isinstance(name, str) or name not in self.lanes:
            raise InvalidInputError(
                f"{where}teacher: unknown teacher {name!r}; the run's teachers: {', '.join(self.lanes)}"
            )
        return self.lanes[name]

    def mixture(self, value: Any, where: str) -> Mixture:
        """The mixture of teachers `value` names ({name: weight}), checked; teachers at
        weight 0 take no part."""
        if not self.config.teachers:
            raise InvalidInputError(f"{where}: a mixture needs named teachers (--teacher NAME=URL)")
        weights = [(name, w) for name, w in mix_weights(value, tuple(self.lanes), where) if w > 0]
        key = "mix:" + ",".join(f"{name}={w!r}" for name, w in weights)
        if key in self.mixtures:
            return self.mixtures[key]
        problem = mixture_problem(self.config)
        if problem is not None:
            raise InvalidInputError(f"{where}: {problem}")
        lanes = [self.lanes[name] for name, _ in weights]
        mix = Mixture(
            key,
            lanes,
            tuple(w for _, w in weights),
            tuple(sorted({i for lane in lanes for i in lane.stop_ids})),
            tuple(sorted({i for lane in lanes for i in lane.exclude_ids})),
        )
        self.mixtures[key] = mix
        return mix

    def __getitem__(self, key: str) -> Lane | Mixture:
        """A lane or a mixture by its key."""
        return self.lanes[key] if key in self.lanes else self.mixtures[key]
