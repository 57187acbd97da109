"""Reports: report.json, report.md (a table per method) and a PNG of discrepancy against sparsity."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from skrr_compile.utils.files import atomic_write_text

COLUMNS = [
    ("method", "method", "{}"),
    ("target", "target", "{:.2f}"),
    ("sparsity", "sparsity", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("MB", "mb", "{:.1f}"),
    ("calib D", "calib_discrepancy", "{:.5g}"),
    ("held-out D", "heldout_discrepancy", "{:.5g}"),
    ("cosine", "heldout_cosine", "{:.4f}"),
    ("null-norm ratio", "heldout_null_norm_ratio", "{:.4f}"),
    ("skip", "skip", "{}"),
    ("re-use", "reuse", "{}"),
]

EVAL_COLUMNS = [  # the table eval prints: the figures of its prompt set (a DiscrepancyReport and the model's size)
    ("method", "method", "{}"),
    ("sparsity", "sparsity", "{:.4f}"),
    ("params", "params", "{:,}"),
    ("MB", "mb", "{:.1f}"),
    ("D", "discrepancy", "{:.5g}"),
    ("cosine", "cosine", "{:.4f}"),
    ("null-norm ratio", "null_norm_ratio", "{:.4f}"),
    ("skip", "skip", "{}"),
    ("re-use", "reuse", "{}"),
]

# Healthy ranges of the two figures a person reads, in one place (eval, the prune summary and report.md use them):
# - null-norm ratio ||f_null_pruned|| / ||f_null_dense||: the null ("") embedding is the unconditional branch of
#   classifier-free guidance. Shrunk (the Skrr paper's failure signature of ShortGPT) the guidance direction
#   cond - uncond is distorted and guidance weakens; grown, it is over-amplified. Healthy within 10 %.
# - cosine: mean over read tokens of cos(f_dense, f_pruned). Below 0.8 (about 37 degrees apart on average) the
#   pruned embeddings point elsewhere than the dense ones, and images drift from the prompt. (On MiniLM, skipping
#   one sub-block gives 0.80-0.97 on the held-out prompts, the demo's 31 % plan 0.71.)
# Heuristics for reading a report, not guarantees: the images decide (FID, GenEval).
NULL_NORM_RATIO_RANGE = (0.9, 1.1)
MIN_COSINE = 0.8


def health_line(cosine: float | None, null_norm_ratio: float | None, where: str = "") -> str | None:
    """One line saying which of the figures is out of its healthy range and what that means; None if none is."""
    lo, hi = NULL_NORM_RATIO_RANGE
    problems = []
    r = null_norm_ratio
    if r is not None and not lo <= r <= hi:  # nan included
        what = ("the null embedding shrinks, weakening classifier-free guidance (the failure the Skrr paper shows "
                "for ShortGPT)" if r < lo else "the null embedding grows, over-amplifying classifier-free guidance"
                if r > hi else "the null embedding is degenerate")
        problems.append(f"null-norm ratio {r:.2f} is outside {lo}-{hi}: {what}")
    if cosine is not None and not cosine >= MIN_COSINE:
        problems.append(f"cosine {cosine:.2f} is below {MIN_COSINE}: the embeddings point elsewhere than the "
                        "dense model's (images drift from the prompt)")
    if not problems:
        return None
    return f"warning{f' ({where})' if where else ''}: " + "; ".join(problems)


def row_health(row: dict) -> str | None:
    """health_line of a report row: its held-out figures where it has them, else its calibration ones."""
    for prefix, where in (("heldout_", "held-out prompts"), ("calib_", "calibration prompts")):
        if row.get(prefix + "cosine") is not None or row.get(prefix + "null_norm_ratio") is not None:
            return health_line(row.get(prefix + "cosine"), row.get(prefix + "null_norm_ratio"), where)
    return None


def _fmt(fmt: str, value) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]] | None = None) -> str:
    columns = columns or COLUMNS
    head = "| " + " | ".join(c[0] for c in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(c[2], r.get(c[1])) for c in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def write_report(out_dir: str | Path, rows: list[dict], *, title: str, command: str | None = None,
                 notes: list[str] | None = None, extra: dict | None = None) -> Path:
    """Write report.json, report.md and discrepancy_vs_sparsity.png (if matplotlib is installed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps({"title": title, "command": command, "rows": rows,
                                                       **(extra or {})}, indent=2, default=str))
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    lines = [f"# {title}", ""]
    if command:
        lines += ["Made with:", "", "```", command, "```", ""]
    for method, mrows in by_method.items():
        lines += [f"## {method}", "", markdown_table(sorted(mrows, key=lambda r: r.get("target") or 0)), ""]
        for r in mrows:
            if r.get("order"):
                lines.append(f"- target {r.get('target')}: skip order {r['order']}")
            if row_health(r):
                lines.append(f"- target {r.get('target')}: {row_health(r)}")
        lines.append("")
    lines += [f"- {n}" for n in notes or []]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    plot(out / "discrepancy_vs_sparsity.png", rows, search=(extra or {}).get("search"))
    return out


def trajectory(search: dict | None) -> dict | None:
    """The series a single search's plot draws, from its report (None without a depth_history: shortgpt, laco).

    skip: (sparsity %, D) of the best beam after each skip step (depth_history); reuse: the re-use steps that
    changed the plan, (sparsity %, D, label), starting from the skip phase's end (re-use frees no parameter, so
    they stand at its sparsity); target: the target sparsity in %.
    """
    history = (search or {}).get("depth_history")
    if not history:
        return None
    skip = [(100 * h["sparsity"], h["score"]) for h in history]
    reuse = []
    for step in search.get("reuse_steps") or []:
        if step.get("chosen") is not None:
            reuse.append((skip[-1][0], step["scores"][str(step["chosen"])], f"{step['block']} via {step['chosen']}"))
    if reuse:
        reuse.insert(0, (*skip[-1], "skip phase"))
    target = search.get("target_sparsity")
    return {"skip": skip, "reuse": reuse, "target": 100 * target if target is not None else None}


def plot(path: Path, rows: list[dict], search: dict | None = None) -> bool:
    """D against sparsity: a point per row (a line per method); with the report of a single search, the
    search's trajectory (best D at each depth, then the re-use steps) on the calibration panel and the target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    by_method = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    panels = [(key, name) for key, name in (("calib_discrepancy", "calibration"), ("heldout_discrepancy", "held-out"))
              if any(r.get(key) is not None for r in rows)]  # no empty held-out panel without --heldout
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for method, mrows in sorted(by_method.items()):
        mrows = sorted(mrows, key=lambda r: r["sparsity"])
        x = [100 * r["sparsity"] for r in mrows]
        for ax, (key, _) in zip(axes, panels):
            y = [r.get(key) for r in mrows]
            if any(v is not None for v in y):
                ax.plot(x, [v if v is not None else float("nan") for v in y], marker="o", label=method)
    series = trajectory(search) if len(rows) == 1 else None
    if series is not None:
        ax = axes[0] if panels[0][0] == "calib_discrepancy" else None
        if ax is not None:
            ax.plot(*zip(*series["skip"]), marker=".", color="0.4", label="skip steps (best D at each depth)")
            if series["reuse"]:
                ax.plot([p[0] for p in series["reuse"]], [p[1] for p in series["reuse"]], marker="v",
                        color="tab:green", linestyle=":", label="re-use steps")
                x, y, _ = series["reuse"][-1]
                ax.annotate("re-use " + ", ".join(p[2] for p in series["reuse"][1:]), (x, y), xytext=(-8, -18),
                            textcoords="offset points", ha="right", va="top", fontsize=7, color="tab:green")
        for ax in axes:
            ax.set_xlim(axes[0].get_xlim())  # every panel on the trajectory's sparsity axis
            if series["target"] is not None:
                ax.axvline(series["target"], color="tab:red", linestyle="--", linewidth=1,
                           label=f"target {series['target']:g} %")
    for ax, (_, name) in zip(axes, panels):
        ax.set_xlabel("sparsity (% of encoder parameters removed)")
        ax.set_ylabel("discrepancy D (MSE prompts + MSE null)")
        ax.set_title(f"{name} discrepancy")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True
