"""The search entry point: calibrate, build the evaluator, run one method, report; results as models."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skrr_compile.blocksearch.calibration import Calibration, read_prompts, tokenize
from skrr_compile.blocksearch.checkpoint import STATE_FILE, Checkpoint, input_key
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.laco import LACO_DEFAULTS, laco
from skrr_compile.blocksearch.runner import Config, StagedRunner
from skrr_compile.blocksearch.selectors import output_selector, with_hidden_states
from skrr_compile.blocksearch.shortgpt import shortgpt
from skrr_compile.blocksearch.skrr import beam_skip, reuse_phase
from skrr_compile.blocksearch.target import check_sparsity
from skrr_compile.core.plan import Plan
from skrr_compile.core.trace import EncoderGraph, trace

METHODS = ("skrr", "skrr-skip", "finercut", "shortgpt", "laco")




@dataclass
class SearchResult:
    plan: Plan
    report: dict
    overrides: dict = field(default_factory=dict)  # LaCo: merged parameter values by name


# --- entry point ----------------------------------------------------------------------------------------
def prepare_calibration(tokenizer, prompts, *, max_length=None, padding="longest", chunk_size=16,
                        min_tokens=None, max_tokens=None, read="mask", field=None, limit=None,
                        template=None, drop_tokens=0) -> Calibration:
    if isinstance(prompts, Calibration):
        if (template, drop_tokens) not in ((None, 0), (prompts.template, prompts.drop_tokens)):
            raise SearchError("template/drop_tokens differ from the given Calibration's; pass them to tokenize")
        return prompts
    if tokenizer is None:
        raise SearchError("a tokenizer is needed to tokenize the prompts (or pass a Calibration)")
    texts = read_prompts(prompts, field=field, limit=limit)
    return tokenize(tokenizer, texts, max_length=max_length, padding=padding, chunk_size=chunk_size,
                    min_tokens=min_tokens, max_tokens=max_tokens, read=read,
                    template=template, drop_tokens=drop_tokens)


def search(
    model,
    tokenizer,
    prompts: Sequence[str] | str | Calibration,
    *,
    sparsity: float,
    method: str = "skrr",
    beam: int = 3,
    projection=None,
    select: Callable = last_hidden_state,
    read: str = "mask",
    max_length: int | None = None,
    padding: str = "longest",
    chunk_size: int = 16,
    min_tokens: int | None = None,
    max_tokens: int | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    cache_gb: float = 4.0,
    laco_params: dict | None = None,
    seed: int = 0,
    graph: EncoderGraph | None = None,
    template: str | None = None,
    drop_tokens: int = 0,
    hidden_layer: int | str | Sequence[int] | None = None,
) -> SearchResult:
    """Find a plan that removes at least `sparsity` of the encoder's parameters (paper accounting).

    What the denoiser reads (LLM encoders): `template` ("...{prompt}...", the null prompt too), `drop_tokens`
    (the first N tokens of the embedding left out), `hidden_layer` (-2, or a list of layers concatenated
    along the channels, instead of the last hidden state; see blocksearch/selectors.py)."""
    if method not in METHODS:
        raise SearchError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if beam < 1:
        raise SearchError(f"beam must be >= 1, got {beam}")
    if hidden_layer is not None:
        if select is not last_hidden_state:
            raise SearchError("pass either select or hidden_layer, not both")
        try:
            select = output_selector(hidden_layer)
        except ValueError as e:
            raise SearchError(str(e)) from e
    torch.manual_seed(seed)
    graph = graph or trace(model)
    target = check_sparsity(graph, sparsity)
    calibration = prepare_calibration(tokenizer, prompts, max_length=max_length, padding=padding,
                                      chunk_size=chunk_size, min_tokens=min_tokens, max_tokens=max_tokens, read=read,
                                      template=template, drop_tokens=drop_tokens)
    calibration = calibration.to(graph.graph_module.parameters().__next__().device)
    width = "finercut" if method == "finercut" else beam
    key = input_key(graph, calibration, sparsity=sparsity, method=method, beam=width, read=read,
                     laco=laco_params, projection=_describe(projection),
                     **_selection_key(select, calibration.drop_tokens))
    ckpt = Checkpoint(Path(out_dir) / STATE_FILE if out_dir else None, key, resume)
    if ckpt.state.get("phase") == "done":  # LaCo's merged weights are in a file next to the state
        device = next(iter(graph.graph_module.parameters())).device
        return SearchResult(Plan.from_dict(ckpt.state["plan"]), ckpt.state["report"],
                            ckpt.load_tensors("laco", device))
    t0 = time.perf_counter()
    runner = StagedRunner(graph)
    ev = Evaluator(runner, calibration, projection, select, cache_bytes=int(cache_gb * (1 << 30)),
                   beam=1 if method == "finercut" else beam, progress=progress)
    report: dict = {"method": method, "target_sparsity": sparsity, "beam": 1 if method == "finercut" else beam}
    overrides: dict = {}
    if method in ("skrr", "skrr-skip", "finercut"):
        best, history = beam_skip(graph, ev, target, 1 if method == "finercut" else beam, ckpt, progress)
        report["depth_history"] = history
        if method == "skrr":
            best, steps = reuse_phase(graph, ev, best, ckpt, progress)
            report["reuse_steps"] = steps
        plan = Plan(skip=sorted(best.config.skip), reuse=best.config.reuse_map, method=method, order=best.order,
                    scores=tuple(h["score"] for h in history), fingerprint=graph.fingerprint)
        report["discrepancy"] = best.score
    elif method == "shortgpt":
        skip, ranking = shortgpt(graph, ev, target)
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint)
        report["layer_ranking"] = ranking
    else:
        skip, overrides, log = laco(graph, ev, target, laco_params or {}, ckpt)
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint,
                    info={"laco": {**LACO_DEFAULTS, **(laco_params or {})}, "merged_params": sorted(overrides)})
        report["laco_log"] = log
    removed = graph.removed_params(plan)
    report.update({
        "sparsity": removed / graph.total_params,
        "removed_params": removed,
        "total_params": graph.total_params,
        "skip": list(plan.skip),
        "reuse": {str(k): v for k, v in plan.reuse.items()},
        "order": list(plan.order or ()),
        "counter": runner.counter.to_dict(),
        "seconds": time.perf_counter() - t0,
        "kernels_backend": ev.disc.backend,
        "cache": {"stride": ev.stride, "boundary_bytes": ev.per_boundary_bytes,
                  "note": f"every {ev.stride}. boundary of each beam kept ({ev.per_boundary_bytes / 2**20:.1f} MiB each)"},
        "calibration": {"prompts": calibration.num_prompts, "truncated": calibration.truncated,
                        "dropped": calibration.dropped, "read": calibration.read,
                        "template": calibration.template, "drop_tokens": calibration.drop_tokens,
                        "select": getattr(select, "__name__", None) or repr(select)},
    })
    with runner.overridden(overrides):
        outs, null = ev.outputs(Config(frozenset(plan.skip), tuple(sorted(plan.reuse.items()))))
        report["calibration_report"] = ev.disc.report(outs, null).to_dict()
    if method != "laco":
        report["discrepancy"] = report["calibration_report"]["discrepancy"]
    result = SearchResult(plan, report, overrides)
    ckpt.save(phase="done", plan=plan.to_dict(), report=report)
    return result


def _selection_key(select, drop_tokens: int) -> dict:
    """What the discrepancy reads, for the state key (empty by default: older states stay resumable)."""
    key = {} if select is last_hidden_state else {"select": repr(select)}
    return {**key, "drop_tokens": drop_tokens} if drop_tokens else key


def _describe(projection) -> str:
    if projection is None:
        return "identity"
    parts = projection if isinstance(projection, (tuple, list)) else (projection,)
    desc = []
    for p in parts:
        if isinstance(p, torch.nn.Module):
            s = sum(float(t.double().sum()) for t in p.parameters())
            desc.append(f"{type(p).__name__}:{s:.6e}")
        else:
            desc.append(repr(p))
    return "|".join(desc)


# --- results as models, held-out evaluation, comparison ------------------------------------------------
def materialize(graph: EncoderGraph, result: SearchResult):
    """The PrunedEncoder of a search result (LaCo's merged parameters bound in place of the originals)."""
    from skrr_compile.core.encoder import apply
    from skrr_compile.utils.tensors import bind_tensors, named_tensors

    pruned = apply(graph, result.plan)
    if result.overrides:
        tensors = named_tensors(pruned.graph_module)
        tensors.update({k: v.clone() for k, v in result.overrides.items()})
        bind_tensors(pruned.graph_module, tensors)
    return pruned


def heldout_report(dense, pruned, calibration: Calibration, projection=None, select=last_hidden_state) -> dict:
    """Discrepancy of `pruned` against the dense HF model on a held-out calibration set."""
    dense, pruned = with_hidden_states(dense, select), with_hidden_states(pruned, select)
    return Discrepancy(dense, calibration, projection, select).evaluate(pruned).to_dict()


def result_row(graph: EncoderGraph, result: SearchResult, pruned, heldout: dict | None = None) -> dict:
    cal = result.report.get("calibration_report", {})
    return {
        "method": result.plan.method,
        "target": result.report["target_sparsity"],
        "sparsity": result.report["sparsity"],
        "params": pruned.num_params,
        "mb": pruned.num_bytes / 1e6,
        "calib_discrepancy": cal.get("discrepancy"),
        "calib_cosine": cal.get("cosine"),
        "calib_null_norm_ratio": cal.get("null_norm_ratio"),
        "heldout_discrepancy": (heldout or {}).get("discrepancy"),
        "heldout_cosine": (heldout or {}).get("cosine"),
        "heldout_null_norm_ratio": (heldout or {}).get("null_norm_ratio"),
        "skip": list(result.plan.skip),
        "reuse": {str(k): v for k, v in result.plan.reuse.items()},
        "order": list(result.plan.order or ()),
        "block_evals": result.report["counter"]["block_evals"],
        "seconds": result.report["seconds"],
    }
