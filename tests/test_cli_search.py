"""The search CLI end to end on the real MiniLM: prune -> saved model + report; eval; compare; errors."""

from __future__ import annotations

import json

import pytest

import skrr_compile as skrr
from skrr_compile.cli.main import main


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pruned"
    rc = main(["prune", "builtin", "--prompts", "builtin", "--limit", "8", "--chunk-size", "4",
               "--heldout", "builtin-heldout", "--heldout-limit", "6", "--sparsity", "0.06", "--out", str(out),
               "--quiet"])
    assert rc == 0
    return out


def test_prune_writes_a_loadable_model_and_a_report(pruned_dir):
    names = {p.name for p in pruned_dir.iterdir()}
    assert {"model.safetensors", "skrr_model.json", "skrr_plan.json", "plan.json", "report.json", "report.md",
            "discrepancy_vs_sparsity.png", "tokenizer.json", "search_state.json"} <= names
    report = json.loads((pruned_dir / "report.json").read_text())
    row = report["rows"][0]
    assert row["sparsity"] >= 0.06 and row["heldout_discrepancy"] > 0
    assert report["search"]["kernels_backend"] == "torch"
    assert report["search"]["counter"]["block_evals"] > 0
    model = skrr.load(pruned_dir)
    assert model.num_params == row["params"]
    assert "| skrr |" in (pruned_dir / "report.md").read_text()


def test_eval_reports_heldout_discrepancy(pruned_dir, capsys):
    assert main(["eval", str(pruned_dir), "--prompts", "builtin-heldout", "--limit", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    report = json.loads((pruned_dir / "report.json").read_text())["rows"][0]
    assert out["discrepancy"] == pytest.approx(report["heldout_discrepancy"], rel=1e-6)
    assert 0 < out["null_norm_ratio"] and -1 <= out["cosine"] <= 1


def test_compare_skips_unreachable_sparsity_and_writes_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", "builtin", "--prompts", "builtin", "--limit", "6", "--heldout", "builtin-heldout",
               "--heldout-limit", "4", "--sparsity", "0.05,0.5", "--methods", "shortgpt,finercut",
               "--out", str(out), "--quiet"])
    assert rc == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert {(r["method"], r["target"]) for r in rows} == {("shortgpt", 0.05), ("finercut", 0.05)}
    md = (out / "report.md").read_text()
    assert "cannot be reached" in md and "## shortgpt" in md and "## finercut" in md
    assert (out / "discrepancy_vs_sparsity.png").stat().st_size > 1000


def test_search_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["search", "builtin", "--prompts", str(tmp_path / "missing.txt"), "--sparsity", "0.3",
                 "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["search", "builtin", "--prompts", "builtin", "--sparsity", "1.5", "--out", str(out)]) == 2
    assert "sparsity must be in (0, 1)" in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"text": "a cat"}\n')
    assert main(["search", "builtin", "--prompts", str(tmp_path / "p.jsonl"), "--field", "caption",
                 "--sparsity", "0.3", "--out", str(out)]) == 2
    assert "field 'caption' does not exist" in capsys.readouterr().err


def test_compare_heal_adds_healed_rows_beside_the_same_plans_unhealed(tmp_path, capsys):
    """compare --heal: each method's search heals its plan; the plain row is that plan unhealed and equals
    the row of a compare without --heal, the +heal row carries the healed D (never above the plain one)."""
    base = ["compare", "builtin", "--prompts", "builtin", "--limit", "6", "--chunk-size", "2", "--heldout",
            "builtin-heldout", "--heldout-limit", "4", "--sparsity", "0.25", "--methods", "shortgpt,replaceme",
            "--quiet"]
    assert main(base + ["--out", str(tmp_path / "plain")]) == 0
    assert main(base + ["--heal", "lstsq", "--out", str(tmp_path / "healed")]) == 0
    plain = {r["method"]: r for r in json.loads((tmp_path / "plain" / "report.json").read_text())["rows"]}
    rows = {r["method"]: r for r in json.loads((tmp_path / "healed" / "report.json").read_text())["rows"]}
    assert sorted(rows) == ["replaceme", "shortgpt", "shortgpt+heal"]
    for k in ("skip", "sparsity", "calib_discrepancy", "heldout_discrepancy"):
        assert rows["shortgpt"][k] == plain["shortgpt"][k], k
        assert rows["replaceme"][k] == plain["replaceme"][k], k  # ReplaceMe heals with or without --heal
    healed = rows["shortgpt+heal"]
    assert healed["skip"] == plain["shortgpt"]["skip"] and healed["sparsity"] == plain["shortgpt"]["sparsity"]
    assert healed["healed_runs"] >= 1 and healed["calib_discrepancy"] < plain["shortgpt"]["calib_discrepancy"]
    assert "shortgpt+heal" in (tmp_path / "healed" / "report.md").read_text()
    assert main(base + ["--heal", "lstsq", "--out", str(tmp_path / "healed")]) == 0  # done: continues, adds nothing
    again = json.loads((tmp_path / "healed" / "report.json").read_text())["rows"]
    assert len(again) == 3
