"""CLI: export-onnx (pruned model -> .onnx), prune-pipeline and inspect-pipeline (diffusers pipelines)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from skrr_compile.cli.main import (
    CLIError,
    add_dist_timeout,
    add_distribute,
    agree,
    candidate_batch_arg,
    check_out_dir,
    distributed,
    existing_dir,
    heal_ridge_arg,
    join_group,
    print_json,
)


def register(sub) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a pruned model directory (skrr-compile apply / skrr.save) to ONNX",
        description="Export a pruned encoder to ONNX (dynamic batch_size / sequence_length axes; inputs "
        "input_ids, attention_mask; outputs named as HF names them). --verify runs onnxruntime on fresh "
        "inputs at two new shapes and fails (exit 1) past the tolerance.",
    )
    p.add_argument("model_dir", help="directory written by `skrr-compile apply` or skrr.save")
    p.add_argument("onnx_file", help="output file (.onnx); weights over 1.5 GiB go to <file>.data")
    p.add_argument("--fp16", action="store_true", help="export float16 weights and activations")
    p.add_argument("--verify", action="store_true", help="check onnxruntime against the torch model")
    p.add_argument("--atol", type=float, default=None, help="absolute tolerance (default 1e-4 fp32, 1e-2 fp16)")
    p.add_argument("--rtol", type=float, default=None, help="relative tolerance (default 1e-4 fp32, 1e-2 fp16)")
    p.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto",
                   help="onnxruntime provider for --verify (auto: CUDA when usable)")
    p.add_argument("--hidden-states", action="store_true", help="also output hidden_states.0 .. hidden_states.N")
    p.add_argument("--no-attention-mask", action="store_true",
                   help="input_ids only (the mask is all ones), as Stable Diffusion calls CLIP")
    ext = p.add_mutually_exclusive_group()
    ext.add_argument("--external-data", dest="external_data", action="store_const", const=True, default=None,
                     help="always store weights in <file>.data")
    ext.add_argument("--no-external-data", dest="external_data", action="store_const", const=False,
                     help="never store weights externally (fails above 2 GiB)")
    p.add_argument("--opset", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing ONNX file (and its .data)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser(
        "prune-pipeline",
        help="prune the text encoders of a diffusers pipeline directory and save the pruned pipeline",
        description="Search a plan for each text encoder of a diffusers pipeline (the discrepancy covers every "
        "output the pipeline reads, through the module that consumes it), swap in the pruned encoders and save "
        "the pipeline. Load it with DiffusionPipeline.from_pretrained after `import skrr_compile`.",
    )
    p.add_argument("pipeline_dir", help="diffusers pipeline directory (model_index.json)")
    p.add_argument("--prompts", help="calibration prompts: .txt, .jsonl, .tsv/.csv or 'builtin'")
    p.add_argument("--field", default=None, help="the column/field holding the prompt (.jsonl/.tsv/.csv)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("--sparsity", type=float, default=None, help="fraction of each encoder's parameters to remove")
    p.add_argument("--encoders", default=None,
                   help="comma-separated components (e.g. text_encoder_3), or 'all' (every text encoder); default: the "
                        "family's default, every encoder but those it leaves out (HiDream's CLIPs)")
    p.add_argument("--method", default="skrr", help="search method (skrr, skrr-skip, finercut, shortgpt, laco)")
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--heal", choices=["lstsq", "cosine"],
                   help="heal each encoder's plan: one linear map per run of skipped sub-blocks, merged into kept weights")
    p.add_argument("--heal-ridge", type=heal_ridge_arg, default="auto",
                   help="healing ridge, relative to the mean diagonal of f^T f (default auto: the value of 1e-6..10 "
                        "with the lowest error on held-out folds of the calibration prompts)")
    p.add_argument("--candidate-batch", default="1", type=candidate_batch_arg, metavar="N|auto",
                   help="candidates scored in one stacked forward (exact where the probe finds rows bit-identical)")
    add_distribute(p)
    p.add_argument("--max-sequence-length", type=int, default=None,
                   help="T5 length the pipeline will run with (default: the pipeline's default)")
    p.add_argument("--plans", default=None,
                   help="a JSON file, or inline JSON, {component: plan or plan file}: apply these plans instead of "
                        "searching (relative plan files are read from the JSON file's folder, or the current one)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="load the pipeline in this dtype (default: as saved)")
    p.add_argument("--device", default="cpu", help="device to search on (under torchrun, cuda: each rank's own GPU)")
    add_dist_timeout(p)
    p.add_argument("--out", required=True, help="output directory for the pruned pipeline")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--spec", default=None, help=SPEC_HELP)
    p.set_defaults(func=cmd_prune_pipeline)

    p = sub.add_parser("inspect-pipeline", help="show a pipeline's text encoders, what it reads and the consumers")
    p.add_argument("pipeline_dir")
    p.add_argument("--spec", default=None, help=SPEC_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect_pipeline)


def _check_out_file(path: str, overwrite: bool) -> None:
    """The ONNX file (and <file>.data) must be writable and new, or --overwrite; checked before the export."""
    out = Path(path)
    if out.is_dir():
        raise CLIError(f"{path!r} is a directory; give the ONNX file to write, e.g. {str(out / 'encoder.onnx')!r}")
    existing = [p for p in (out, out.with_name(out.name + ".data")) if p.exists()]
    if existing and not overwrite:
        raise CLIError(f"{str(existing[0])!r} exists; choose a new file or pass --overwrite")
    check_out_dir(out.parent, may_exist_nonempty=True, label="the folder of the ONNX file")


def cmd_export_onnx(args) -> int:
    from skrr_compile.core.storage import read_model_meta
    from skrr_compile.deploy.onnx import OnnxVerificationError, ProviderError, export_onnx

    model_dir = existing_dir(args.model_dir)
    read_model_meta(model_dir)  # NotAPrunedModelError (exit 2) before any work
    _check_out_file(args.onnx_file, args.overwrite)
    try:
        report = export_onnx(
            model_dir, args.onnx_file, fp16=args.fp16, verify=args.verify, atol=args.atol, rtol=args.rtol,
            provider=args.provider, output_hidden_states=args.hidden_states,
            attention_mask=not args.no_attention_mask, external_data=args.external_data, opset=args.opset,
        )
    except OnnxVerificationError as e:
        print(f"skrr-compile export-onnx: verification FAILED: {e}", file=sys.stderr)
        return 1
    except ProviderError as e:
        raise CLIError(str(e)) from e
    if args.json:
        print_json(report.to_dict())
        return 0
    data = f" + {Path(report.data_path).name}" if report.data_path else ""
    print(
        f"wrote {report.path}{data}: {report.file_bytes / 2**20:.2f} MiB ({report.dtype}), weights "
        f"{report.weight_bytes / 2**20:.2f} MiB = {report.weight_bytes / max(report.param_bytes, 1):.4f} x the "
        f"model's unique parameter bytes; file / params = {report.size_ratio:.4f}; "
        f"inputs {report.inputs}, outputs {report.outputs}"
    )
    if report.verification:
        v = report.verification
        print(f"verified with onnxruntime ({v['provider']}): max |onnx - torch| = {v['max_abs_err']:.3g} "
              f"at {len(v['checks'])} output/shape pairs (atol {v['atol']:g}, rtol {v['rtol']:g})")
    return 0


def _load_pipeline(args):
    import torch
    from diffusers import DiffusionPipeline

    directory = existing_dir(args.pipeline_dir)
    if not (directory / "model_index.json").is_file():
        raise CLIError(f"{args.pipeline_dir!r} is not a diffusers pipeline directory (no model_index.json)")
    kwargs = {}
    if getattr(args, "dtype", None):
        kwargs["torch_dtype"] = getattr(torch, args.dtype)
    pipe = DiffusionPipeline.from_pretrained(str(directory), **kwargs)
    return pipe.to(args.device) if getattr(args, "device", None) else pipe


def _read_plans(path: str) -> dict:
    from skrr_compile.core.plan import Plan, PlanError

    inline = path.lstrip().startswith("{")  # --plans '{"text_encoder": {"skip": [1]}}'
    p = Path.cwd() / "--plans" if inline else Path(path)
    if not inline and not p.is_file():
        raise CLIError(f"plans file {path!r} does not exist (give a JSON file, or inline JSON starting with '{{')")
    try:
        raw = json.loads(path if inline else p.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{'--plans' if inline else path} is not valid JSON: {e}") from e
    path = "--plans" if inline else path
    if not isinstance(raw, dict) or not raw:
        raise CLIError(f"{path} must be a JSON object {{component: plan or plan file}}")
    plans = {}
    for name, value in raw.items():
        if isinstance(value, str):
            plan_path = Path(value) if Path(value).is_absolute() else p.parent / value
            plans[name] = plan_path if plan_path.is_dir() else Plan.load(plan_path)
        elif isinstance(value, dict):
            try:
                plans[name] = Plan.from_dict(value)
            except PlanError as e:
                raise CLIError(f"{path}: plan for {name}: {e}") from e
        else:
            raise CLIError(f"{path}: plan for {name} must be a plan object or a plan file path")
    return plans


def _encoders(value: str | None) -> list[str] | str | None:
    """--encoders: None (the family's default), "all", or the named components."""
    if value is None or value.strip() == "all":
        return None if value is None else "all"
    names = [e.strip() for e in value.split(",") if e.strip()]
    if not names:
        raise CLIError(f"--encoders {value!r} names no component; give e.g. text_encoder,text_encoder_3 or all")
    return names


SPEC_HELP = ("read the pipeline's text encoders as this family does (e.g. flux), for a pipeline class skrr-compile "
             "does not resolve by itself (its error lists the families)")


def _explicit_spec(pipe, family: str | None) -> None:
    """--spec: the family the pipeline is read as; it sticks to the pipeline for apply, search and save."""
    if family is not None:
        from skrr_compile.deploy.pipelines.specs import describe_pipeline

        describe_pipeline(pipe, spec=family)


def cmd_prune_pipeline(args) -> int:
    from skrr_compile.deploy.pipelines.prune import apply_to_pipeline, prune_pipeline
    from skrr_compile.deploy.pipelines.storage import encoder_sizes, save_pipeline

    group = join_group(args.device, args.dist_timeout)  # under torchrun: each search is data-parallel
    out = agree(group, lambda: check_out_dir(args.out, may_exist_nonempty=args.overwrite))
    if args.plans is None and args.method == "laco":
        raise CLIError("prune-pipeline cannot carry LaCo's merged weights into the pipeline; use skrr, skrr-skip, "
                       "finercut or shortgpt (or `skrr-compile prune --method laco` on the encoder alone)")
    if args.plans is None and (args.prompts is None or args.sparsity is None):
        raise CLIError("give --prompts and --sparsity to search plans, or --plans to apply known ones")
    plans_arg = _read_plans(args.plans) if args.plans else None
    if plans_arg is not None and not group.is_writer:  # nothing to compute together: rank 0 applies and saves
        return 0
    pipe = _load_pipeline(args)
    _explicit_spec(pipe, args.spec)
    encoders = _encoders(args.encoders)
    if plans_arg is not None:
        if isinstance(encoders, list):
            plans_arg = {k: v for k, v in plans_arg.items() if k in encoders}
        apply_to_pipeline(pipe, plans_arg)
        result = None
    else:
        from skrr_compile.blocksearch.calibration import read_prompts
        from skrr_compile.blocksearch.config import SearchConfig

        prompts = read_prompts(args.prompts, field=args.field, limit=args.limit)
        try:  # what each encoder's consumer reads (template, layer, length) the pipeline's spec sets
            config = SearchConfig.from_kwargs(sparsity=args.sparsity, method=args.method, beam=args.beam,
                                              chunk_size=args.chunk_size, candidate_batch=args.candidate_batch,
                                              distribute=args.distribute,
                                              **({"heal": args.heal, "heal_ridge": args.heal_ridge} if args.heal else {}))
        except ValueError as e:
            raise CLIError(str(e)) from e
        try:
            result = distributed(lambda: prune_pipeline(
                pipe, prompts, args.sparsity, encoders=encoders, method=args.method, config=config,
                max_sequence_length=args.max_sequence_length, progress=not args.quiet and group.is_writer,
            ), hint="nothing was written; run it again")
        except ImportError as e:
            raise CLIError(str(e)) from e
    if not group.is_writer:  # the other ranks scored their shard of the prompts and write nothing
        return 0
    save_pipeline(pipe, out, plans=result)
    for name, size in encoder_sizes(pipe).items():
        if size["pruned"]:
            module = getattr(pipe, name)
            print(f"{name}: {size['params']:,} of {size['dense_params']:,} params of the {size['text_model']} kept "
                  f"({100 * size['sparsity']:.2f}% removed), skip={list(module.plan.skip)} reuse={module.plan.reuse}"
                  + _unused_note(size))
    print(f"saved {out} (load with DiffusionPipeline.from_pretrained after `import skrr_compile`)")
    return 0


def _unused_note(size: dict) -> str:
    """What replacing an LLM component by its text model saved (or would save), besides the pruning."""
    if not size.get("unused_params"):
        return ""
    verb = "dropped" if size["pruned"] else "dropped when pruned"
    return (f"; the {size['component'] or 'component'} ({size['component_params']:,} params) also held "
            f"{size['unused_params']:,} params the pipeline never runs (outside the text model): {verb}")


def cmd_inspect_pipeline(args) -> int:
    from skrr_compile.deploy.pipelines.specs import describe_pipeline
    from skrr_compile.deploy.pipelines.storage import encoder_sizes

    pipe = _load_pipeline(args)
    spec = describe_pipeline(pipe, spec=args.spec)
    sizes = encoder_sizes(pipe)
    if args.json:
        print_json({**spec.to_dict(), "sizes": sizes})
        return 0
    print(f"{spec.pipeline} ({spec.family})")
    for name, es in spec.encoders.items():
        module = getattr(pipe, name)
        arch = getattr(module, "architecture", type(module).__name__)
        size = sizes[name]
        state = f"pruned {100 * size['sparsity']:.1f}%" if size["pruned"] else "dense"
        print(f"  {name} ({arch}, text model {size['text_model']} {size['params']:,} params, {state}); tokenizer "
              f"{es.tokenizer}, {es.padding} to {es.max_length}, {'with' if es.attention_mask else 'no'} attention "
              f"mask, reads {es.read}" + _unused_note(size))
        for o in es.outputs:
            print(f"    {o.describe()}")
    return 0
