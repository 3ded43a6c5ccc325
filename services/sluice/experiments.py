"""Experiments: deterministic arms per user, declared in a versioned file the gateway re-reads.

``SLUICE_GATEWAY_EXPERIMENTS_FILE`` names a JSON file::

    {"version": "2026-12-04.1",
     "experiments": [
       {"name": "mmr", "salt": "mmr-2026-12",
        "arms": [{"name": "control", "weight": 50},
                 {"name": "lambda-07", "weight": 50, "settings": {"diversity_lambda": 0.7}}],
        "shadow": {"name": "tail-04", "settings": {"exposure_tail_share": 0.4}}}]}

* A user's arm is a salted hash: SHA-256 of ``salt``, a NUL and the user id, read as a
  number, modulo the arms' total weight, picks the arm by cumulative weight. The same user
  gets the same arm from every gateway replica and after every restart; a new salt
  reshuffles. A request without a user id gets the first arm (the control, by convention).
* An arm's ``settings`` change the re-ranking of that user's requests: the MMR
  ``diversity_lambda``, ``max_per_brand`` and the ``exposure_tail_share`` target. They reach
  the stage in the request's context (``RerankOverrides``). Several experiments may run at
  once if no two of them change the same setting.
* An arm's ``ranker_model`` ("name" or "name:version") has the fine stage score that
  arm's requests with another Triton ranker, one the stage lists in
  ``SLUICE_FINE_ARM_MODELS`` (an unlisted one is INVALID_ARGUMENT at the stage, and the
  arm's pages degrade to the coarse order): a new model version or a brought model against
  the build's, on live traffic.
* An arm's ``rules`` (a whole merchant rules file, inline, as :mod:`sluice.rules` reads it)
  take the place of the rules file for that arm's users: blocks, the query list, pins and
  boosts. The gateway applies them (they reach the stages as filters, exclusions, pins and
  boosts), and the response's ``rules_version`` names the arm's.
* The ``shadow`` arm is scored for every request of the experiment off the request path
  (:class:`sluice.gateway.shadow.ShadowArms`): its page is logged next to the served one for
  offline comparison, and never shown.
* The response names each experiment and arm (``experiment_arms``), and
  ``sluice_experiment_requests_total`` counts requests per experiment and arm.
* Track labels each event with its user's arms when it arrives (``Event.arms``,
  "experiment=arm,…", kept in the Redis event stream; the file log keeps its format), and
  ``sluice_experiment_events_total`` counts accepted events per arm and event type: the
  conversions an experiment compares.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field, model_validator

from sluice.core.watch import WatchedFile, read_json_file, write_json_file
from sluice.domain import (
    MAX_FUSION_BETA,
    MAX_PER_BRAND,
    MODEL_SPEC,
    FineOverrides,
    RerankOverrides,
)
from sluice.rules import RuleSet, RulesFile

NAME = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
SERVED_ONLY = frozenset({"fusion_beta", "ranker_model", "rules"})  # not in a shadow arm
MAX_EXPERIMENTS = 20
MAX_ARMS = 20

RELOADS = Counter(
    "sluice_experiments_reloads_total", "Experiments file loads, by result (ok, error)", ["result"]
)
LOADED_AT = Gauge(
    "sluice_experiments_loaded_timestamp_seconds", "When the experiments in force were loaded"
)
REQUESTS = Counter(
    "sluice_experiment_requests_total",
    "Search and Recommend requests per experiment arm",
    ["experiment", "arm"],
)
EVENTS = Counter(
    "sluice_experiment_events_total",
    "Track events accepted per experiment arm of their user, by event type",
    ["experiment", "arm", "type"],
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArmSettings(_Strict):
    """What an arm changes; unset fields keep the stages' settings."""

    diversity_lambda: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    max_per_brand: int | None = Field(None, ge=0, le=MAX_PER_BRAND)
    exposure_tail_share: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    fusion_beta: float | None = Field(None, ge=0.0, le=MAX_FUSION_BETA, allow_inf_nan=False)
    ranker_model: str | None = Field(None, pattern=f"^{MODEL_SPEC.pattern}$")
    rules: RulesFile | None = None

    def overrides(self) -> RerankOverrides:
        """The re-ranking stage's part."""
        return RerankOverrides(self.diversity_lambda, self.max_per_brand, self.exposure_tail_share)

    def fine(self) -> FineOverrides:
        """The fine-ranking stage's part."""
        return FineOverrides(self.fusion_beta, self.ranker_model)

    def names(self) -> set[str]:
        return {k for k in type(self).model_fields if getattr(self, k) is not None}


class Arm(_Strict):
    name: str = Field(pattern=NAME)
    weight: int = Field(1, ge=0, le=1_000_000)
    settings: ArmSettings = ArmSettings()


class Experiment(_Strict):
    name: str = Field(pattern=NAME)
    salt: str = Field(min_length=1, max_length=128)
    arms: list[Arm] = Field(min_length=1, max_length=MAX_ARMS)
    shadow: Arm | None = None

    @model_validator(mode="after")
    def _check(self) -> Experiment:
        names = [a.name for a in self.arms] + ([self.shadow.name] if self.shadow else [])
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name}: arm names must be unique")
        if sum(a.weight for a in self.arms) <= 0:
            raise ValueError(f"experiment {self.name}: the arms' weights add up to 0")
        if self.shadow is not None and self.shadow.settings.names() & SERVED_ONLY:
            raise ValueError(
                f"experiment {self.name}: a shadow arm re-ranks the served candidates again, "
                f"so it may change re-ranking settings only (not {', '.join(sorted(SERVED_ONLY))})"
            )
        return self

    def settings_names(self) -> set[str]:
        arms = [*self.arms, *([self.shadow] if self.shadow else [])]
        return set().union(*(a.settings.names() for a in arms))


class ExperimentsFile(_Strict):
    version: str = Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")
    experiments: list[Experiment] = Field(default_factory=list, max_length=MAX_EXPERIMENTS)

    @model_validator(mode="after")
    def _check(self) -> ExperimentsFile:
        seen: dict[str, str] = {}
        names = [e.name for e in self.experiments]
        if len(set(names)) != len(names):
            raise ValueError("experiment names must be unique")
        for e in self.experiments:
            for setting in e.settings_names():
                if setting in seen:
                    raise ValueError(
                        f"experiments {seen[setting]} and {e.name} both change {setting}"
                    )
                seen[setting] = e.name
        return self


class ExperimentsError(ValueError):
    """An experiments file that cannot be used; the message names the file and the field."""


def read_experiments(path: Path) -> ExperimentsFile:
    return read_json_file(path, ExperimentsFile, "experiments", ExperimentsError)


def write_experiments(path: Path, spec: dict[str, object]) -> None:
    write_json_file(path, spec, ExperimentsFile)


def bucket(salt: str, user_id: str, total: int) -> int:
    """The user's place in ``range(total)`` for an experiment salted ``salt``."""
    digest = hashlib.sha256(salt.encode() + b"\0" + user_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") % total


@dataclass(frozen=True)
class Assignment:
    """One request's arms: what to echo, what to apply, what to score in the shadow."""

    arms: tuple[tuple[str, str], ...] = ()  # (experiment, arm)
    rerank: RerankOverrides = field(default_factory=RerankOverrides)
    fine: FineOverrides = field(default_factory=FineOverrides)
    shadows: tuple[tuple[str, str, RerankOverrides], ...] = ()  # (experiment, arm, settings)
    rules: RuleSet | None = None  # the arm's merchant rules, in place of the rules file


class ExperimentSet:
    """The experiments in force."""

    def __init__(self, spec: ExperimentsFile) -> None:
        self.spec = spec
        self.version = spec.version
        self._bounds = [
            [sum(a.weight for a in e.arms[: i + 1]) for i in range(len(e.arms))]
            for e in spec.experiments
        ]
        # one compiled rule set per arm that brings rules (its masks are cached per catalog)
        self._rules = {
            (e.name, a.name): RuleSet(a.settings.rules)
            for e in spec.experiments
            for a in e.arms
            if a.settings.rules is not None
        }

    @classmethod
    def empty(cls) -> ExperimentSet:
        return cls(ExperimentsFile(version="none"))

    def arm(self, experiment: int, user_id: str) -> Arm:
        e, bounds = self.spec.experiments[experiment], self._bounds[experiment]
        if not user_id:
            return e.arms[0]
        place = bucket(e.salt, user_id, bounds[-1])
        return e.arms[next(i for i, b in enumerate(bounds) if place < b)]

    def label(self, user_id: str) -> str:
        """The user's arms as the event stream labels an event: "experiment=arm,…"."""
        return ",".join(
            f"{e.name}={self.arm(i, user_id).name}" for i, e in enumerate(self.spec.experiments)
        )

    def assign(self, user_id: str) -> Assignment:
        if not self.spec.experiments:
            return Assignment()
        arms, shadows = [], []
        settings: dict[str, object] = {}
        rules = None
        for i, e in enumerate(self.spec.experiments):
            arm = self.arm(i, user_id)
            arms.append((e.name, arm.name))
            settings |= {k: getattr(arm.settings, k) for k in arm.settings.names()}
            rules = self._rules.get((e.name, arm.name), rules)
            if e.shadow is not None:
                shadows.append((e.name, e.shadow.name, e.shadow.settings.overrides()))
        merged = ArmSettings.model_validate(settings)
        return Assignment(
            tuple(arms), merged.overrides(), merged.fine(), shadows=tuple(shadows), rules=rules
        )


class ExperimentsWatcher(WatchedFile[ExperimentSet]):
    """The experiments in force, re-read when the file changes (:mod:`sluice.core.watch`)."""

    def __init__(self, path: Path, poll_s: float = 1.0) -> None:
        super().__init__(
            path,
            lambda p: ExperimentSet(read_experiments(p)),
            name="experiments",
            reloads=RELOADS,
            loaded_at=LOADED_AT,
            version=lambda experiments: experiments.version,
            poll_s=poll_s,
        )
