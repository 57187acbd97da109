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
    rows = [line for line in out.splitlines()[2:] if not line.startswith("deployed size")]  # + sizes per scheme
    assert [line.split()[4] for line in rows] == ["kept", "skipped", "kept", "kept"]
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


# --- search --resume: the state belongs to the weights it was written for -------------------------------
def _search(model, out, *extra):
    return main(["search", str(model), "--prompts", "builtin", "--limit", "4", "--chunk-size", "2",
                 "--sparsity", "0.004", "--method", "skrr-skip", "--beam", "1", "--out", str(out), "--quiet", *extra])


def test_resume_refuses_a_state_written_for_other_weights(dense_dir, other_dense_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert _search(dense_dir, out) == 0
    plan = (out / "plan.json").read_text()
    capsys.readouterr()
    assert _search(other_dense_dir, out, "--resume") == 2
    _one_line_error(capsys, "search", "was written for other inputs (model weights")
    assert (out / "plan.json").read_text() == plan
    assert _search(dense_dir, out, "--resume") == 0  # the same weights resume (the state is done)


def test_weights_digest_sees_every_byte_and_in_place_changes():
    import torch
    from factories import FAMILIES

    import skrr_compile as skrr
    from skrr_compile.blocksearch.checkpoint import weights_digest

    model = FAMILIES["t5-gated"].make()
    graph = skrr.trace(model)
    d0 = weights_digest(graph)
    assert weights_digest(graph) == d0
    name, p = next(iter(model.named_parameters()))
    with torch.no_grad():
        flat = p.view(-1)
        old = flat[-1].item()
        flat[-1] = old + 1e-6  # the last element of one tensor
    assert weights_digest(graph) != d0, name
    with torch.no_grad():
        flat[-1] = old
    assert weights_digest(graph) == d0


def test_corrupt_search_state_is_a_one_line_error(dense_dir, tmp_path, capsys):
    out = tmp_path / "s"
    out.mkdir()
    (out / "search_state.json").write_text('{"key": "abc", "phase": ')
    assert _search(dense_dir, out, "--resume") == 2
    _one_line_error(capsys, "search", "search_state.json is not a readable search state")


# --- compare --out ----------------------------------------------------------------------------------------
def _compare(model, out, sparsity="0.004", *extra):
    return main(["compare", str(model), "--prompts", "builtin", "--limit", "4", "--chunk-size", "2",
                 "--sparsity", sparsity, "--methods", "shortgpt", "--out", str(out), "--quiet", *extra])


def test_compare_does_not_reuse_rows_of_another_model(dense_dir, other_dense_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert _compare(dense_dir, out) == 0
    rows = (out / "rows.jsonl").read_text()
    capsys.readouterr()
    assert _compare(other_dense_dir, out) == 2
    _one_line_error(capsys, "compare", "holds a compare of other inputs")
    assert (out / "rows.jsonl").read_text() == rows
    assert _compare(dense_dir, out) == 0  # the same inputs continue (nothing left to do)
    assert (out / "rows.jsonl").read_text() == rows


def test_compare_refuses_a_directory_of_unrelated_files(dense_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert _compare(dense_dir, out) == 2
    _one_line_error(capsys, "compare", "is not empty")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]


@pytest.mark.parametrize("sparsity", ["0", "1", "-0.5", "0.3,1.5"])
def test_compare_refuses_sparsity_out_of_range(dense_dir, tmp_path, capsys, sparsity):
    out = tmp_path / "cmp"
    assert _compare(dense_dir, out, sparsity) == 2
    _one_line_error(capsys, "compare", "must be in (0, 1)")
    assert not out.exists()


# --- --out: existing file, unwritable, disk full; nothing created before the inputs are checked -------------
def _commands(dense_dir, plan, out):
    search = ["--prompts", "builtin", "--limit", "4", "--sparsity", "0.004", "--out", str(out), "--quiet"]
    return {
        "search": ["search", str(dense_dir), *search],
        "prune": ["prune", str(dense_dir), *search],
        "compare": ["compare", str(dense_dir), "--prompts", "builtin", "--limit", "4", "--sparsity", "0.004",
                    "--methods", "shortgpt", "--out", str(out), "--quiet"],
        "apply": ["apply", str(dense_dir), "--plan", str(plan), "--out", str(out)],
        "magnitude": ["magnitude", str(dense_dir), "--target", "0.5", "--out", str(out)],
    }


COMMANDS = ("search", "prune", "compare", "apply", "magnitude")


@pytest.mark.parametrize("command", COMMANDS)
def test_out_naming_an_existing_file_is_refused(dense_dir, tmp_path, capsys, command):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"skip": [1]}))
    out = tmp_path / "taken"
    out.write_text("a file")
    assert main(_commands(dense_dir, plan, out)[command]) == 2
    _one_line_error(capsys, command, "exists and is not a directory")
    assert out.read_text() == "a file"
    below = out / "sub"
    assert main(_commands(dense_dir, plan, below)[command]) == 2
    _one_line_error(capsys, command, "is a file, not a directory")


@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_out_is_refused_before_any_work(dense_dir, tmp_path, capsys, monkeypatch, command):
    import os

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"skip": [1]}))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if Path(p) == locked else real_access(p, mode))  # root ignores chmod

    def no_work(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr("skrr_compile.core.checkpoints.load_encoder", no_work)
    for mod in ("skrr_compile.cli.core", "skrr_compile.cli.search"):
        monkeypatch.setattr(f"{mod}.load_encoder", no_work)
    monkeypatch.setattr("skrr_compile.cli.magnitude.load_source_component", no_work)
    out = locked / "out"
    assert main(_commands(dense_dir, plan, out)[command]) == 2
    _one_line_error(capsys, command, "cannot be written: permission denied", str(locked))
    assert not out.exists()


def test_disk_full_and_permission_errors_while_writing_are_one_line(dense_dir, tmp_path, capsys, monkeypatch):
    import errno

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"skip": [1]}))
    for err, needle in [(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "o")), "no space left"),
                        (PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "o")), "Permission denied")]:
        def full(*a, _e=err, **k):
            raise _e

        monkeypatch.setattr("skrr_compile.cli.core.save", full)
        assert main(["apply", str(dense_dir), "--plan", str(plan), "--out", str(tmp_path / "o")]) == 2
        _one_line_error(capsys, "apply", needle, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["search", "prune"])
@pytest.mark.parametrize("problem", ["missing_model", "missing_prompts", "bad_sparsity", "unreachable_sparsity",
                                     "bad_heldout"])
def test_search_and_prune_create_nothing_on_bad_input(dense_dir, tmp_path, capsys, command, problem):
    out = tmp_path / "new" / "out"
    model, prompts, sparsity, extra = str(dense_dir), "builtin", "0.004", []
    if problem == "missing_model":
        model = str(tmp_path / "nope")
    elif problem == "missing_prompts":
        prompts = str(tmp_path / "nope.txt")
    elif problem == "bad_sparsity":
        sparsity = "1.5"
    elif problem == "unreachable_sparsity":
        sparsity = "0.9"  # the embeddings are most of this model
    else:
        (tmp_path / "held.jsonl").write_text('{"prompt": "a cat"}\n{"caption": "a dog"}\n')
        extra = ["--heldout", str(tmp_path / "held.jsonl")]
    assert main([command, model, "--prompts", prompts, "--limit", "4", "--sparsity", sparsity,
                 "--out", str(out), "--quiet", *extra]) == 2
    _one_line_error(capsys, command)
    assert not out.exists() and not out.parent.exists()


# --- prompt files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rows, needle", [
    ('{"prompt": "a cat"}\n\n{"text": "a dog"}\n', "p.jsonl:3 has no field 'prompt'"),
    ('{"prompt": "a cat"}\n{"prompt": 5}\n', "p.jsonl:2: field 'prompt' is a int"),
    ('{"prompt": "a cat"}\n{"prompt": null}\n', "p.jsonl:2 has no field 'prompt'"),
    ('{"prompt": "a cat"}\n["a dog"]\n', "p.jsonl:2 is a JSON list"),
    ('"a cat"\n', "p.jsonl:1 is a JSON str, not an object"),
])
def test_jsonl_rows_without_a_string_prompt_are_an_error_naming_the_line(tmp_path, rows, needle):
    from skrr_compile.blocksearch.calibration import PromptError, read_prompts

    (tmp_path / "p.jsonl").write_text(rows)
    with pytest.raises(PromptError) as e:
        read_prompts(tmp_path / "p.jsonl")
    assert needle in str(e.value)


def test_csv_rows_without_the_column_and_non_string_lists_are_errors(tmp_path):
    from skrr_compile.blocksearch.calibration import PromptError, read_prompts

    (tmp_path / "p.csv").write_text("prompt,id\na cat,1\n")
    assert read_prompts(tmp_path / "p.csv") == ["a cat"]
    (tmp_path / "q.csv").write_text("id,prompt\n1,a cat\n2\n")
    with pytest.raises(PromptError, match=r"q.csv:3 has no field 'prompt'"):
        read_prompts(tmp_path / "q.csv")
    with pytest.raises(PromptError, match="prompt 1 of the list is a int"):
        read_prompts(["a cat", 5])


# --- LaCo: the plan carries the merged weights; the search state is resumable --------------------------------
@pytest.fixture(scope="module")
def laco_search(dense_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("laco") / "s"
    rc = main(["search", str(dense_dir), "--prompts", "builtin", "--limit", "4", "--chunk-size", "2",
               "--sparsity", "0.004", "--method", "laco", "--out", str(out), "--quiet"])
    assert rc == 0
    return out


def test_laco_plan_carries_its_merged_weights_and_apply_uses_them(dense_dir, laco_search, tmp_path):
    import torch
    from safetensors.torch import load_file

    import skrr_compile as skrr
    from skrr_compile.core.checkpoints import load_encoder

    plan = json.loads((laco_search / "plan.json").read_text())
    merged = plan["info"]["merged_params"]
    assert merged and plan["info"]["merged_weights"]["file"] == "plan.merged.safetensors"
    weights = load_file(str(laco_search / "plan.merged.safetensors"))
    assert sorted(weights) == sorted(merged)
    dense = dict(load_encoder(dense_dir).named_parameters())
    # a merge, not a copy: theta_base + sum(theta_following - theta_base) differs from the base layer
    assert any(not torch.equal(weights[n], dense[n]) for n in merged)
    out = tmp_path / "applied"
    assert main(["apply", str(dense_dir), "--plan", str(laco_search / "plan.json"), "--out", str(out)]) == 0
    applied = skrr.load(out)
    tensors = dict(applied.graph_module.named_parameters())
    for n in merged:
        assert torch.equal(tensors[n], weights[n]), n
    # the applied model is the one the search scored
    report = json.loads((laco_search / "report.json").read_text())
    assert report["rows"][0]["params"] == applied.num_params


def test_apply_refuses_a_laco_plan_without_its_weights(dense_dir, laco_search, tmp_path, capsys):
    import shutil

    lonely = tmp_path / "plan.json"
    shutil.copy(laco_search / "plan.json", lonely)
    out = tmp_path / "applied"
    assert main(["apply", str(dense_dir), "--plan", str(lonely), "--out", str(out)]) == 2
    _one_line_error(capsys, "apply", "merged LaCo weights", "are missing")
    assert not out.exists()
    old = json.loads(lonely.read_text())
    del old["info"]["merged_weights"]  # a plan written before the weights were carried
    lonely.write_text(json.dumps(old))
    assert main(["apply", str(dense_dir), "--plan", str(lonely), "--out", str(out)]) == 2
    _one_line_error(capsys, "apply", "does not carry the merged weights")
    shutil.copy(laco_search / "plan.merged.safetensors", tmp_path / "plan.merged.safetensors")
    (tmp_path / "plan.json").write_text((laco_search / "plan.json").read_text())
    with open(tmp_path / "plan.merged.safetensors", "r+b") as f:  # same size, other bytes
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    assert main(["apply", str(dense_dir), "--plan", str(lonely), "--out", str(out)]) == 2
    _one_line_error(capsys, "apply", "sha256 differs")
    assert not out.exists()


def test_laco_search_state_resumes_with_its_merged_weights(dense_dir, laco_search, monkeypatch):
    import torch

    import skrr_compile.blocksearch.run as run

    state = json.loads((laco_search / "search_state.json").read_text())
    assert state["phase"] == "done" and state["laco"]["merged"]
    assert (laco_search / state["tensors"]["laco"]["file"]).is_file()

    def no_search(*a, **k):
        raise AssertionError("a finished LaCo state was searched again")

    monkeypatch.setattr(run, "laco", no_search)
    from safetensors.torch import load_file

    from skrr_compile.blocksearch.calibration import read_prompts
    from skrr_compile.core.checkpoints import load_encoder, load_tokenizer

    plan = json.loads((laco_search / "plan.json").read_text())
    saved = load_file(str(laco_search / "plan.merged.safetensors"))
    model, tok = load_encoder(dense_dir), load_tokenizer(dense_dir)
    result = run.search(model, tok, read_prompts("builtin", limit=4), sparsity=0.004, method="laco",
                        out_dir=laco_search, resume=True, progress=False, chunk_size=2)
    assert list(result.plan.skip) == plan["skip"]
    assert sorted(result.overrides) == sorted(saved)
    for n, t in saved.items():
        assert torch.equal(result.overrides[n].cpu(), t)


# --- outputs follow the user's umask ---------------------------------------------------------------------------
def test_outputs_follow_the_umask(dense_dir, tmp_path, capsys):
    import os
    import stat

    (tmp_path / "plan.json").write_text(json.dumps({"skip": [1]}))
    old = os.umask(0o027)
    try:
        assert main(["apply", str(dense_dir), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a")]) == 0
        assert main(["magnitude", str(dense_dir), "--target", "0.5", "--out", str(tmp_path / "m")]) == 0
        assert _search(dense_dir, tmp_path / "s") == 0
        assert main(["search", str(dense_dir), "--prompts", "builtin", "--limit", "4", "--chunk-size", "2",
                     "--sparsity", "0.004", "--method", "laco", "--out", str(tmp_path / "l"), "--quiet"]) == 0
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode)
             for d in ("a", "m", "s", "l") for p in [tmp_path / d, *(tmp_path / d).rglob("*")]}
    wrong = {p: oct(m) for p, m in modes.items() if m != (0o750 if (tmp_path / p).is_dir() else 0o640)}
    assert not wrong
    assert "a/model.safetensors" in modes and "m/skrr_sparse.safetensors" in modes and "s/plan.json" in modes
    assert "l/plan.merged.safetensors" in modes and "l/search_state.laco.safetensors" in modes


# --- a normal run prints only the project's own lines ---------------------------------------------------------
def _cli(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skrr_compile", *map(str, argv)], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600)


def test_normal_runs_print_no_dependency_noise(dense_dir, tmp_path):
    """stderr is not a terminal here: no warnings of dependencies, no carriage-return bar updates."""
    (tmp_path / "plan.json").write_text(json.dumps({"skip": [1]}))
    runs = {
        "search --quiet": _cli("search", dense_dir, "--prompts", "builtin", "--limit", "4", "--chunk-size", "2",
                               "--sparsity", "0.004", "--method", "skrr-skip", "--beam", "1",
                               "--out", tmp_path / "s", "--quiet"),
        "apply": _cli("apply", dense_dir, "--plan", tmp_path / "plan.json", "--out", tmp_path / "a"),
        "export-onnx": _cli("export-onnx", tmp_path / "a", tmp_path / "a.onnx"),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr[-2000:])
        for noise in ("Warning", "deprecated", "torchvision", "\r", "Loading weights", "Traceback"):
            assert noise not in r.stderr, (name, noise, r.stderr[-2000:])
    assert runs["search --quiet"].stderr == ""


def test_projection_module_and_plot_without_heldout_warn_nothing(tmp_path):
    import warnings

    import torch
    from PIL import Image

    from skrr_compile.blocksearch.report import plot
    from skrr_compile.blocksearch.run import _describe

    rows = [{"method": "skrr", "sparsity": s, "calib_discrepancy": d, "heldout_discrepancy": None}
            for s, d in ((0.1, 0.01), (0.2, 0.05))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _describe(torch.nn.Linear(4, 4))  # a projection module's parameters require grad
        assert plot(tmp_path / "p.png", rows)
    assert Image.open(tmp_path / "p.png").size[0] == 600  # one panel (5 in x 120 dpi): no empty held-out one


def test_apply_and_load_warn_nothing(tmp_path):
    import warnings

    from factories import FAMILIES

    import skrr_compile as skrr

    model = FAMILIES["t5-gated"].make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pruned = skrr.apply(model, skrr.Plan(skip=[1]))
        skrr.save(pruned, tmp_path / "p")
        skrr.load(tmp_path / "p")


# --- prune-pipeline --plans inline JSON; LaCo plans where merged weights cannot be carried ---------------------
def test_plans_accepts_inline_json_and_laco_is_refused_where_weights_cannot_follow(tmp_path, capsys):
    import skrr_compile as skrr
    from skrr_compile.cli.deploy import _read_plans
    from skrr_compile.deploy.compile_backend import MergedWeightsPlanError, resolve_plan

    assert _read_plans('{"text_encoder": {"skip": [1]}}') == {"text_encoder": skrr.Plan(skip=[1])}
    with pytest.raises(Exception, match="--plans is not valid JSON"):
        _read_plans('{"text_encoder": ')
    out = tmp_path / "pp"
    assert main(["prune-pipeline", str(tmp_path), "--prompts", "builtin", "--sparsity", "0.3", "--method", "laco",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "prune-pipeline", "cannot carry LaCo's merged weights")
    assert not out.exists()
    with pytest.raises(MergedWeightsPlanError, match="LaCo plan"):
        resolve_plan({"skip": [2, 3], "method": "laco", "info": {"merged_params": ["encoder.layer.0.x"]}})


# --- prompt files, fuzzed (`make fuzz` runs these with >= 1,000 examples) --------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(prompts=st.lists(st.text(), min_size=1, max_size=8), ascii_only=st.booleans(), crlf=st.booleans(),
       extra=st.dictionaries(st.sampled_from(["id", "score", "tags"]), st.integers() | st.text(), max_size=2))
def test_fuzz_jsonl_prompts_round_trip(tmp_path_factory, prompts, ascii_only, crlf, extra):
    from skrr_compile.blocksearch.calibration import PromptError, read_prompts

    path = tmp_path_factory.mktemp("fz") / "p.jsonl"
    newline = "\r\n" if crlf else "\n"
    path.write_bytes(newline.join(json.dumps({"prompt": p, **extra}, ensure_ascii=ascii_only)
                                  for p in prompts).encode("utf-8"))
    expected = [p for p in prompts if p.strip()]
    if not expected:
        with pytest.raises(PromptError, match="no prompts"):
            read_prompts(path)
    else:
        assert read_prompts(path) == expected


@_FUZZ
@given(prompts=st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
                        min_size=1, max_size=8), delimiter=st.sampled_from([",", "\t"]))
def test_fuzz_csv_tsv_prompts_round_trip(tmp_path_factory, prompts, delimiter):
    import csv
    import io

    from skrr_compile.blocksearch.calibration import PromptError, read_prompts

    buf = io.StringIO()
    w = csv.writer(buf, delimiter=delimiter)
    w.writerow(["id", "prompt"])
    for i, p in enumerate(prompts):
        w.writerow([i, p])
    path = tmp_path_factory.mktemp("fz") / ("p.csv" if delimiter == "," else "p.tsv")
    path.write_text(buf.getvalue(), encoding="utf-8", newline="")
    expected = [p for p in prompts if p.strip()]
    if not expected:
        with pytest.raises(PromptError):
            read_prompts(path)
    else:
        assert read_prompts(path) == expected


@_FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".txt", ".jsonl", ".csv", ".tsv"]))
def test_fuzz_arbitrary_prompt_files_give_prompts_or_a_prompt_error(tmp_path_factory, data, suffix):
    from skrr_compile.blocksearch.calibration import PromptError, read_prompts

    path = tmp_path_factory.mktemp("fz") / f"p{suffix}"
    path.write_bytes(data)
    try:
        prompts = read_prompts(path)
    except PromptError as e:
        assert str(path) in str(e) and "\n" not in str(e)
    else:
        assert prompts and all(isinstance(p, str) and p.strip() for p in prompts)


# --- the sweep: every subcommand against each class of bad input ---------------------------------------------
SWEEP = {  # name: (argv with {dense} {pruned} {tmp} {out}, a phrase the one-line error must contain)
    "inspect/missing": (["inspect", "{tmp}/nope"], "does not exist"),
    "inspect/no-config": (["inspect", "{tmp}/empty"], "has no config.json"),
    "inspect/corrupt-config": (["inspect", "{tmp}/badcfg"], "not a valid JSON file"),
    "apply/plan-missing": (["apply", "{dense}", "--plan", "{tmp}/nope.json", "--out", "{out}"], "does not exist"),
    "apply/plan-not-json": (["apply", "{dense}", "--plan", "{tmp}/bad.json", "--out", "{out}"], "not valid JSON"),
    "apply/plan-out-of-range": (["apply", "{dense}", "--plan", "{tmp}/range.json", "--out", "{out}"],
                                "out of range"),
    "apply/out-not-empty": (["apply", "{dense}", "--plan", "{tmp}/ok.json", "--out", "{tmp}/full"], "is not empty"),
    "eval/not-pruned": (["eval", "{dense}", "--prompts", "builtin"], "is not a pruned model"),
    "eval/no-source": (["eval", "{pruned}", "--prompts", "builtin"], "does not record its dense model"),
    "eval/limit-0": (["eval", "{pruned}", "--model", "{dense}", "--prompts", "builtin", "--limit", "0"],
                     "--limit must be >= 1"),
    "export-onnx/not-pruned": (["export-onnx", "{dense}", "{tmp}/x.onnx"], "is not a pruned model"),
    "export-onnx/into-a-file": (["export-onnx", "{pruned}", "{tmp}/notes.txt/x.onnx"], "is not a directory"),
    "export-onnx/a-directory": (["export-onnx", "{pruned}", "{tmp}/empty"], "is a directory"),
    "export-onnx/exists": (["export-onnx", "{pruned}", "{tmp}/old.onnx"], "exists; choose a new file or pass --overwrite"),
    "magnitude/target-1.5": (["magnitude", "{dense}", "--target", "1.5", "--out", "{out}"], "must be in [0, 1)"),
    "magnitude/target-junk": (["magnitude", "{dense}", "--target", "abc", "--out", "{out}"], "give one sparsity"),
    "magnitude/missing": (["magnitude", "{tmp}/nope", "--target", "0.5", "--out", "{out}"], "does not exist"),
    "magnitude/out-not-empty": (["magnitude", "{dense}", "--target", "0.5", "--out", "{tmp}/full"], "is not empty"),
    "search/beam-0": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004", "--beam", "0",
                       "--out", "{out}"], "--beam must be >= 1"),
    "search/chunk-0": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004", "--chunk-size", "0",
                        "--out", "{out}"], "--chunk-size must be >= 1"),
    "search/limit-negative": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004", "--limit", "-1",
                               "--out", "{out}"], "--limit must be >= 1"),
    "search/cache-negative": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004", "--cache-gb",
                               "-1", "--out", "{out}"], "--cache-gb must be >= 0"),
    "search/max-length-0": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004", "--max-length",
                             "0", "--out", "{out}"], "--max-length must be >= 1"),
    "search/token-range-empty": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004",
                                  "--min-tokens", "50", "--max-tokens", "10", "--out", "{out}"], "no prompt has"),
    "search/prompts-a-directory": (["search", "{dense}", "--prompts", "{tmp}/empty", "--sparsity", "0.004",
                                    "--out", "{out}"], "prompt file"),
    "search/prompts-unknown-type": (["search", "{dense}", "--prompts", "{tmp}/bad.json", "--sparsity", "0.004",
                                     "--out", "{out}"], "unsupported prompt file type"),
    "search/sparsity-nan": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "nan", "--out", "{out}"],
                            "sparsity must be in (0, 1)"),
    "search/out-not-empty": (["search", "{dense}", "--prompts", "builtin", "--sparsity", "0.004",
                              "--out", "{tmp}/full"], "is not empty"),
    "prune/pruned-as-model": (["prune", "{pruned}", "--prompts", "builtin", "--sparsity", "0.004", "--out", "{out}"],
                              "is a pruned model"),
    "compare/unknown-method": (["compare", "{dense}", "--prompts", "builtin", "--sparsity", "0.1", "--methods",
                                "foo", "--out", "{out}"], "unknown methods"),
    "compare/sparsity-nan": (["compare", "{dense}", "--prompts", "builtin", "--sparsity", "nan", "--out", "{out}"],
                             "must be in (0, 1)"),
    "compare/sparsity-not-a-number": (["compare", "{dense}", "--prompts", "builtin", "--sparsity", "a,b",
                                       "--out", "{out}"], "comma-separated numbers"),
    "compare/beam-0": (["compare", "{dense}", "--prompts", "builtin", "--sparsity", "0.004", "--beam", "0",
                        "--out", "{out}"], "--beam must be >= 1"),
    "prune-pipeline/not-a-pipeline": (["prune-pipeline", "{dense}", "--prompts", "builtin", "--sparsity", "0.3",
                                       "--out", "{out}"], "not a diffusers pipeline directory"),
    "prune-pipeline/plans-missing": (["prune-pipeline", "{dense}", "--plans", "{tmp}/nope.json", "--out", "{out}"],
                                     "does not exist"),
    "sweep/missing": (["sweep", "{tmp}/nope", "--target", "model", "--sparsity", "0.3:0.5:0.1", "--prompts",
                       "builtin", "--out", "{out}"], "does not exist"),
}


@pytest.fixture(scope="module")
def sweep_tmp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    (tmp / "empty").mkdir()
    (tmp / "badcfg").mkdir()
    (tmp / "badcfg" / "config.json").write_text("{bad")
    (tmp / "bad.json").write_text("not json")
    (tmp / "range.json").write_text(json.dumps({"skip": [99]}))
    (tmp / "ok.json").write_text(json.dumps({"skip": [1]}))
    (tmp / "notes.txt").write_text("a file")
    (tmp / "old.onnx").write_bytes(b"an earlier export")
    (tmp / "full").mkdir()
    (tmp / "full" / "keep.txt").write_text("keep")
    return tmp


@pytest.mark.parametrize("case", sorted(SWEEP))
def test_sweep_bad_input_is_a_one_line_error_and_writes_nothing(case, dense_dir, pruned_dir, sweep_tmp, tmp_path,
                                                                capsys):
    argv, needle = SWEEP[case]
    out = tmp_path / "out"
    before = sorted(str(p.relative_to(sweep_tmp)) + str(p.stat().st_size) for p in sweep_tmp.rglob("*"))
    fill = {"dense": str(dense_dir), "pruned": str(pruned_dir), "tmp": str(sweep_tmp), "out": str(out)}
    assert main([a.format(**fill) for a in argv]) == 2
    _one_line_error(capsys, argv[0], needle)
    assert not out.exists()
    assert sorted(str(p.relative_to(sweep_tmp)) + str(p.stat().st_size) for p in sweep_tmp.rglob("*")) == before


def test_read_prompts_refuses_a_limit_below_one():
    from skrr_compile.blocksearch.calibration import PromptError, read_prompts

    assert read_prompts(["a", "b", "c"], limit=2) == ["a", "b"]
    for bad in (0, -1):  # 0 used to mean "all", -1 dropped the last prompt
        with pytest.raises(PromptError, match="limit must be a number of prompts >= 1"):
            read_prompts(["a", "b", "c"], limit=bad)


def test_loading_a_pruned_pipeline_does_not_warn_about_the_encoder_type(tmp_path, capfd):
    from diffusers import DiffusionPipeline
    from pipeline_factories import make_pixart

    import skrr_compile as skrr
    from skrr_compile.deploy.pipelines import apply_to_pipeline
    from skrr_compile.deploy.pipelines.storage import save_pipeline

    pipe = make_pixart()
    apply_to_pipeline(pipe, {"text_encoder": skrr.Plan(skip=[1])})
    save_pipeline(pipe, tmp_path / "pp")
    capfd.readouterr()
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "pp")
    assert type(loaded.text_encoder).__name__ == "PrunedTextEncoder"
    err = capfd.readouterr().err
    assert "Expected types for" not in err, err
    import logging  # the filter drops only that record: other warnings of the logger still pass

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    lg = logging.getLogger("diffusers.pipelines.pipeline_utils")
    lg.addHandler(handler)
    try:
        lg.warning("Expected types for unet: (A,), got B.")
        lg.warning("Expected types for text_encoder: (T5EncoderModel,), got PrunedTextEncoder.")
    finally:
        lg.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Expected types for unet: (A,), got B."]


def test_library_apply_refuses_a_laco_plan_without_its_merged_weights():
    """skrr.apply used to give a plain skip for a LaCo plan: not the model the search scored."""
    import torch
    from factories import FAMILIES

    import skrr_compile as skrr

    model = FAMILIES["t5-gated"].make(seed=1)
    graph = skrr.trace(model)
    name = next(p for p in sorted(graph.blocks[0].params) if p.endswith("q.weight"))
    plan = skrr.Plan(skip=[2, 3], method="laco", info={"merged_params": [name]})
    with pytest.raises(skrr.PlanError, match="needs their merged weights"):
        skrr.apply(model, plan)
    with pytest.raises(skrr.PlanError, match="name other parameters"):
        skrr.apply(model, plan, merged={"encoder.nothing": torch.ones(1)})
    merged = {name: torch.full_like(dict(model.named_parameters())[name], 0.25)}
    pruned = skrr.apply(model, plan, merged=merged)
    from skrr_compile.utils.tensors import named_tensors

    assert torch.equal(named_tensors(pruned.graph_module)[name], merged[name])
    assert not torch.equal(dict(model.named_parameters())[name], merged[name])  # the dense model is untouched


def test_compiled_bert_with_token_type_ids_has_no_graph_break_and_still_checks_them():
    import torch
    from factories import FAMILIES, inputs

    import skrr_compile as skrr

    pruned = skrr.apply(FAMILIES["bert"].make(seed=2), skrr.Plan(skip=[1]))
    ids, mask = inputs(2, 7)
    zeros = torch.zeros_like(ids)
    explained = torch._dynamo.explain(pruned)(ids, attention_mask=mask, token_type_ids=zeros)
    assert explained.graph_break_count == 0, [str(r.reason)[:100] for r in explained.break_reasons]
    compiled = torch.compile(pruned, backend="eager")
    torch.testing.assert_close(compiled(ids, attention_mask=mask, token_type_ids=zeros).last_hidden_state,
                               pruned(ids, attention_mask=mask).last_hidden_state)
    with pytest.raises(RuntimeError, match="token_type_ids = 0"):
        compiled(ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))
    with pytest.raises(ValueError, match="non-zero token_type_ids"):
        pruned(ids, attention_mask=mask, token_type_ids=torch.ones_like(ids))


# distributed(): only failed collectives are "another rank stopped" -----------------------------------------
GLOO_RESET = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:10664: "
              "Connection reset by peer. This is typically caused by a remote worker hanging")  # measured: rank died
GLOO_TIMEOUT = ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "3000ms for recv operation to complete")  # measured: rank hung past --dist-timeout


def _collective_errors():
    import torch.distributed as dist

    return [
        dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error"),
        dist.DistNetworkError("failed to recv, got 0 bytes"),
        dist.DistStoreError("Socket Timeout"),
        RuntimeError(GLOO_RESET),
        RuntimeError(GLOO_TIMEOUT),
        TimeoutError("store get timed out"),
        ConnectionResetError(104, "Connection reset by peer"),
    ]


@pytest.fixture
def fake_group(monkeypatch):
    """A process group that is up (rank 1 of it) without torchrun."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)


@pytest.mark.parametrize("index", range(7))
def test_distributed_labels_failed_collectives(fake_group, index):
    from skrr_compile.cli.main import CLIError, distributed

    error = _collective_errors()[index]

    def run():
        raise error

    with pytest.raises(CLIError) as info:
        distributed(run, hint="nothing was written; run it again")
    message = str(info.value)
    assert message.startswith("rank 1: another rank stopped or timed out (") and message.endswith(
        "); nothing was written; run it again")
    assert str(error).splitlines()[0][:60] in message and info.value.__cause__ is error


def test_distributed_keeps_other_errors_as_they_are(fake_group, capsys):
    """A genuine error of the work under torchrun (a shape error in a forward, a bad input, a CLI error) keeps
    its own message; before, every RuntimeError was reported as another rank having stopped."""
    import argparse

    import torch

    from skrr_compile.cli.main import CLIError, _run, distributed

    def shape_error():
        return torch.nn.Linear(32, 8)(torch.ones(2, 16))

    with pytest.raises(RuntimeError) as info:
        distributed(shape_error)
    assert "cannot be multiplied" in str(info.value) and "another rank" not in str(info.value)
    for error in (ValueError("--sparsity must be in [0, 1), got 1.5"), CLIError("--out 'x' is not empty"),
                  KeyError("select"), RuntimeError("expected scalar type Float but found Half")):
        def run(error=error):
            raise error

        with pytest.raises(type(error)) as info:
            distributed(run)
        assert info.value is error
    # through the CLI's error handling: a ValueError is its own one line, not a dead rank
    args = argparse.Namespace(command="sweep", func=lambda a: distributed(
        lambda: (_ for _ in ()).throw(ValueError("component 'unet': bad pattern 3:2"))))
    assert _run(args) == 2
    assert capsys.readouterr().err.strip() == "skrr-compile sweep: error: component 'unet': bad pattern 3:2"
