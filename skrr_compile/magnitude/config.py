"""MagnitudeConfig (frozen, JSON round trip), the criteria and the study's presets."""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

aten = torch.ops.aten


CRITERIA = ("magnitude", "global", "wanda")


WANDA_GROUPS = ("row", "matrix")


# The Stable Diffusion pruning study's recommended configuration: text encoder 47.5 %, UNet 35 %, unstructured
# magnitude pruning of each Linear layer (convolutions untouched).
PRESETS: dict[str, dict] = {
    "sd2-study": {
        "targets": {"text_encoder": 0.475, "unet": 0.35},
        "criterion": "magnitude",
        "include_conv": False,
        "description": "the SD pruning study's recommendation: text encoder 47.5 % + UNet 35 % "
        "(per-Linear magnitude pruning, convolutions kept dense)",
    },
}


PRESET_ALIASES = {"study": "sd2-study", "recommended": "sd2-study"}


class SemiStructuredShapeError(ValueError):
    """An N:M (e.g. 2:4) request on a weight whose input dimension is not a multiple of M."""


def get_preset(name: str) -> dict:
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[key])


def check_sparsity(value, what: str = "sparsity") -> float:
    """A sparsity is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or v >= 1.0:
        raise ValueError(f"{what} must be in [0, 1) (a fraction of weights to zero, 0.5 = half), got {value!r}")
    return v


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M), N kept of every M."""
    if pattern in (None, "", "unstructured", "none"):
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


@dataclass(frozen=True)
class MagnitudeConfig:
    """How to prune one component. `sparsity` is the fraction of selected weights set to zero."""

    sparsity: float | None = None
    criterion: str = "magnitude"
    pattern: str = "unstructured"
    include_conv: bool = False
    exclude: tuple[str, ...] = ()  # fnmatch patterns on parameter names, e.g. "*.proj_out.weight"
    wanda_group: str = "row"

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.wanda_group not in WANDA_GROUPS:
            raise ValueError(f"wanda_group must be one of {WANDA_GROUPS}, got {self.wanda_group!r}")
        nm = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", "unstructured" if nm is None else f"{nm[0]}:{nm[1]}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(str(p) for p in self.exclude))
        object.__setattr__(self, "include_conv", bool(self.include_conv))
        if nm is None:
            if self.sparsity is None:
                raise ValueError("give a sparsity in [0, 1) (or an N:M pattern such as '2:4')")
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
            return
        implied = 1.0 - nm[0] / nm[1]
        if self.sparsity is not None and abs(check_sparsity(self.sparsity) - implied) > 1e-9:
            raise ValueError(
                f"pattern {self.pattern} fixes the sparsity at {implied:g}; got sparsity={self.sparsity!r} "
                "(leave it out or use an unstructured pattern)"
            )
        if self.criterion == "global":
            raise ValueError("a global threshold cannot make an N:M pattern; use criterion 'magnitude' or 'wanda'")
        object.__setattr__(self, "sparsity", implied)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> MagnitudeConfig:
        known = {"sparsity", "criterion", "pattern", "include_conv", "exclude", "wanda_group"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MagnitudeConfig fields {unknown}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items()})
