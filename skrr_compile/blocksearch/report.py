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


def _fmt(fmt: str, value) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = ["| " + " | ".join(_fmt(c[2], r.get(c[1])) for c in COLUMNS) + " |" for r in rows]
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
        lines.append("")
    lines += [f"- {n}" for n in notes or []]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    plot(out / "discrepancy_vs_sparsity.png", rows)
    return out


def plot(path: Path, rows: list[dict]) -> bool:
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
