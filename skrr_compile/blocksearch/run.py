"""The search entry point: calibrate, build the evaluator, run one method, report; results as models."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skrr_compile.blocksearch.calibration import Calibration, read_prompts, tokenize
from skrr_compile.blocksearch.checkpoint import STATE_FILE, Checkpoint, input_key
from skrr_compile.blocksearch.config import DTYPES, METHODS, OFFLOAD_MODES, SearchConfig  # noqa: F401 (re-exported)
from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state
from skrr_compile.blocksearch.distributed import current_group
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.heal import heal_plan, replaceme_span
from skrr_compile.blocksearch.laco import LACO_DEFAULTS, laco
from skrr_compile.blocksearch.memory import chunk_shapes_of, measured_peak, plan_memory
from skrr_compile.blocksearch.offload import OffloadBudgetError, SafetensorsSource, WeightStore, source_digest
from skrr_compile.blocksearch.runner import Config, StagedRunner
from skrr_compile.blocksearch.selectors import output_selector, with_hidden_states
from skrr_compile.blocksearch.shortgpt import shortgpt
from skrr_compile.blocksearch.skrr import beam_skip, reuse_phase
from skrr_compile.blocksearch.target import check_sparsity, removed_by_skip
from skrr_compile.core.plan import Plan
from skrr_compile.core.trace import EncoderGraph, trace
from skrr_compile.utils.allocator import keep_large_tensors_mmapped
from skrr_compile.utils.tensors import retarget_devices


@dataclass
class SearchResult:
    plan: Plan
    report: dict
    overrides: dict = field(default_factory=dict)  # LaCo: merged parameter values by name
    weights: object = None  # offload "disk": the WeightStore whose host tensors hold the weights
    unhealed: SearchResult | None = None  # heal=: the same search's plan before healing (compare's plain row)


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


def stacking_line(asked, ev) -> str:
    """What candidate batching does on this backend (the probe of stacked rows against rows alone, by shape)."""
    st = ev.stacking
    if st["bit_identical"]:
        return f"candidate batching: {ev.candidate_batch} candidates per stacked forward (rows bit-identical to rows alone here)"
    diff = f"stacked rows differ from rows alone by up to {st['max_relative_difference']:.1e} (relative) on this backend"
    if ev.candidate_batch == 1:
        return f"candidate batching {asked}: off ({diff} at every chunk shape; candidates are scored one at a time)"
    return (f"candidate batching: {ev.candidate_batch} candidates per stacked forward (rows bit-identical to rows alone "
            f"here) at {st['shapes'] - st['shapes_alone']} of {st['shapes']} chunk shapes; the other "
            f"{st['shapes_alone']} are scored one candidate at a time ({diff})")


def search(
    model,
    tokenizer,
    prompts: Sequence[str] | str | Calibration,
    config: SearchConfig | None = None,
    *,
    projection=None,
    select: Callable = last_hidden_state,
    graph: EncoderGraph | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    **options,
) -> SearchResult:
    """Find a plan that removes at least `config.target.sparsity` of the encoder's parameters (paper accounting).

    `config` (blocksearch/config.py `SearchConfig`) holds every option that is data; flat `options` (the
    names of its fields: `sparsity=0.4, beam=3, template=..., cache_gb=...`) build one, or change the given
    one. The rest are run-time objects: `projection` (the denoiser's caption projection: a module, a callable
    or a tuple of them; identity by default), `select` (a callable picking what is scored from the output;
    `hidden_layer` builds one), `graph` (an EncoderGraph already traced from `model`), `out_dir`/`resume` (the
    checkpointed state), `progress`.

    What the denoiser reads (LLM encoders): `template` ("...{prompt}...", the null prompt too), `drop_tokens`
    (the first N tokens of the embedding left out), `hidden_layer` (-2, or a list of layers concatenated
    along the channels, instead of the last hidden state; see blocksearch/selectors.py).

    Memory (blocksearch/memory.py): `dtype` fp32|bf16|fp16 (default bf16 on CUDA, fp32 on CPU; a model in
    another dtype is searched as a converted copy; discrepancy sums accumulate in fp32), `reference`
    device|cpu|disk (where the projected dense reference lives), `cache_gb` boundary states on the device,
    `host_cache_gb` more of them spilled to host memory (CUDA; default min(16, cache_gb * 4)), `offload`
    none|cpu|disk (weights stay on the host, or with disk in the checkpoint's safetensors under
    `weights_path`, read by memory map, the model itself on the meta device; each stage's are copied to
    `device` as it runs, within `device_budget_gb`). The memory plan is printed at the start and kept in the
    report with the measured peak; the config is kept in the report (`report["config"]`).

    `levers` (for measurement) names the exact speed levers to use, default all of
    blocksearch/evaluator.LEVERS; none changes the plan or a score, only the work done.
    """
    config = SearchConfig.from_kwargs(**options) if config is None else config.replace(**options)
    t, m = config.target, config.memory
    sparsity, method, beam, levers, laco_params = t.sparsity, t.method, t.beam, t.levers, t.laco_params
    hidden_layer = config.reads.hidden_layer
    if hidden_layer is not None:
        if select is not last_hidden_state:
            raise SearchError("pass either select or hidden_layer, not both")
        select = output_selector(hidden_layer)
    reference, offload, cache_gb, host_cache_gb = m.reference, m.offload, m.cache_gb, m.host_cache_gb
    weights_path, device_budget_gb = m.weights_path, m.device_budget_gb
    model_device = next(iter((graph.graph_module if graph is not None else model).parameters())).device
    device = torch.device(m.device) if m.device is not None else model_device
    if offload == "none" and device != model_device:
        raise SearchError(f"the model is on {model_device}, the search device is {device}: move the model, "
                          "or pass offload='cpu' to keep its weights on the host")
    dtype = resolve_dtype(m.dtype, device)
    torch.manual_seed(t.seed)
    model, graph = in_dtype(model, graph, dtype)
    quant = config.quantize.quant_config()
    if quant is not None:  # quantization-aware: F.linear / F.embedding calls that torchao tensors dispatch
        from skrr_compile.blocksearch.quantized import functional_graph

        graph = functional_graph(graph, quant, m.offload, device)
    target = check_sparsity(graph, sparsity)
    c, r = config.calibration, config.reads
    calibration = prepare_calibration(tokenizer, prompts, max_length=c.max_length, padding=c.padding,
                                      chunk_size=c.chunk_size, min_tokens=c.min_tokens, max_tokens=c.max_tokens,
                                      read=r.read, template=r.template, drop_tokens=r.drop_tokens)
    calibration = calibration.to(device)
    # a Calibration given as prompts was tokenized by the caller: the config records what is really scored
    config = config.replace(read=calibration.read, template=calibration.template,
                            drop_tokens=calibration.drop_tokens)
    projection = projection_in(projection, dtype, device)
    key = input_key(graph, calibration, **config.resume_fields(), projection=_describe(projection),
                     **_selection_key(select, calibration.drop_tokens),
                     **({"weights_source": source_digest(weights_path)} if offload == "disk" else {}))
    group = current_group()
    ckpt = Checkpoint(Path(out_dir) / STATE_FILE if out_dir else None, key, resume)
    ckpt.state = group.broadcast_object(ckpt.state)  # every rank resumes from what rank 0 read
    ckpt.writable = group.is_writer  # one writer: rank 0
    if ckpt.state.get("phase") == "done":  # LaCo's merged weights are in a file next to the state
        device = next(iter(graph.graph_module.parameters())).device
        return SearchResult(Plan.from_dict(ckpt.state["plan"]), ckpt.state["report"],
                            ckpt.load_tensors("laco", device))
    t0 = time.perf_counter()
    weights = None
    if offload != "none":
        budget = int(device_budget_gb * (1 << 30)) if device_budget_gb is not None else None
        # device constants baked in at trace time (arange(device=...), .to(device)) follow the search device
        run_graph = dataclasses.replace(graph, graph_module=graph.copy_graph_module())
        retarget_devices(run_graph.graph_module, device)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        try:
            source = SafetensorsSource(weights_path) if offload == "disk" else None
            weights = WeightStore(run_graph, device, budget, source=source, dtype=dtype, tied=tied)
        except (OffloadBudgetError, FileNotFoundError, KeyError, ValueError) as e:
            raise SearchError(str(e).strip("'\"")) from e
    runner = StagedRunner(run_graph if weights is not None else graph, weights=weights)
    runner.restrict_outputs(select)
    cache_bytes = int(cache_gb * (1 << 30))
    if host_cache_gb is None:
        host_cache_gb = min(16.0, 4 * cache_gb) if device.type == "cuda" else 0.0
    width_k = t.width
    memory = plan_memory(runner, chunk_shapes_of(calibration), projection_width=_projection_width(projection),
                         dtype=dtype, cache_bytes=cache_bytes, beam=width_k, reference=reference,
                         offload=offload, device=str(device))
    if progress:
        print("\n".join(memory.lines()), flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    malloc_tuned = keep_large_tensors_mmapped() if device.type == "cpu" else False
    progress = progress and group.is_writer  # bars and logs on rank 0 only
    ev = Evaluator(runner, calibration, projection, select, cache_bytes=cache_bytes, group=group,
                   beam=width_k, progress=progress, host_cache_bytes=int(host_cache_gb * (1 << 30)),
                   reference=reference, levers=levers, candidate_batch=m.candidate_batch,
                   distribute=m.distribute, reference_path=(Path(out_dir) / (".reference.safetensors" if group.world == 1 else
                                                     f".reference.rank{group.rank}.safetensors")) if out_dir else None)
    if progress and ev.stacking is not None:
        print(stacking_line(m.candidate_batch, ev), flush=True)
    report: dict = {"method": method, "target_sparsity": sparsity, "beam": t.width, "config": config.to_dict()}
    if quant is not None:  # the reference above is dense full precision; every candidate now runs quantized
        from skrr_compile.blocksearch.quantized import quantize_evaluator

        report["quantization"] = quantize_evaluator(ev, graph, quant)
    overrides: dict = {}
    if method in ("skrr", "skrr-skip", "finercut"):
        best, history = beam_skip(graph, ev, target, 1 if method == "finercut" else beam, ckpt, progress)
        report["depth_history"] = history
        if method == "skrr":  # the skip phase alone is what method skrr-skip returns: kept for compare
            skip_only = Config(best.config.skip)
            report["skip_phase"] = {"skip": sorted(best.config.skip), "order": list(best.order),
                                    "removed_params": removed_by_skip(graph, best.config.skip, {}),
                                    "counter": runner.counter.to_dict(), "seconds": time.perf_counter() - t0}
            best, steps = reuse_phase(graph, ev, best, ckpt, progress)
            report["reuse_steps"] = steps
        plan = Plan(skip=sorted(best.config.skip), reuse=best.config.reuse_map, method=method, order=best.order,
                    scores=tuple(h["score"] for h in history), fingerprint=graph.fingerprint)
        report["discrepancy"] = best.score
    elif method == "shortgpt":
        skip, ranking = shortgpt(graph, ev, target)
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint)
        report["layer_ranking"] = ranking
    elif method == "replaceme":  # ReplaceMe: one span of whole layers, healed below with one lstsq map
        skip, span = replaceme_span(graph, ev, target)
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint)
        report["replaceme"] = span
    else:
        skip, overrides, log = laco(graph, ev, target, laco_params or {}, ckpt)
        plan = Plan(skip=skip, method=method, fingerprint=graph.fingerprint,
                    info={"laco": {**LACO_DEFAULTS, **(laco_params or {})}, "merged_params": sorted(overrides)})
        report["laco_log"] = log
    ev.clear()  # the boundary states are not needed for the report
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
        "candidate_batch": {"asked": m.candidate_batch, "used": ev.candidate_batch, "lane_peak_bytes": ev.lane_bytes,
                            "stacking": ev.stacking},
        "cache": {"stride": ev.stride, "boundary_bytes": ev.per_boundary_bytes,
                  "note": f"every {ev.stride}. boundary of each beam kept ({ev.per_boundary_bytes / 2**20:.1f} MiB each)"},
        "dtype": str(dtype).removeprefix("torch."),
        "memory": {"plan": memory.to_dict(), "cache": ev.budget.to_dict(), "reference": reference,
                   "malloc_mmap_threshold_fixed": malloc_tuned,
                   "offload": weights.to_dict() if weights is not None else None},
        "calibration": {"prompts": calibration.num_prompts, "truncated": calibration.truncated,
                        "dropped": calibration.dropped, "read": calibration.read,
                        "template": calibration.template, "drop_tokens": calibration.drop_tokens,
                        "select": getattr(select, "__name__", None) or repr(select)},
    })
    with runner.overridden(overrides):
        report["calibration_report"] = ev.report(Config(frozenset(plan.skip), tuple(sorted(plan.reuse.items())))).to_dict()
    if "skip_phase" in report:
        report["skip_phase"]["calibration_report"] = ev.report(skip_only).to_dict()
    heal_method = config.heal.heal or ("lstsq" if method == "replaceme" else None)
    plain_plan, plain_overrides = plan, overrides
    if heal_method:  # the final plan's runs of skipped sub-blocks, each healed by a map merged into kept weights
        plan, overrides, heal_report = heal_plan(graph, ev, plan, overrides, config.heal, method=heal_method,
                                                 progress=progress)
        report["heal"] = {k: v for k, v in heal_report.items() if k != "calibration_report_before"}
        report["heal"]["share_of_seconds"] = heal_report["seconds"] / (report["seconds"] + heal_report["seconds"])
        report["seconds"] += heal_report["seconds"]
        report["calibration_report"] = heal_report["calibration_report"]
    per_rank = group.gather_objects({"rank": group.rank, "seconds": time.perf_counter() - t0,
                                     "wait_seconds": ev.wait_seconds, "chunks": len(ev.chunks),
                                     **runner.counter.to_dict()})
    report["distributed"] = {"world_size": group.world, "ranks": per_rank}
    if group.world > 1:  # the search's cost over all ranks
        report["counter"] = {k: sum(r[k] for r in per_rank) for k in runner.counter.to_dict()}
    if method != "laco":
        report["discrepancy"] = report["calibration_report"]["discrepancy"]
    peak = measured_peak(device)
    report["memory"]["measured_peak"] = peak
    ev.disc.reference.close()
    if progress:
        print(f"measured peak device memory: {peak['bytes'] / (1 << 30):.2f} GiB ({peak['what']}; "
              f"estimated {memory.peak / (1 << 30):.2f} GiB)", flush=True)
    result = SearchResult(plan, report, overrides, weights if offload == "disk" else None)
    if heal_method and method != "replaceme":  # ReplaceMe is a healed span by definition
        before = {k: v for k, v in report.items() if k != "heal"}
        before.update(seconds=report["seconds"] - heal_report["seconds"],
                      calibration_report=heal_report["calibration_report_before"])
        if "discrepancy" in report:
            before["discrepancy"] = before["calibration_report"]["discrepancy"]
        result.unhealed = SearchResult(plain_plan, before, plain_overrides, result.weights)
    if heal_method and overrides:  # the healed weights are part of the finished state (read back on resume)
        ckpt.save_tensors("laco", overrides)
    ckpt.save(phase="done", plan=plan.to_dict(), report=report)
    return result


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The search dtype: bf16 on CUDA and fp32 on CPU by default (bf16 is slow on most CPUs)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise SearchError(f"dtype must be one of {', '.join(DTYPES)} (or auto), got {dtype!r}")


def in_dtype(model, graph: EncoderGraph | None, dtype: torch.dtype):
    """(model, graph) in the search dtype: a converted copy when the model has another dtype (HF code
    paths depend on the dtype, so the graph is traced again from the copy)."""
    source = graph.graph_module if graph is not None else model
    current = next(p for p in source.parameters() if p.is_floating_point()).dtype
    if current == dtype:
        return model, graph or trace(model)
    if model is None:
        raise SearchError(f"the graph is in {current}, the search dtype is {dtype}; pass the model too")
    import copy

    converted = copy.deepcopy(model).to(dtype)
    return converted, trace(converted)


def projection_in(projection, dtype: torch.dtype, device: torch.device):
    """Projection modules on the search device and in its dtype (copies; the caller's are untouched)."""
    import copy

    def convert(p):
        if isinstance(p, torch.nn.Module):
            params = list(p.parameters())
            if params and (params[0].dtype != dtype or params[0].device != device):
                return copy.deepcopy(p).to(device=device, dtype=dtype)
        return p

    if isinstance(projection, (tuple, list)):
        return type(projection)(convert(p) for p in projection)
    return convert(projection)


def _projection_width(projection) -> int | None:
    last = projection[-1] if isinstance(projection, (tuple, list)) else projection
    if isinstance(last, torch.nn.Module):
        linears = [m for m in last.modules() if isinstance(m, torch.nn.Linear)]
        return linears[-1].out_features if linears else None
    return None


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
            s = sum(float(t.detach().double().sum()) for t in p.parameters())
            desc.append(f"{type(p).__name__}:{s:.6e}")
        else:
            desc.append(repr(p))
    return "|".join(desc)


# --- results as models, held-out evaluation, comparison ------------------------------------------------
def materialize(graph: EncoderGraph, result: SearchResult):
    """The PrunedEncoder of a search result (LaCo's merged parameters bound in place of the originals)."""
    from skrr_compile.core.encoder import apply
    from skrr_compile.utils.tensors import bind_tensors, named_tensors

    pruned = apply(graph, result.plan, merged=result.overrides or None)
    if result.weights is not None:  # a meta-device model searched with offload="disk": bind the checkpoint's
        tensors = named_tensors(pruned.graph_module)
        bind_tensors(pruned.graph_module, {k: (result.weights.host_tensor(k) if v.is_meta else v)
                                           for k, v in tensors.items()})
    if result.overrides:
        tensors = named_tensors(pruned.graph_module)
        tensors.update({k: v.clone() for k, v in result.overrides.items()})
        bind_tensors(pruned.graph_module, tensors)
    return pruned


def skip_phase_result(result: SearchResult) -> SearchResult:
    """The skrr-skip result inside a skrr result: the same beam search, before the re-use phase (identical to
    running method skrr-skip with the same inputs), so `compare` need not search twice."""
    sp, rep = result.report["skip_phase"], result.report
    plan = Plan(skip=sp["skip"], method="skrr-skip", order=tuple(sp["order"]), scores=result.plan.scores,
                fingerprint=result.plan.fingerprint)
    report = {k: v for k, v in rep.items() if k not in ("skip_phase", "reuse_steps")}
    report.update(method="skrr-skip", skip=list(plan.skip), reuse={}, order=list(plan.order),
                  removed_params=sp["removed_params"], sparsity=sp["removed_params"] / rep["total_params"],
                  counter=sp["counter"], seconds=sp["seconds"], calibration_report=sp["calibration_report"],
                  discrepancy=sp["calibration_report"]["discrepancy"])
    return SearchResult(plan, report)


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
