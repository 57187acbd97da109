"""Plan: which sub-blocks to skip and which skipped ones re-use a kept sub-block's weights."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PLAN_VERSION = 1


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass(frozen=True)
class Plan:
    """Skip set + re-use map over sub-block indices (even = MHA, odd = FFN, in execution order).

    `reuse[i] = j`: skipped sub-block i is computed with kept sub-block j's weights (zero extra memory).
    `order` is the order in which a search chose the skips, `scores` its discrepancy after each step.
    `fingerprint` identifies the model architecture the plan was made for (see EncoderGraph.fingerprint).
    """

    skip: tuple[int, ...] = ()
    reuse: Mapping[int, int] = field(default_factory=dict)
    method: str = "manual"
    order: tuple[int, ...] | None = None
    scores: tuple[float, ...] | None = None
    fingerprint: str | None = None
    info: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        try:
            skip = tuple(sorted(int(i) for i in self.skip))
            reuse = {int(k): int(v) for k, v in dict(self.reuse).items()}
        except (TypeError, ValueError) as e:
            raise PlanError(f"skip must be a list of ints and reuse a {{int: int}} map: {e}") from e
        if len(set(skip)) != len(skip):
            raise PlanError(f"skip lists a sub-block twice: {list(self.skip)}")
        if any(i < 0 for i in skip):
            raise PlanError(f"sub-block indices are >= 0, got skip={list(skip)}")
        for i, j in reuse.items():
            if i not in skip:
                raise PlanError(f"reuse[{i}] = {j}: sub-block {i} is not skipped (only skipped ones re-use)")
            if j in skip:
                raise PlanError(f"reuse[{i}] = {j}: the source sub-block {j} is itself skipped; it must be kept")
        order = None if self.order is None else tuple(int(i) for i in self.order)
        if order is not None and sorted(order) != list(skip):
            raise PlanError(f"order {list(order)} must list exactly the skipped sub-blocks {list(skip)}")
        scores = None if self.scores is None else tuple(float(s) for s in self.scores)
        object.__setattr__(self, "skip", skip)
        object.__setattr__(self, "reuse", dict(sorted(reuse.items())))
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "info", dict(self.info))

    def __hash__(self):
        return hash((self.skip, tuple(self.reuse.items()), self.method, self.fingerprint))

    @property
    def removed(self) -> tuple[int, ...]:
        """Sub-blocks whose own weights leave the model (skipped, re-used or not)."""
        return self.skip

    def validate(self, blocks: Sequence, fingerprint: str | None = None) -> Plan:
        """Check the plan against a block table (and the model's fingerprint); return it unchanged."""
        n = len(blocks)
        bad = [i for i in self.skip if i >= n]
        if bad:
            raise PlanError(f"sub-block indices {bad} out of range: this model has {n} sub-blocks (0..{n - 1})")
        for i, j in self.reuse.items():
            if j >= n:
                raise PlanError(f"reuse[{i}] = {j}: out of range (0..{n - 1})")
            if blocks[i].kind != blocks[j].kind:
                raise PlanError(
                    f"reuse[{i}] = {j}: sub-block {i} is {blocks[i].kind} but {j} is {blocks[j].kind}; "
                    "re-use needs the same kind"
                )
        if len(self.skip) == n:
            raise PlanError(f"the plan skips all {n} sub-blocks; nothing of the encoder would remain")
        if fingerprint and self.fingerprint and fingerprint != self.fingerprint:
            raise PlanError(
                f"this plan was made for another model (plan fingerprint {self.fingerprint[:12]}, "
                f"model fingerprint {fingerprint[:12]}): search a plan for this model instead"
            )
        return self

    # JSON ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["reuse"] = {str(k): v for k, v in self.reuse.items()}
        d["skip"] = list(self.skip)
        d["order"] = None if self.order is None else list(self.order)
        d["scores"] = None if self.scores is None else list(self.scores)
        d["version"] = PLAN_VERSION
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> Plan:
        if not isinstance(d, Mapping) or "skip" not in d:
            raise PlanError("a plan is a JSON object with at least a 'skip' list")
        version = d.get("version", PLAN_VERSION)
        if version != PLAN_VERSION:
            raise PlanError(f"plan version {version} is not supported (this skrr-compile reads {PLAN_VERSION})")
        known = {"skip", "reuse", "method", "order", "scores", "fingerprint", "info"}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise PlanError(f"plan is not valid JSON: {e}") from e

    def save(self, path: str | Path) -> None:
        from skrr_compile.utils.files import atomic_write_text

        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist")
        return cls.from_json(path.read_text())
