"""Reliability (issue 14): no silent wrong results, one-line errors on every path, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from skrr_compile.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


# --- torch.compile backend by name in a fresh interpreter -------------------------------------------------
def test_skrr_backend_by_name_in_a_fresh_interpreter():
    """torch finds "skrr" through the entry point and imports the module itself: no duplicate registration."""
    r = _fresh_python("""
        import sys, torch
        assert "skrr_compile" not in sys.modules
        from torch._dynamo import lookup_backend
        fn = lookup_backend("skrr")
        print(fn.__module__, fn.__name__)
        m = torch.nn.Linear(3, 3)
        f = torch.compile(m, backend="skrr", options={"plan": {"skip": []}, "inner": "eager"})
        x = torch.randn(2, 3)
        assert torch.equal(f(x), m(x))
        print("compiled")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skrr_compile.deploy.compile_backend skrr_backend" in r.stdout
    assert "compiled" in r.stdout


def test_skrr_backend_registered_by_import_then_by_name():
    r = _fresh_python("""
        import torch
        import skrr_compile.deploy.compile_backend as cb
        from torch._dynamo import list_backends, lookup_backend
        assert "skrr" in list_backends()
        assert lookup_backend("skrr") is cb.skrr_backend
        cb.register()  # idempotent
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok" in r.stdout


# --- tiny real-format model directories (BERT with the MiniLM tokenizer) ----------------------------------
def _tiny_bert_dir(d: Path, seed: int = 0) -> Path:
    import shutil

    import torch
    import transformers

    from skrr_compile.core.checkpoints import builtin_model_dir

    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=30522, max_position_embeddings=128, architectures=["BertModel"])
    transformers.BertModel(cfg).eval().save_pretrained(d)
    src = builtin_model_dir()
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / f, d / f)
    return d


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    return _tiny_bert_dir(tmp_path_factory.mktemp("dense") / "bert")


@pytest.fixture(scope="module")
def other_dense_dir(tmp_path_factory):
    """Same architecture and tokenizer as `dense_dir`, other weights."""
    return _tiny_bert_dir(tmp_path_factory.mktemp("other") / "bert", seed=1)


@pytest.fixture(scope="module")
def pruned_dir(dense_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("pruned")
    (base / "plan.json").write_text(json.dumps({"skip": [1]}))
    assert main(["apply", str(dense_dir), "--plan", str(base / "plan.json"), "--out", str(base / "out")]) == 0
    return base / "out"


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def _one_line_error(capsys, command: str, *needles: str) -> str:
    err = _err(capsys)
    lines = [line for line in err.splitlines() if line.startswith(f"skrr-compile {command}: error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --- a pruned output directory given as MODEL ----------------------------------------------------------
def test_apply_refuses_a_pruned_dir_as_model(pruned_dir, tmp_path, capsys):
    (tmp_path / "plan.json").write_text(json.dumps({"skip": [3]}))
    out = tmp_path / "again"
    assert main(["apply", str(pruned_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(out)]) == 2
    _one_line_error(capsys, "apply", "is a pruned model written by skrr-compile", "skrr.load", "dense model")
    assert not out.exists()


def test_magnitude_refuses_a_pruned_dir_as_model(pruned_dir, tmp_path, capsys):
    out = tmp_path / "mag"
    assert main(["magnitude", str(pruned_dir), "--target", "0.5", "--out", str(out)]) == 2
    _one_line_error(capsys, "magnitude", "is a pruned model written by skrr-compile")
    assert not out.exists()


def test_magnitude_refuses_a_magnitude_output_as_model(dense_dir, tmp_path, capsys):
    first = tmp_path / "mag"
    assert main(["magnitude", str(dense_dir), "--target", "0.5", "--out", str(first)]) == 0
    capsys.readouterr()
    out = tmp_path / "mag2"
    assert main(["magnitude", str(first), "--target", "0.5", "--out", str(out)]) == 2
    _one_line_error(capsys, "magnitude", "skrr_magnitude.json", "skrr.load_pruned")
    assert not out.exists()
    assert main(["search", str(first), "--prompts", "builtin", "--sparsity", "0.1", "--out", str(out)]) == 2
    _one_line_error(capsys, "search", "is a pruned model written by skrr-compile")
    assert not out.exists()


def test_inspect_a_pruned_dir_shows_what_was_removed(pruned_dir, capsys):
    assert main(["inspect", str(pruned_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pruned BertModel")
    assert [line.split()[4] for line in out.splitlines()[2:]] == ["kept", "skipped", "kept", "kept"]
    assert main(["inspect", str(pruned_dir), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["pruned"] is True and table["skip"] == [1]
    assert [b["status"] for b in table["blocks"]] == ["kept", "skipped", "kept", "kept"]


# --- corrupt weights -------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncate_header", "truncate_data", "not_safetensors"])
def test_corrupt_weights_are_a_one_line_error(dense_dir, pruned_dir, tmp_path, capsys, damage):
    import shutil

    def spoil(f: Path) -> None:
        data = f.read_bytes()
        f.write_bytes({"truncate_header": data[:6], "truncate_data": data[: len(data) // 2],
                       "not_safetensors": b"PK\x03\x04 this is a zip"}[damage])

    dense = shutil.copytree(dense_dir, tmp_path / "dense")
    spoil(dense / "model.safetensors")
    assert main(["inspect", str(dense)]) == 2
    _one_line_error(capsys, "inspect", "model.safetensors", "truncated or not a safetensors file")
    pruned = shutil.copytree(pruned_dir, tmp_path / "pruned")
    spoil(pruned / "model.safetensors")
    assert main(["eval", str(pruned), "--model", str(dense_dir), "--prompts", "builtin", "--limit", "2"]) == 2
    _one_line_error(capsys, "eval", "model.safetensors", "truncated or not a safetensors file")
