"""CLI: search, prune (search + apply + save + report), eval (held-out report), compare (methods x sparsities)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from skrr_compile.blocksearch.calibration import read_prompts
from skrr_compile.blocksearch.checkpoint import STATE_FILE, input_key
from skrr_compile.blocksearch.config import SearchConfig
from skrr_compile.blocksearch.distributed import ShardedDiscrepancy
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.blocksearch.laco import save_plan
from skrr_compile.blocksearch.report import (
    EVAL_COLUMNS,
    health_line,
    markdown_table,
    row_health,
    write_report,
)
from skrr_compile.blocksearch.run import (
    METHODS,
    SearchResult,
    materialize,
    prepare_calibration,
    result_row,
    search,
    skip_phase_result,
)
from skrr_compile.blocksearch.selectors import output_selector, parse_layers, with_hidden_states
from skrr_compile.blocksearch.target import check_sparsity
from skrr_compile.cli.main import (
    CLIError,
    add_dist_timeout,
    add_distribute,
    agree,
    candidate_batch_arg,
    check_out_dir,
    distributed,
    heal_ridge_arg,
    join_group,
)
from skrr_compile.cli.quantize import (
    add_quant_args,
    deployed_lines,
    deployed_table,
    estimated_lines,
    quant_config,
)
from skrr_compile.core.checkpoints import (
    describe_source,
    load_empty_encoder,
    load_encoder,
    load_tokenizer,
    resolve_model_path,
)
from skrr_compile.core.plan import Plan
from skrr_compile.core.storage import load, read_model_meta, save
from skrr_compile.core.trace import trace
from skrr_compile.utils.files import atomic_write_text


def _calibration_args(p, heldout: bool = True) -> None:
    p.add_argument("--prompts", required=True, help="prompt file (.txt/.jsonl/.tsv/.csv) or 'builtin'")
    p.add_argument("--field", help="jsonl field / tsv,csv column holding the prompt")
    p.add_argument("--limit", type=int, help="use the first N prompts")
    p.add_argument("--max-length", type=int, help="token limit (default: the tokenizer's)")
    p.add_argument("--min-tokens", type=int, help="keep prompts with at least this many tokens (paper: 150)")
    p.add_argument("--max-tokens", type=int, help="keep prompts with at most this many tokens (paper: 250)")
    p.add_argument("--padding", default="longest", choices=["longest", "max_length"])
    p.add_argument("--read", default="mask", choices=["mask", "all"],
                   help="positions the consumer reads: attention-mask tokens (PixArt) or all padded ones (SD CLIP)")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--template", help="prompt template of the pipeline, '...{prompt}...' (the null prompt too)")
    p.add_argument("--drop-tokens", type=int, default=0, help="leave the first N embedding tokens out (Qwen-Image: 34)")
    p.add_argument("--hidden-layer", type=_hidden_layer, help="hidden state the denoiser reads: -2, or 10,20,30 (concatenated)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's own, or the GGUF file's)")
    if heldout:
        p.add_argument("--heldout", help="held-out prompt file for the report")
        p.add_argument("--heldout-field")
        p.add_argument("--heldout-limit", type=int)


def _search_args(p) -> None:
    p.add_argument("model", help="HF encoder/checkpoint directory, a .gguf file, 'builtin' (all-MiniLM-L6-v2) "
                   "or 'builtin-llm' (SmolLM2-135M-Instruct)")
    _calibration_args(p)
    p.add_argument("--sparsity", type=float, required=True, help="fraction of encoder parameters to remove")
    p.add_argument("--method", default="skrr", choices=METHODS)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--out", help="output directory (required unless --dry-run)")
    p.add_argument("--projection-width", type=int, help="--dry-run: width of the caption projection (PixArt-Sigma: 1152)")
    p.add_argument("--resume", action="store_true", help="continue the search state in --out")
    p.add_argument("--cache-gb", type=float, default=4.0, help="device memory for cached boundary states")
    p.add_argument("--heal", choices=["lstsq", "cosine"],
                   help="heal the final plan: one linear map per run of skipped sub-blocks, merged into kept weights")
    p.add_argument("--heal-ridge", type=heal_ridge_arg, default="auto",
                   help="healing ridge, relative to the mean diagonal of f^T f (default auto: the value of 1e-6..10 "
                        "with the lowest error on held-out folds of the calibration prompts)")
    _memory_args(p)
    add_quant_args(p, aware="prune: score every candidate with the quantized weights against the dense "
                   "full-precision reference (quantization-aware search); without it prune searches in full "
                   "precision and quantizes the plan's model after. search --quantize is always aware")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _memory_args(p) -> None:
    g = p.add_argument_group("memory (see the memory plan a search prints first)")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="search dtype (auto: bf16 on CUDA, fp32 on CPU); sums accumulate in fp32")
    g.add_argument("--device", help="search device (default: cuda if available, else cpu)")
    g.add_argument("--reference", default="device", choices=["device", "cpu", "disk"],
                   help="where the projected dense reference lives (disk: safetensors read by memory map)")
    g.add_argument("--host-cache-gb", type=float, help="more boundary states spilled to host memory (CUDA)")
    g.add_argument("--offload", default="none", choices=["none", "cpu", "disk"],
                   help="cpu: weights stay in host memory, each stage's copied to the device as it runs; "
                        "disk: read from the checkpoint's safetensors by memory map (the model is never loaded)")
    g.add_argument("--device-budget-gb", type=float, help="with --offload: device memory the weights may use")
    g.add_argument("--candidate-batch", default="1", type=candidate_batch_arg, metavar="N|auto",
                   help="candidates scored in one stacked forward (exact; auto: sized by prompt rows and the "
                        "--cache-gb budget; default 1, one at a time)")
    add_distribute(g)
    add_dist_timeout(g)
    g.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device (no weights), print the memory plan, exit")


def search_config(args, **changes) -> SearchConfig:
    """The SearchConfig of these command-line options (`changes`: flat options set otherwise, e.g. compare's
    sparsity and method). The prompts are tokenized by the CLI itself (`_calibration`) with the same options."""
    options = {"sparsity": getattr(args, "sparsity", None), "method": getattr(args, "method", "skrr"),
               "beam": args.beam, "read": args.read, "template": args.template, "drop_tokens": args.drop_tokens,
               "hidden_layer": args.hidden_layer, "max_length": args.max_length, "padding": args.padding,
               "chunk_size": args.chunk_size, "min_tokens": args.min_tokens, "max_tokens": args.max_tokens}
    if hasattr(args, "offload"):  # search / prune: the memory options
        options.update(cache_gb=args.cache_gb, dtype=args.dtype, reference=args.reference,
                       host_cache_gb=args.host_cache_gb, offload=args.offload, device=_device(args),
                       device_budget_gb=args.device_budget_gb, candidate_batch=args.candidate_batch,
                       distribute=args.distribute, weights_path=resolve_model_path(args.model) if args.offload == "disk" else None)
    if getattr(args, "heal", None):
        options.update(heal=args.heal, heal_ridge=args.heal_ridge)
    if getattr(args, "quantize", None) and _quantize_aware(args):
        options.update(quantize=args.quantize, group_size=args.group_size,
                       quantize_embeddings=args.quantize_embeddings, quantize_keep=tuple(args.keep))
    options.update(changes)
    try:
        return SearchConfig.from_kwargs(**options)
    except SearchError as e:
        raise CLIError(str(e)) from e


def _quantize_aware(args) -> bool:
    """search --quantize S / prune --quantize S --quantize-aware: candidates scored with quantized weights."""
    if getattr(args, "quantize_aware", False) and not getattr(args, "quantize", None):
        raise CLIError("--quantize-aware needs --quantize SCHEME (int8, int8-dynamic, fp8, int4)")
    return bool(getattr(args, "quantize_aware", False) or getattr(args, "search_quantize_aware", False))


def _device(args) -> str:
    import torch

    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def dry_run(args) -> int:
    """The memory plan of this search, from the config alone: nothing is allocated for the weights."""
    import torch

    from skrr_compile.blocksearch.memory import chunk_shapes_of, padded_shapes, plan_memory
    from skrr_compile.blocksearch.run import resolve_dtype
    from skrr_compile.blocksearch.runner import StagedRunner
    from skrr_compile.core.checkpoints import load_meta_encoder, load_tokenizer, resolve_model_path

    if not 0.0 < args.sparsity < 1.0:
        raise CLIError(f"sparsity must be in (0, 1), got {args.sparsity}")
    device = torch.device(_device(args))
    dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, device)
    path = resolve_model_path(args.model)
    if path.is_dir() and not (path / "config.json").is_file():
        raise CLIError(f"{args.model!r} has no config.json: the dry run builds the model from its config")
    # on the meta device from the config (a .gguf file's from its metadata): no weight is allocated or dequantized
    model = load_meta_encoder(path, dtype=dtype)
    runner = StagedRunner(trace(model))
    tok = load_tokenizer(args.tokenizer or path) if path.is_dir() or args.tokenizer else None
    texts = read_prompts(args.prompts, field=args.field, limit=args.limit)
    if tok is not None:
        shapes, note = chunk_shapes_of(_calibration(args, tok)), ""
    else:
        if not args.max_length:
            raise CLIError("no tokenizer to count tokens with: pass --max-length (every prompt is padded to it)")
        shapes = padded_shapes(len(texts), args.max_length, args.chunk_size)
        note = f"no tokenizer: every prompt padded to {args.max_length} tokens"
    plan = plan_memory(runner, shapes, projection_width=args.projection_width, dtype=dtype,
                       cache_bytes=int(args.cache_gb * (1 << 30)), beam=1 if args.method == "finercut" else args.beam,
                       reference=args.reference, offload=args.offload, device=str(device), note=note)
    print("\n".join(plan.lines()))
    # the deployed size per scheme (exact bytes of the dense model; the pruned one's at the target, about)
    cfg = quant_config(args)
    print("\n".join(estimated_lines(runner.graph, args.sparsity, cfg, group_size=args.group_size)))
    return 0


def register(sub) -> None:
    p = sub.add_parser("search", help="search a plan (writes plan.json, report.json/.md, search_state.json)")
    _search_args(p)
    p.set_defaults(func=cmd_search, search_quantize_aware=True)  # search writes a plan: --quantize scores with it
    p = sub.add_parser("prune", help="search + apply + save the pruned model + report")
    _search_args(p)
    p.set_defaults(func=cmd_prune)
    p = sub.add_parser("eval", help="held-out discrepancy report of a pruned model directory")
    p.add_argument("pruned", help="directory written by prune / apply")
    p.add_argument("--model", help="the dense model (default: the source recorded at prune time)")
    _calibration_args(p, heldout=False)
    add_dist_timeout(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("compare", help="methods x sparsities: table and plot")
    p.add_argument("model")
    _calibration_args(p)
    p.add_argument("--sparsity", required=True, help="comma-separated, e.g. 0.3,0.4,0.5")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--heal", choices=["lstsq", "cosine"],
                   help="also heal each method's plan: a row METHOD+heal beside the unhealed row of the same search")
    p.add_argument("--heal-ridge", type=heal_ridge_arg, default="auto",
                   help="healing ridge, relative to the mean diagonal of f^T f (default auto: cross-validated)")
    p.add_argument("--out", required=True)
    p.add_argument("--quiet", action="store_true")
    add_dist_timeout(p)
    p.set_defaults(func=cmd_compare)


def _hidden_layer(spec: str) -> str:
    try:
        parse_layers(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return spec


def _source_notes(path) -> list[str]:
    """A line for the report when the dense model was a quantized GGUF file (dequantized to float)."""
    source = describe_source(path)
    return [f"source {source['format']}: {source['note']}"] if source["format"] == "gguf" else []


def _command() -> str:
    return "skrr-compile " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _calibration(args, tok, prefix: str = ""):
    get = lambda k: getattr(args, prefix + k, None)  # noqa: E731
    return prepare_calibration(
        tok, get("prompts") if not prefix else args.heldout, field=get("field"), limit=get("limit"),
        max_length=args.max_length, padding=args.padding, chunk_size=args.chunk_size,
        min_tokens=args.min_tokens, max_tokens=args.max_tokens, read=args.read,
        template=args.template, drop_tokens=args.drop_tokens,
    )


def _load(model_path: str, tokenizer_dir: str | None = None, args=None):
    path = resolve_model_path(model_path)
    tok = load_tokenizer(tokenizer_dir or path)
    if tok is None:
        raise CLIError(f"{model_path!r} has no tokenizer files; the CLI needs one to tokenize prompts")
    if args is None or not hasattr(args, "offload"):
        return path, load_encoder(path), tok
    import torch

    from skrr_compile.blocksearch.run import resolve_dtype

    dtype = resolve_dtype(None if args.dtype == "auto" else args.dtype, torch.device(_device(args)))
    if args.offload == "disk":
        if not path.is_dir():
            raise CLIError(f"--offload disk needs a checkpoint directory with safetensors, got {str(path)!r}")
        return path, load_empty_encoder(path, dtype), tok
    return path, load_encoder(path, dtype=dtype), tok


def _check_numbers(args) -> None:
    """Out-of-range numeric options are refused up front (a negative --limit used to drop prompts silently)."""
    rules = (("limit", 1, "a number of prompts"), ("heldout_limit", 1, "a number of prompts"),
             ("max_length", 1, "a token count"), ("min_tokens", 0, "a token count"),
             ("max_tokens", 1, "a token count"), ("chunk_size", 1, "prompts per chunk"), ("beam", 1, "the beam width"),
             ("cache_gb", 0, "GiB of memory"))
    for name, low, what in rules:
        value = getattr(args, name, None)
        if value is not None and not value >= low:  # `not >=` also refuses nan
            raise CLIError(f"--{name.replace('_', '-')} must be >= {low} ({what}), got {value}")


def _run_search(args, out: Path):
    if not 0.0 < args.sparsity < 1.0:  # cheap checks before loading anything
        raise CLIError(f"sparsity must be in (0, 1), got {args.sparsity}")
    _check_numbers(args)
    quant = quant_config(args)  # an unknown scheme or a missing torchao fails before anything loads
    _quantize_aware(args)
    read_prompts(args.prompts, field=args.field, limit=args.limit)
    if args.heldout:
        read_prompts(args.heldout, field=args.heldout_field, limit=args.heldout_limit)
    path, model, tok = _load(args.model, args.tokenizer, args)
    graph = trace(model)
    if quant is not None:  # a keep-list that matches nothing fails here, not after the search
        from skrr_compile.core.quantize import select_tensors

        select_tensors(graph.graph_module, quant)
    cal = _calibration(args, tok)
    held_cal = _calibration(args, tok, "heldout_") if args.heldout else None
    check_sparsity(graph, args.sparsity)  # unreachable targets fail here, before --out exists
    if getattr(args, "_writer", True):
        out.mkdir(parents=True, exist_ok=True)  # only now that every input has been checked
    result = search(model, tok, cal, search_config(args), out_dir=out, resume=args.resume,
                    progress=not args.quiet, graph=graph)
    pruned = materialize(graph, result)
    dense = model if result.weights is None else materialize(graph, SearchResult(Plan(), {}, {}, result.weights))
    deployed = deployed_table(pruned.graph_module, getattr(args, "group_size", 32))
    if quant is not None and getattr(args, "func", None) is cmd_prune:  # the saved model is the quantized one
        from skrr_compile.core.checkpoints import is_gguf
        from skrr_compile.core.quantize import quantize

        if is_gguf(path) and getattr(args, "_writer", True):
            print("note: the GGUF weights were quantized once and dequantized on load; quantizing again stacks "
                  "the two quantization errors")
        pruned = quantize(pruned, quant)
    held = None
    if args.heldout:  # sharded across the ranks under torchrun, folded in global chunk order
        select = output_selector(args.hidden_layer)
        metric = ShardedDiscrepancy(with_hidden_states(dense, select), held_cal, select=select)
        held = metric.evaluate(with_hidden_states(pruned, select)).to_dict()
    row = result_row(graph, result, pruned, held)
    row["quantization"] = None if quant is None else {**quant.to_dict(), "aware": _quantize_aware(args)}
    row["deployed_bytes"] = deployed  # the plan's pruned model per scheme, exact
    if quant is not None:
        from skrr_compile.core.quantize import deployed_bytes

        row["bytes"] = deployed_bytes(pruned.graph_module, None if getattr(args, "func", None) is cmd_prune
                                      else quant, packed=True)["total"]
    return path, model, tok, graph, result, pruned, row


def _prepare_out(args) -> Path:
    """Check --out (created only once the inputs are checked, in _run_search)."""
    if not args.out:
        raise CLIError("--out is required (or pass --dry-run to print the memory plan only)")
    out = check_out_dir(args.out, may_exist_nonempty=True)
    if out.exists() and any(out.iterdir()) and not args.resume and not (out / STATE_FILE).exists():
        raise CLIError(f"{args.out!r} is not empty; choose a new directory")
    return out


def cmd_search(args) -> int:
    if args.dry_run:
        return dry_run(args)
    group = join_group(_device(args), args.dist_timeout)
    out = agree(group, lambda: _prepare_out(args))
    if not group.is_writer:  # ranks > 0 score their shard and write nothing
        args._writer = False
        distributed(lambda: _run_search(args, out))
        return 0
    path, _, _, _, result, _, row = distributed(lambda: _run_search(args, out))
    save_plan(result.plan, result.overrides, out / "plan.json")  # LaCo: + plan.merged.safetensors
    write_report(out, [row], title=f"{args.method} search", command=_command(),
                 notes=_source_notes(path) + deployed_lines(row["deployed_bytes"]),
                 extra={"search": result.report, "source": describe_source(path)})
    print(f"plan: skip={list(result.plan.skip)} reuse={result.plan.reuse} sparsity={row['sparsity']:.4f} "
          f"D={row['calib_discrepancy']:.5g} -> {out / 'plan.json'}")
    return 0


def cmd_prune(args) -> int:
    if args.dry_run:
        return dry_run(args)
    group = join_group(_device(args), args.dist_timeout)
    out = agree(group, lambda: _prepare_out(args))
    if not group.is_writer:
        args._writer = False
        distributed(lambda: _run_search(args, out))
        return 0
    path, _, tok, _, result, pruned, row = distributed(lambda: _run_search(args, out))
    pruned.info["source"] = str(path.resolve())
    state = (out / STATE_FILE).read_text() if (out / STATE_FILE).exists() else None
    tmp_report = out.with_name(f".{out.name}.report")
    write_report(tmp_report, [row], title=f"{args.method} prune", command=_command(),
                 notes=_source_notes(path) + deployed_lines(row["deployed_bytes"]),
                 extra={"search": result.report, "source": describe_source(path)})
    extra = {p.name: p.read_text() for p in tmp_report.iterdir() if p.suffix in (".json", ".md")}
    extra["plan.json"] = result.plan.to_json()
    if state:
        extra[STATE_FILE] = state
    state_tensors = [p.replace(tmp_report / p.name) for p in out.glob(f"{Path(STATE_FILE).stem}.*.safetensors")]
    save(pruned, out, tokenizer=tok, overwrite=True, extra_files=extra)
    for p in state_tensors:  # the state's own tensors (LaCo's merged weights) stay with it
        p.replace(out / p.name)
    if result.overrides:
        save_plan(result.plan, result.overrides, out / "plan.json")
    png = tmp_report / "discrepancy_vs_sparsity.png"
    if png.exists():
        png.replace(out / png.name)
    for p in tmp_report.iterdir():
        p.unlink()
    tmp_report.rmdir()
    print(f"pruned model -> {out}: {row['params']:,} params ({100 * row['sparsity']:.2f}% removed), "
          f"skip={row['skip']} reuse={row['reuse']}, calibration D={row['calib_discrepancy']:.5g}"
          + (f", held-out D={row['heldout_discrepancy']:.5g}" if row["heldout_discrepancy"] is not None else ""))
    q = row.get("quantization")
    if q:
        how = "scored quantized in the search" if q["aware"] else "quantized after the search"
        print(f"{q['scheme']} ({how}): {row['bytes']:,} bytes in memory, "
              f"{(out / 'model.safetensors').stat().st_size:,} on disk")
    if row_health(row):
        print(row_health(row))
    return 0


def cmd_eval(args) -> int:
    _check_numbers(args)
    meta = read_model_meta(args.pruned)
    source = args.model or meta.get("source")
    if not source:
        raise CLIError(f"{args.pruned} does not record its dense model; pass --model DENSE_MODEL_DIR")
    pruned = load(args.pruned)
    _, dense, tok = _load(source, args.tokenizer)
    if pruned.plan.info.get("heal"):  # maps fitted against one dense model: another would give wrong numbers
        from skrr_compile.blocksearch.heal import check_dense_matches
        from skrr_compile.utils.tensors import named_tensors

        try:
            weights = {**dict(dense.named_parameters(remove_duplicate=False)),
                       **dict(dense.named_buffers(remove_duplicate=False))}
            check_dense_matches(weights, named_tensors(pruned.graph_module),
                                set(pruned.plan.info.get("merged_params") or ()))
        except SearchError as e:
            raise CLIError(f"{args.pruned} is a healed model and {source} {str(e).removeprefix('the dense model ')}") from e
    tok = load_tokenizer(args.pruned) or tok
    group = join_group("cpu", args.dist_timeout)  # under torchrun: the prompt chunks are sharded
    select = output_selector(args.hidden_layer)
    metric = distributed(lambda: ShardedDiscrepancy(with_hidden_states(dense, select), _calibration(args, tok),
                                                    select=select), "nothing was written; run it again")
    report = distributed(lambda: metric.evaluate(with_hidden_states(pruned, select)),
                         "nothing was written; run it again").to_dict()
    if not group.is_writer:
        return 0
    report.update({"params": pruned.num_params, "dense_params": meta.get("dense_params"),
                   "sparsity": 1 - pruned.num_params / meta["dense_params"], "mb": pruned.num_bytes / 1e6,
                   "skip": list(pruned.plan.skip), "reuse": pruned.plan.reuse})
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return 0
    print(f"{args.pruned} against {source} on {args.prompts}:")
    print(markdown_table([{**report, "method": pruned.plan.method}], EVAL_COLUMNS))
    warning = health_line(report["cosine"], report["null_norm_ratio"])
    if warning:
        print(warning)
    return 0


COMPARE_STATE = "compare_state.json"


def _compare_rows(state_path: Path, done_path: Path, key: str, out: str) -> list[dict]:
    """The rows an earlier compare into `out` finished, if it ran on the same inputs; else refuse."""
    if not state_path.is_file():
        return []
    try:
        state = json.loads(state_path.read_text())
    except ValueError as e:
        raise CLIError(f"{state_path} is not readable ({e}); use a new --out") from e
    if not isinstance(state, dict) or state.get("key") != key:
        raise CLIError(f"--out {out!r} holds a compare of other inputs (model weights, prompts, held-out set or "
                       "beam differ); use a new --out")
    rows = []
    if done_path.exists():
        for n, line in enumerate(done_path.read_text().splitlines(), 1):
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise CLIError(f"{done_path} line {n} is not JSON ({e}); delete the line or use a new --out") from e
    return rows


def _check_compare_out(args, out: Path, state_path: Path) -> None:
    check_out_dir(args.out, may_exist_nonempty=True)
    if out.is_dir() and any(out.iterdir()) and not state_path.is_file():
        raise CLIError(f"--out {args.out!r} is not empty and holds no earlier compare run; choose a new directory")


def _start_compare(args, out: Path, state_path: Path, done_path: Path, key: str, path) -> list[dict]:
    """Rank 0: the rows an earlier run finished (same inputs only); --out and its state file created."""
    rows = _compare_rows(state_path, done_path, key, args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not state_path.is_file():
        atomic_write_text(state_path, json.dumps({"key": key, "model": str(path)}, indent=1))
    return rows


def _compare_search(args, group, model, tok, cal, graph, s: float, m: str) -> SearchResult:
    """One method's search, data-parallel over the ranks (every method, LaCo included: each rank computes the
    same merges and scores them on its shard of the chunks)."""
    return search(model, tok, cal, search_config(args, sparsity=s, method=m), graph=graph,
                  progress=not args.quiet and group.is_writer)


def cmd_compare(args) -> int:
    try:
        sparsities = [float(s) for s in args.sparsity.split(",")]
    except ValueError as e:
        raise CLIError(f"--sparsity takes comma-separated numbers, got {args.sparsity!r}") from e
    _check_numbers(args)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise CLIError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    bad = [s for s in sparsities if not 0.0 < s < 1.0]
    if bad:
        raise CLIError(f"every --sparsity must be in (0, 1), got {', '.join(map(str, bad))}")
    out = Path(args.out)
    state_path = out / COMPARE_STATE  # ties the rows to the model weights, prompts and options they came from
    done_path = out / "rows.jsonl"  # one line per finished (method, sparsity): a rerun continues from here
    group = join_group("cpu", args.dist_timeout)  # compare searches the model where it is loaded: the host
    agree(group, lambda: _check_compare_out(args, out, state_path))  # rank 0 alone reads and writes --out
    path, model, tok = _load(args.model, args.tokenizer)
    graph = trace(model)
    cal = _calibration(args, tok)
    held = _calibration(args, tok, "heldout_") if args.heldout else None
    key = input_key(graph, cal, beam=args.beam, read=args.read,
                    heldout=input_key(graph, held) if held is not None else None,
                    **{k: v for k, v in (("drop_tokens", args.drop_tokens), ("hidden_layer", args.hidden_layer)) if v},
                    **({"heal": args.heal, "heal_ridge": args.heal_ridge} if getattr(args, "heal", None) else {}))
    rows = agree(group, lambda: _start_compare(args, out, state_path, done_path, key, path))  # resumes with any world
    have = {(r["method"], r["target"]) for r in rows}
    notes = [f"dense model: {path}", *_source_notes(path), f"{cal.num_prompts} calibration prompts",
             f"{held.num_prompts} held-out prompts" if held else "no held-out set"]
    if group.world > 1:
        notes.append(f"searched on {group.world} ranks (prompt chunks sharded, results identical to one process)")
    writer = group.is_writer
    select = output_selector(args.hidden_layer)
    hint = "the finished rows are kept: run the same compare into the same --out to continue (any number of ranks)"
    heldout = distributed(lambda: ShardedDiscrepancy(with_hidden_states(model, select), held, select=select),
                          hint) if held else None
    if "skrr" in methods and "skrr-skip" in methods:  # skrr-skip = skrr's skip phase: searched once, skrr first
        methods.remove("skrr-skip")
        methods.insert(methods.index("skrr") + 1, "skrr-skip")
        notes.append("skrr-skip rows are the skip phase of the skrr search at the same sparsity (the same beam "
                     "search as method skrr-skip, which is not run again)")
    healed_too = bool(getattr(args, "heal", None))
    if healed_too:
        notes.append(f"rows +heal: the method's plan healed ({args.heal}, ridge {args.heal_ridge}), beside the same "
                     "plan unhealed; replaceme is always healed")
    for s in sparsities:
        skrr_result = None
        for m in methods:
            if (m, s) in have and (not healed_too or m in ("replaceme", "skrr-skip") or (f"{m}+heal", s) in have):
                continue
            try:
                if m == "skrr-skip" and skrr_result is not None:
                    result = skip_phase_result(skrr_result)
                else:
                    result = distributed(lambda: _compare_search(args, group, model, tok, cal, graph, s, m), hint)  # noqa: B023
                if m == "skrr":
                    skrr_result = result
            except SearchError as e:  # the same on every rank: the inputs are the same
                if writer:
                    print(f"{m:>10} @ {s:.2f}: skipped: {e}", flush=True)
                notes.append(f"{m} at {s:.2f}: {e}")
                continue
            labelled = [(m, result)]
            if result.unhealed is not None:  # --heal: the plain plan's row, then the healed one
                labelled = [(m, result.unhealed), (f"{m}+heal", result)]
            for name, res in labelled:
                if (name, s) in have:
                    continue
                pruned = materialize(graph, res)
                held_report = distributed(lambda: heldout.evaluate(with_hidden_states(pruned, select)),  # noqa: B023
                                          hint).to_dict() if held else None
                row = {**result_row(graph, res, pruned, held_report), "method": name}
                if name.endswith("+heal"):
                    row["healed_runs"] = res.report["heal"]["healed_runs"]
                    row["heal_seconds"] = res.report["heal"]["seconds"]
                rows.append(row)
                if not writer:
                    continue
                with done_path.open("a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
                print(f"{name:>10} @ {s:.2f}: sparsity {row['sparsity']:.4f}, calib D {row['calib_discrepancy']:.5g}"
                      + (f", held-out D {row['heldout_discrepancy']:.5g}" if held else ""), flush=True)
    if writer:
        write_report(out, rows, title=f"compare on {Path(str(path)).name}", command=_command(), notes=notes)
        print(f"report -> {out / 'report.md'}")
    return 0
