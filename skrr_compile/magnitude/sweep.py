"""Sparsity sweeps with collapse detection: discrepancy against sparsity, the knee, report.json / .md / PNG.

The metric is the Skrr search's T2I-tailored discrepancy for a text encoder (`Discrepancy`: MSE over the
prompts' read tokens + MSE of the null prompt), and the noise-prediction MSE on fixed latents / timesteps for a
denoiser (`NoisePredictionDiscrepancy`). Each sweep point prunes a fresh copy of the dense weights.

The knee: a collapse is the first step between sweep points whose rise per unit sparsity is at least
`JUMP_FACTOR` times that of each of the two steps before it (and at least 5 % of the curve's range); the knee is
the last point before it (`sharp`; the study's SD2 text encoder: FID 20 -> 134 between 57.5 % and 65 %). A
smooth curve has no such step: its knee is then the Kneedle point, where the rise sets in, and the report says
the knee is not sharp.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from skrr_compile.blocksearch.calibration import Calibration, tokenize
from skrr_compile.magnitude.config import MagnitudeConfig, check_sparsity
from skrr_compile.magnitude.layers import select_layers
from skrr_compile.magnitude.prune import prune, restore, snapshot
from skrr_compile.magnitude.wanda import input_norms
from skrr_compile.utils.files import write_dir_atomically

JUMP_FACTOR = 3.0
MATERIAL_RISE = 0.05
POINT_KEYS = ("sparsity", "sparsity_linear", "sparsity_linear_conv", "sparsity_all_params")


def parse_sparsities(spec: str | Sequence[float]) -> list[float]:
    """ "0.3:0.7:0.025" (start:stop:step, stop included) or "0.3,0.5,0.6" -> sorted sparsities in [0, 1)."""
    if isinstance(spec, str):
        spec = spec.strip()
        if ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3:
                raise ValueError(f"sparsity range must be start:stop:step, got {spec!r}")
            try:
                start, stop, step = (float(p) for p in parts)
            except ValueError:
                raise ValueError(f"sparsity range {spec!r}: start, stop and step must be numbers") from None
            if not step > 0:
                raise ValueError(f"sparsity range {spec!r}: step must be > 0")
            check_sparsity(start, "sweep start")
            check_sparsity(stop, "sweep stop")
            if stop < start:
                raise ValueError(f"sparsity range {spec!r}: stop is below start")
            n = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(n)]
        else:
            try:
                values = [float(p) for p in spec.split(",") if p.strip()]
            except ValueError:
                raise ValueError(f"sparsities must be start:stop:step or a comma list, got {spec!r}") from None
    else:
        values = [float(v) for v in spec]
    values = sorted({check_sparsity(v) for v in values})
    if not values:
        raise ValueError("no sparsities to sweep")
    return values


def kneedle(points: Sequence[tuple[float, float]]) -> tuple[int | None, str]:
    """Kneedle (Satopaa et al. 2011): on the curve normalised to the unit square, the point farthest from the
    chord, below it for a convex curve (where the rise sets in), above it for a concave one (where it levels)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = xs[-1] - xs[0], max(ys) - min(ys)
    if dx <= 0 or dy <= 0:
        return None, "flat"
    diff = [(y - min(ys)) / dy - (x - xs[0]) / dx for x, y in zip(xs, ys)]
    if sum(diff) < 0:
        return min(range(len(diff)), key=diff.__getitem__), "convex"
    return max(range(len(diff)), key=diff.__getitem__), "concave"


def find_knee(sparsities: Sequence[float], values: Sequence[float], factor: float = JUMP_FACTOR,
              material: float = MATERIAL_RISE) -> dict:
    """Where the discrepancy jumps (a collapse), or else where its rise sets in.

    A jump is the first step between consecutive points whose rise per unit sparsity is at least `factor` times
    that of each of the (up to) two steps before it, and whose rise is at least `material` of the curve's whole
    range (so noise near zero does not count). The knee is then the last point before that step (`sharp`).
    Without a jump the knee is the Kneedle point of the convex curve (where the rise sets in; not sharp).
    A smooth power law s^p has consecutive-step ratios near 1 on a fine grid; the study's FID 21 -> 60 has ~80.
    """
    pts = sorted((float(x), float(y)) for x, y in zip(sparsities, values))
    finite = [(x, y) for x, y in pts if math.isfinite(y)]
    if len(finite) < 3:
        return {"found": False, "sharp": False, "reason": "fewer than 3 finite points"}
    xs, ys = [p[0] for p in finite], [p[1] for p in finite]
    slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
    span = max(ys) - min(ys)
    steep = max(range(len(slopes)), key=slopes.__getitem__)
    k_idx, curve = kneedle(finite)
    out = {
        "rule": f"sharp: first step rising >= {factor:g}x faster than each of the two steps before it and by >= "
        f"{material:g} of the range; else the Kneedle point of the convex curve",
        "factor_threshold": factor,
        "curve": curve,
        "kneedle_sparsity": xs[k_idx] if k_idx is not None and curve == "convex" else None,
        "steepest_step": [xs[steep], xs[steep + 1]],
    }
    for i in range(2, len(slopes)):
        ref = max(slopes[i - 2], slopes[i - 1])
        if slopes[i] > 0 and ys[i + 1] - ys[i] >= material * span and slopes[i] >= factor * max(ref, 0.0):
            jump = slopes[i] / ref if ref > 0 else math.inf
            return {**out, **_step(xs, ys, i), "found": True, "sharp": True, "jump_factor": jump}
    if curve != "convex" or k_idx is None or k_idx == len(xs) - 1:
        where = "no rise" if curve == "flat" else "the rise sets in at or below the first point"
        return {**out, "found": False, "sharp": False, "reason": f"{curve} curve over this range: {where}"}
    before = max(slopes[k_idx - 2 : k_idx] or [0.0])
    jump = slopes[k_idx] / before if before > 0 else math.inf
    return {**out, **_step(xs, ys, k_idx), "found": True, "sharp": False, "jump_factor": jump}


def _step(xs, ys, i) -> dict:
    return {
        "knee_sparsity": xs[i],
        "collapse_sparsity": xs[i + 1],
        "value_before": ys[i],
        "value_after": ys[i + 1],
        "jump_ratio": ys[i + 1] / ys[i] if ys[i] > 0 else math.inf,
    }


@dataclass
class SweepResult:
    component: str
    criterion: str
    include_conv: bool
    points: list[dict]
    knee: dict
    metric: str = "discrepancy"
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(
    model: nn.Module,
    sparsities: Sequence[float],
    evaluate: Callable[[nn.Module], object],
    *,
    criterion: str = "magnitude",
    include_conv: bool = False,
    exclude: Sequence[str] = (),
    wanda_group: str = "row",
    calibration=None,
    component: str = "model",
    progress: Callable[[str], None] | None = None,
    jump_factor: float = JUMP_FACTOR,
) -> SweepResult:
    """Prune `model` to each sparsity (from its dense weights each time), score it with `evaluate(model)`
    (an object with `.discrepancy` and `.to_dict()`), and find the knee. The model is dense again afterwards."""
    sparsities = parse_sparsities(list(sparsities))
    base = MagnitudeConfig(0.0, criterion, include_conv=include_conv, exclude=tuple(exclude), wanda_group=wanda_group)
    layers = select_layers(model, base)
    saved = snapshot(layers)
    norms = None
    if criterion == "wanda":
        if calibration is None:
            raise ValueError("a Wanda sweep needs calibration data (prompts for a text encoder, inputs for a denoiser)")
        norms = input_norms(model, layers, calibration)
    points = []
    try:
        for s in sparsities:
            restore(layers, saved)
            t0 = time.perf_counter()
            result = prune(model, dataclasses.replace(base, sparsity=s), norms=norms)
            t1 = time.perf_counter()
            report = evaluate(model)
            t2 = time.perf_counter()
            sp = result.sparsity.to_dict()
            point = {"sparsity": s, **{k: sp[k] for k in POINT_KEYS[1:]}, **report.to_dict()}
            point.update(prune_seconds=round(t1 - t0, 3), eval_seconds=round(t2 - t1, 3))
            points.append(point)
            if progress:
                progress(f"{component} {criterion} {100 * s:6.2f}%  discrepancy {point['discrepancy']:.6g}"
                         + (f"  cosine {point['cosine']:.4f}" if "cosine" in point else ""))
    finally:
        restore(layers, saved)
    knee = find_knee([p["sparsity"] for p in points], [p["discrepancy"] for p in points], jump_factor)
    return SweepResult(component, criterion, include_conv, points, knee,
                       info={"layers": len(layers), "exclude": list(exclude)})


# text-encoder calibration ------------------------------------------------------------------------------
CLIP_ARCHS = ("CLIPTextModel", "CLIPTextModelWithProjection")


def text_calibration(
    tokenizer,
    prompts: Sequence[str],
    model: nn.Module,
    *,
    in_pipeline: bool = False,
    read: str = "auto",
    max_length: int | None = None,
    chunk_size: int = 32,
) -> Calibration:
    """Tokenize as the consumer of the embeddings does: a CLIP encoder inside a diffusion pipeline is padded to
    77 tokens and every position is read ("all"); otherwise the attention-mask tokens are read."""
    clip_in_pipeline = in_pipeline and type(model).__name__ in CLIP_ARCHS
    if read == "auto":
        read = "all" if clip_in_pipeline else "mask"
    padding = "max_length" if clip_in_pipeline else "longest"
    if clip_in_pipeline and max_length is None:
        max_length = int(getattr(tokenizer, "model_max_length", 77) or 77)
    return tokenize(tokenizer, prompts, max_length=max_length, padding=padding, chunk_size=chunk_size, read=read)


# reports -----------------------------------------------------------------------------------------------
def _fmt(v, digits=5) -> str:
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def markdown_table(result: SweepResult) -> str:
    knee = result.knee
    cols = [c for c in ("discrepancy", "mse_prompts", "mse_null", "cosine", "null_norm_ratio", "relative_mse")
            if result.points and c in result.points[0]]
    head = ["target %", "Linear %", "Linear+conv %", "all params %", *cols, ""]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in result.points:
        mark = ""
        if knee.get("found") and p["sparsity"] == knee["knee_sparsity"]:
            mark = "knee" + (" (sharp)" if knee["sharp"] else "")
        elif knee.get("found") and p["sparsity"] == knee["collapse_sparsity"]:
            mark = "after jump"
        row = [f"{100 * p['sparsity']:.2f}", f"{100 * p['sparsity_linear']:.2f}",
               f"{100 * p['sparsity_linear_conv']:.2f}", f"{100 * p['sparsity_all_params']:.2f}",
               *(_fmt(p[c]) for c in cols), mark]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def knee_sentence(result: SweepResult) -> str:
    k = result.knee
    head = f"{result.component} / {result.criterion}"
    if not k.get("found"):
        return f"{head}: no knee ({k.get('reason')})."
    step = (f"discrepancy {_fmt(k['value_before'])} at {100 * k['knee_sparsity']:.2f} % -> "
            f"{_fmt(k['value_after'])} at {100 * k['collapse_sparsity']:.2f} % (x{k['jump_ratio']:.2f})")
    if k["sharp"]:
        return (f"{head}: sharp knee (collapse) at {100 * k['knee_sparsity']:.2f} %: {step}; that step rises "
                f"{k['jump_factor']:.1f}x faster than the steps before it (threshold {k['factor_threshold']:g}x).")
    return (f"{head}: no collapse (no step rises {k['factor_threshold']:g}x faster than the steps before it); "
            f"the rise sets in at {100 * k['knee_sparsity']:.2f} % (Kneedle): {step}.")


def plot_sweep(results: Sequence[SweepResult], path: str | Path, title: str = "") -> None:
    """Discrepancy (solid, left axis) and cosine to dense (dashed, right axis) against sparsity; the knee of each
    curve marked (a star for a collapse, a diamond where a smooth rise sets in)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=120)
    ax2 = ax.twinx() if any(r.points and "cosine" in r.points[0] for r in results) else None
    for i, r in enumerate(results):
        x = [100 * p["sparsity"] for p in r.points]
        y = [p["discrepancy"] for p in r.points]
        color = f"C{i}"
        k = r.knee
        label = f"{r.criterion}: discrepancy"
        if k.get("found"):
            label += f" (knee {100 * k['knee_sparsity']:.1f} %, " + ("collapse)" if k["sharp"] else "smooth)")
        ax.plot(x, y, "o-", color=color, ms=3, lw=1.4, label=label)
        if k.get("found"):
            ax.plot([100 * k["knee_sparsity"]], [k["value_before"]], "*" if k["sharp"] else "D", color=color,
                    ms=14 if k["sharp"] else 9, mec="black", zorder=5)
            if k["sharp"]:
                ax.axvspan(100 * k["knee_sparsity"], 100 * k["collapse_sparsity"], color=color, alpha=0.15)
        if ax2 is not None and r.points and "cosine" in r.points[0]:
            ax2.plot(x, [p["cosine"] for p in r.points], "--", color=color, lw=1, alpha=0.55,
                     label=f"{r.criterion}: cosine to dense")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel("discrepancy (solid; lower is better)")
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("cosine to dense (dashed)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    fig.legend(handles, labels, fontsize=7.5, loc="lower center", ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    ax.set_title(title or "magnitude-pruning sweep", fontsize=10)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * math.ceil(len(handles) / 2), 1, 1))
    fig.savefig(path)
    plt.close(fig)


def write_sweep_report(
    out_dir: str | Path,
    results: Sequence[SweepResult],
    command: str,
    info: Mapping | None = None,
    overwrite: bool = False,
    title: str = "",
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """report.json, report.md, sweep.png and command.txt, written atomically into `out_dir`."""
    payload = {
        "command": command,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        **dict(info or {}),
        "knees": {f"{r.component}/{r.criterion}": r.knee for r in results},
        "results": [r.to_dict() for r in results],
    }
    md = [f"# {title or 'Magnitude-pruning sweep'}", "", f"Command: `{command}`", ""]
    for k, v in (info or {}).items():
        if isinstance(v, (str, int, float)):
            md.append(f"- {k}: {v}")
    md += ["", "## Knees", ""] + [f"- {knee_sentence(r)}" for r in results]
    for r in results:
        md += ["", f"## {r.component}, criterion {r.criterion}" + (" (+conv)" if r.include_conv else ""), "",
               markdown_table(r)]

    def fill(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps(payload, indent=2, default=str))
        (tmp / "report.md").write_text("\n".join(md) + "\n")
        (tmp / "command.txt").write_text(command + "\n")
        plot_sweep(results, tmp / "sweep.png", title=title)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_dir_atomically(out_dir, fill, overwrite=overwrite)
