"""CLI: inspect (block table) and apply (plan -> pruned model directory)."""

from __future__ import annotations

from pathlib import Path

from skrr_compile.blocksearch.laco import merged_weights
from skrr_compile.cli.main import CLIError, check_out_dir, print_json
from skrr_compile.cli.quantize import deployed_lines, deployed_table
from skrr_compile.core.checkpoints import (
    load_encoder,
    load_meta_encoder,
    load_tokenizer,
    resolve_model_path,
)
from skrr_compile.core.encoder import apply
from skrr_compile.core.plan import Plan, PlanError
from skrr_compile.core.storage import MODEL_FILE, PLAN_FILE, read_model_meta, save
from skrr_compile.core.trace import block_table, trace


def register(sub) -> None:
    p = sub.add_parser("inspect", help="print the sub-block table of a HF encoder (directory, config.json or .gguf)")
    p.add_argument("model", help="HF model directory, a config.json, a .gguf file, or 'builtin' (traced on the "
                   "meta device from the config: no weight is allocated)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("apply", help="apply a plan.json to a model and save the pruned model")
    p.add_argument("model")
    p.add_argument("--plan", required=True, help="plan JSON file (from `search`, or written by hand)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_apply)


def _inspect_pruned(path: Path, as_json: bool) -> int:
    """The block table of a pruned directory from its metadata and plan (what was removed), no weights."""
    meta = read_model_meta(path)
    plan = Plan.load(path / PLAN_FILE)
    blocks = [dict(b) for b in meta.get("blocks", [])]
    for b in blocks:
        i = b["index"]
        b["status"] = "skipped" if i in plan.skip else (f"re-uses {plan.reuse[i]}" if i in plan.reuse else "kept")
    dense, kept = meta.get("dense_params"), meta.get("params")
    deployed = _pruned_deployed(path, meta, plan)
    if as_json:
        print_json({"pruned": True, "architecture": meta.get("architecture"), "dense_params": dense,
                    "params": kept, "skip": list(plan.skip), "reuse": plan.reuse, "blocks": blocks,
                    "deployed_bytes": deployed, "quantization": meta.get("quantization", {}).get("scheme")})
        return 0
    removed = f" ({100 * (1 - kept / dense):.2f}% removed)" if dense and kept is not None else ""
    rows = [f"pruned {meta.get('architecture')}: {kept:,} of {dense:,} params kept{removed}, "
            f"skip={list(plan.skip)} reuse={plan.reuse}" if dense and kept is not None
            else f"pruned {meta.get('architecture')}: skip={list(plan.skip)} reuse={plan.reuse}"]
    rows.append(f"{'idx':>4} {'kind':<5} {'layer':>5} {'params':>14}  {'status':<12} path")
    for b in blocks:
        rows.append(f"{b['index']:>4} {b['kind']:<5} {b['layer']:>5} {b['params']:>14,}  {b['status']:<12} {b['path']}")
    if meta.get("quantization"):
        rows.append(f"saved quantized: {meta['quantization']['scheme']}, {meta.get('bytes'):,} bytes in memory")
    print("\n".join(rows + deployed_lines(deployed)))
    return 0


def _pruned_deployed(path: Path, meta: dict, plan: Plan) -> dict[str, int]:
    """The exact deployed bytes per scheme of a pruned directory's model, rebuilt on the meta device."""
    import torch
    import transformers

    from skrr_compile.core.rebuild import build_graph_module

    gm = build_graph_module(transformers.AutoConfig.from_pretrained(path), meta["architecture"], plan,
                            dtype=getattr(torch, meta.get("dtype", "float32")))
    return deployed_table(gm, (meta.get("quantization") or {}).get("group_size", 32))


def cmd_inspect(args) -> int:
    path = resolve_model_path(args.model)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        return _inspect_pruned(path, args.json)
    # the table needs shapes only: a config, a directory (with or without weights) or a .gguf file is built on
    # the meta device, so no weight is allocated (T5-XXL's config dir took 19.5 GB and 2 min when built for real)
    graph = trace(load_meta_encoder(path))
    if args.json:
        print_json(
            {
                "architecture": graph.architecture,
                "total_params": graph.total_params,
                "fingerprint": graph.fingerprint,
                "blocks": block_table(graph.blocks),
                "deployed_bytes": deployed_table(graph.graph_module),
            }
        )
    else:
        print("\n".join([graph.table(), *deployed_lines(deployed_table(graph.graph_module))]))
    return 0


def cmd_apply(args) -> int:
    plan = Plan.load(args.plan)
    out = check_out_dir(args.out, may_exist_nonempty=args.overwrite)
    merged = merged_weights(plan, args.plan)  # a LaCo plan: the merged weights the search scored
    model = load_encoder(args.model)
    try:
        pruned = apply(model, plan, merged=merged or None)
    except PlanError as e:
        raise CLIError(f"{args.plan}: {e}") from e
    save(pruned, out, tokenizer=load_tokenizer(args.model), overwrite=args.overwrite)
    dense, kept = pruned.info["dense_params"], pruned.num_params
    print(
        f"saved {out}: {kept:,} of {dense:,} params kept ({100 * (1 - kept / dense):.2f}% removed), "
        f"skip={list(plan.skip)} reuse={plan.reuse}"
    )
    return 0
