"""CLI: `magnitude` (prune components of a model / pipeline and save them compressed) and `sweep`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch

from skrr_compile.blocksearch.calibration import read_prompts
from skrr_compile.blocksearch.distributed import ShardedDiscrepancy, current_group
from skrr_compile.cli.main import (
    CLIError,
    add_dist_timeout,
    agree,
    check_out_dir,
    distributed,
    join_group,
    print_json,
)
from skrr_compile.core.checkpoints import resolve_model_path
from skrr_compile.core.plan import Plan
from skrr_compile.magnitude.config import CRITERIA, PRESETS, WANDA_GROUPS, MagnitudeConfig, get_preset
from skrr_compile.magnitude.denoiser import (
    DEFAULT_TIMESTEPS,
    NoisePredictionDiscrepancy,
    denoiser_inputs,
    is_denoiser,
)
from skrr_compile.magnitude.prune import hybrid, prune
from skrr_compile.magnitude.storage import (
    SINGLE,
    is_pipeline_dir,
    load_source_component,
    load_source_tokenizer,
    parse_targets,
    resolve_targets,
    save_pruned,
)
from skrr_compile.magnitude.sweep import (
    JUMP_FACTOR,
    knee_sentence,
    parse_sparsities,
    sweep,
    text_calibration,
    write_sweep_report,
)


def register(sub) -> None:
    p = sub.add_parser(
        "magnitude",
        help="magnitude-prune the Linear layers of text encoders / denoisers and save them compressed",
        description="Prune components of a model directory or a diffusers pipeline directory and write them in the "
        "compressed sparse safetensors format (values + bitmask, or CSR). Sparsity counts Linear weights, "
        "as the SD pruning study does; --include-conv adds convolutions.",
    )
    p.add_argument("model", help="HF model directory, diffusers pipeline directory, or 'builtin'")
    p.add_argument("--target", help="pipeline: 'text_encoder=0.475,unet=0.35'; single model: '0.5'")
    p.add_argument("--preset", help=f"named configuration ({', '.join(PRESETS)}); --target entries override it")
    _prune_options(p)
    p.add_argument("--pattern", default="unstructured", help="'unstructured' (default) or N:M such as 2:4")
    p.add_argument("--plan", help="a Skrr plan.json applied to the text encoder first (hybrid; sparsity counted once)")
    p.add_argument("--plan-component", default="text_encoder", help="pipeline component the plan is for")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_magnitude)

    p = sub.add_parser(
        "sweep",
        help="discrepancy against sparsity for one component, with the knee (report.json, report.md, sweep.png)",
    )
    p.add_argument("model", help="HF model directory, diffusers pipeline directory, or 'builtin'")
    p.add_argument("--target", help="the pipeline component to sweep (text_encoder, unet, transformer, ...)")
    p.add_argument("--sparsity", required=True, help="start:stop:step (stop included), e.g. 0.3:0.7:0.025, or a list")
    p.add_argument("--prompts", default="builtin", help="evaluation prompts (.txt/.jsonl/.tsv/.csv or 'builtin')")
    p.add_argument("--field", help="column / JSON field of the prompts")
    p.add_argument("--limit", type=int, help="use the first N prompts")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--read", choices=("auto", "mask", "all"), default="auto",
                   help="token positions the discrepancy reads (auto: all 77 for CLIP in a pipeline, else the mask)")
    p.add_argument("--max-length", type=int,
                   help="in a pipeline: the max_sequence_length it runs with (default: its own); else the token limit")
    p.add_argument("--timesteps", default=",".join(str(t) for t in DEFAULT_TIMESTEPS),
                   help="denoiser: timesteps as fractions of the schedule")
    p.add_argument("--batch", type=int, default=2, help="denoiser: latents per timestep")
    p.add_argument("--jump-factor", type=float, default=JUMP_FACTOR, help="a knee is sharp at this slope ratio")
    p.add_argument("--title", default="")
    _prune_options(p, multi=True)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_sweep)


def _prune_options(p, multi: bool = False) -> None:
    if multi:
        p.add_argument("--criterion", default="magnitude",
                       help=f"one or a comma list of {', '.join(CRITERIA)} (each is swept; one plot)")
    else:
        p.add_argument("--criterion", choices=CRITERIA, help="magnitude (per matrix, default), global, wanda")
    p.add_argument("--include-conv", action="store_true", help="prune convolutions too (the study does not)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="parameter names to leave dense, e.g. '*.proj_out.weight' (repeatable)")
    p.add_argument("--wanda-group", choices=WANDA_GROUPS, default="row")
    p.add_argument("--calib-prompts", default="builtin", help="Wanda: prompts for the activations (text encoders)")
    p.add_argument("--calib-field")
    p.add_argument("--calib-limit", type=int, default=128)
    p.add_argument("--latent-size", type=int, default=32, help="denoiser: latent height/width of fixed inputs")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="load components in this dtype")
    add_dist_timeout(p)


def _command(args, name: str) -> str:
    """The command line that reproduces `args` (for reports)."""
    skip = {"func", "command", "model", "overwrite", "json", "dist_timeout"}
    parts = ["skrr-compile", name, str(args.model)]
    defaults = {a.dest: a.default for a in _parser_for(name)._actions}
    for key, value in vars(args).items():
        if key in skip or value == defaults.get(key) or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            parts.append(flag)
        elif isinstance(value, list):
            for v in value:
                parts += [flag, str(v)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def _parser_for(name: str):
    import argparse

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    return sub.choices[name]


def _dtype(args):
    return getattr(torch, args.dtype) if getattr(args, "dtype", None) else None


def _wanda_calibration(args, path: Path, name: str, model):
    """Calibration for Wanda: prompts through the tokenizer for a text encoder, fixed inputs for a denoiser."""
    if is_denoiser(model):
        return denoiser_inputs(model, sample_size=args.latent_size, seed=1234)  # not the evaluation inputs
    tokenizer = load_source_tokenizer(path, name)
    if tokenizer is None:
        raise CLIError(f"Wanda needs the tokenizer of {name!r}; none found in {str(path)!r}")
    prompts = _calibration_prompts(args)
    return text_calibration(tokenizer, prompts, model, in_pipeline=is_pipeline_dir(path))


def _calibration_prompts(args) -> list[str]:
    try:
        return read_prompts(args.calib_prompts, field=args.calib_field, limit=args.calib_limit)
    except FileNotFoundError as e:
        raise CLIError(f"Wanda calibration prompts: {e}; pass --calib-prompts FILE") from e


def _check_out(args) -> None:
    """Refuse a non-empty --out before any work (the write itself is atomic and checks again)."""
    check_out_dir(args.out, may_exist_nonempty=args.overwrite)


def _say(msg: str) -> None:
    if current_group().is_writer:  # logs on rank 0 only
        print(msg, file=sys.stderr, flush=True)


def cmd_magnitude(args) -> int:
    """Under torchrun, Wanda's calibration batches are sharded across the ranks (`wanda.input_norms`: the norms
    are bit-identical to one process); rank 0 alone writes. Other criteria need no data: rank 0 alone prunes."""
    group = join_group("cpu", args.dist_timeout)  # magnitude pruning runs on the host: gloo
    agree(group, lambda: _check_out(args))
    return distributed(lambda: _magnitude(args, group), hint="nothing was written; run it again")


def _magnitude(args, group) -> int:
    path = resolve_model_path(args.model)
    pipeline = is_pipeline_dir(path)
    targets: dict = {}
    criterion = args.criterion
    if args.preset:
        preset = get_preset(args.preset)
        criterion = criterion or preset["criterion"]
        args.include_conv = args.include_conv or preset["include_conv"]
        targets.update(preset["targets"])
        if not pipeline:  # a single model takes the preset's value for its own kind
            model = load_source_component(path)
            kind = "unet" if type(model).__name__ == "UNet2DConditionModel" else "text_encoder"
            if kind not in targets:
                raise CLIError(f"preset {args.preset!r} has no target for a {type(model).__name__}")
            targets = {SINGLE: targets[kind]}
    targets.update(parse_targets(args.target))
    if not targets:
        raise CLIError("give --target (e.g. text_encoder=0.475,unet=0.35, or 0.5 for a single model) or --preset")
    targets = resolve_targets(path, targets)
    criterion = criterion or "magnitude"
    if criterion != "wanda" and not group.is_writer:
        return 0
    if args.plan and (args.plan_component if pipeline else SINGLE) not in targets:
        raise CLIError(f"--plan is for component {args.plan_component!r}, which is not among the targets {list(targets)}")
    components, reports, summary = {}, {}, {}
    for name, sparsity in targets.items():
        try:
            config = MagnitudeConfig(sparsity, criterion, pattern=args.pattern, include_conv=args.include_conv,
                                     exclude=tuple(args.exclude), wanda_group=args.wanda_group)
        except ValueError as e:
            raise CLIError(f"component {name!r}: {e}") from e
        _say(f"loading {name} ...")
        model = load_source_component(path, name, dtype=_dtype(args))
        calibration = _wanda_calibration(args, path, name, model) if criterion == "wanda" else None
        is_plan_target = args.plan and name == (args.plan_component if pipeline else SINGLE)
        _say(f"pruning {name}: {config.criterion}, {config.pattern}, {100 * config.sparsity:.2f}%"
             + (" after the Skrr plan" if is_plan_target else ""))
        if is_plan_target:
            model, result = hybrid(model, Plan.load(args.plan), config, calibration)
        else:
            result = prune(model, config, calibration)
        components[name] = model
        reports[name] = result.to_dict()
        summary[name] = {"config": config.to_dict(), "hybrid": bool(is_plan_target),
                         "sparsity": result.sparsity.to_dict(), "threshold": result.threshold}
    if not group.is_writer:  # the other ranks calibrated their shard and write nothing
        return 0
    sizes = save_pruned(
        args.out, path, components, reports,
        summary={"command": _command(args, "magnitude"), "preset": args.preset, "components": summary},
        overwrite=args.overwrite,
    )
    for name, info in summary.items():
        info.update(sizes.get(name, {}))
    if args.json:
        print_json({"out": str(args.out), "components": summary})
        return 0
    print(f"saved {args.out}")
    print(f"{'component':<16} {'target':>7} {'Linear':>8} {'Lin+conv':>9} {'all':>8} {'total':>8} "
          f"{'dense MB':>9} {'file MB':>8} {'file/dense':>10}")
    for name, info in summary.items():
        sp = info["sparsity"]
        print(f"{name:<16} {100 * info['config']['sparsity']:>6.2f}% {100 * sp['sparsity_linear']:>7.2f}% "
              f"{100 * sp['sparsity_linear_conv']:>8.2f}% {100 * sp['sparsity_all_params']:>7.2f}% "
              f"{100 * sp['sparsity_total']:>7.2f}% {info['dense_bytes'] / 1e6:>9.2f} {info['file_bytes'] / 1e6:>8.2f} "
              f"{info['file_bytes'] / info['dense_bytes']:>10.3f}")
    print("Linear = the study's definition (Linear weights only); Lin+conv adds convolutions; all = every "
          "parameter; total = vs the dense model (includes sub-blocks a Skrr plan removed)")
    return 0


def _text_metric(args, path: Path, name: str, pipeline: bool):
    """(model, evaluate(model), info, calibrate(prompts) or None) for a text encoder: the Skrr search's discrepancy.

    In a supported pipeline the metric is what the search scores for the same spec (`pipelines.spec_scoring`):
    the text model the pipeline runs (the language model inside an LLM component, which is also what is
    pruned), the prompts through the pipeline's template, tokenizer, mask and special tokens, the layer(s) it
    reads, the tokens it drops, through the module that consumes them (e.g. PixArt's caption projection,
    Lumina 2's caption embedder on hidden_states[-2]). `calibrate` tokenizes Wanda's prompts the same way.
    Otherwise the last hidden state over the attention-mask tokens.
    """
    from skrr_compile.blocksearch.discrepancy import last_hidden_state

    prompts = read_prompts(args.prompts, field=args.field, limit=args.limit)
    scoring = calibrate = None
    if pipeline:
        try:
            from diffusers import DiffusionPipeline

            from skrr_compile.deploy.pipelines.encoder import NoTextEncoderError, UnsupportedPipelineError
            from skrr_compile.deploy.pipelines.prune import spec_scoring
            from skrr_compile.deploy.pipelines.specs import describe_pipeline
        except ImportError as e:
            _say(f"note: {e}; scoring the last hidden state of {name!r} without the pipeline's projection")
        else:
            pipe = DiffusionPipeline.from_pretrained(path, **({"torch_dtype": _dtype(args)} if args.dtype else {}))
            try:
                spec = describe_pipeline(pipe, args.max_length).encoders.get(name)
            except (UnsupportedPipelineError, NoTextEncoderError) as e:
                _say(f"note: {e}; scoring the last hidden state of {name!r} without the pipeline's projection")
                spec = None
            if spec is not None:
                read = None if args.read == "auto" else args.read
                scoring = spec_scoring(pipe, spec, prompts, chunk_size=args.chunk_size, read=read)

                def calibrate(calib_prompts):
                    return spec_scoring(pipe, spec, calib_prompts, chunk_size=args.chunk_size, read=read).calibration

    if scoring is not None:
        model, cal, projection, select = scoring.model.eval(), scoring.calibration, scoring.projection, scoring.select
        call = scoring.call
        reads = [o.describe() for o in spec.outputs]
        extra = {"text_model": type(model).__name__, "spec": spec.to_dict()}
    else:
        model = load_source_component(path, name, dtype=_dtype(args))
        tokenizer = load_source_tokenizer(path, name)
        if tokenizer is None:
            raise CLIError(f"no tokenizer found for {name!r} in {str(path)!r}")
        cal = text_calibration(tokenizer, prompts, model, in_pipeline=pipeline, read=args.read,
                               max_length=args.max_length, chunk_size=args.chunk_size)
        projection, select, reads, extra = None, last_hidden_state, ["last_hidden_state -> identity"], {}

        def call(m):
            return m

    _say(f"dense reference on {cal.num_prompts} prompts ...")
    metric = ShardedDiscrepancy(call(model), cal, projection, select)  # under torchrun: chunks sharded
    info = {"metric": "Skrr T2I discrepancy (MSE over read tokens + null-prompt MSE)", "reads": reads,
            "prompts": str(args.prompts), "num_prompts": cal.num_prompts, "read": cal.read, **extra}
    return model, (lambda m: metric.evaluate(call(m))), info, calibrate


def cmd_sweep(args) -> int:
    """Under torchrun, the evaluation prompts (or denoiser inputs) and Wanda's calibration batches are sharded
    across the ranks, with results bit-identical to one process; rank 0 alone writes."""
    group = join_group("cpu", args.dist_timeout)
    agree(group, lambda: _check_out(args))
    return distributed(lambda: _sweep(args, group), hint="nothing was written; run it again")


def _sweep(args, group) -> int:
    path = resolve_model_path(args.model)
    pipeline = is_pipeline_dir(path)
    if pipeline and not args.target:
        raise CLIError("name the pipeline component to sweep with --target (e.g. text_encoder or unet)")
    targets = resolve_targets(path, parse_targets(args.target) if args.target else {})
    if len(targets) != 1:
        raise CLIError(f"sweep one component at a time, got {list(targets)}")
    name, given = next(iter(targets.items()))
    if given is not None and name != SINGLE:
        raise CLIError("sweep takes --target NAME without a sparsity; give the sparsities with --sparsity")
    sparsities = parse_sparsities(args.sparsity)
    criteria = [c.strip() for c in args.criterion.split(",") if c.strip()]
    bad = [c for c in criteria if c not in CRITERIA]
    if bad or not criteria:
        raise CLIError(f"unknown criterion {bad}; choose from {', '.join(CRITERIA)}")
    _say(f"loading {name} ...")
    model = load_source_component(path, name, dtype=_dtype(args)) if pipeline else None
    calibrate = None
    if model is not None and is_denoiser(model):
        timesteps = [float(t) for t in args.timesteps.split(",")]
        inputs = denoiser_inputs(model, batch=args.batch, timesteps=timesteps, sample_size=args.latent_size)
        evaluate = NoisePredictionDiscrepancy(model, inputs).evaluate
        info = {"metric": "noise-prediction MSE on fixed latents (seeded noise conditioning)",
                "timesteps": args.timesteps, "batch": args.batch, "latent_size": args.latent_size}
    else:
        model, evaluate, info, calibrate = _text_metric(args, path, name, pipeline)
    info = {"model": str(args.model), "component": name, "class": type(model).__name__, **info}
    results = []
    for criterion in criteria:
        calibration = None
        if criterion == "wanda":
            calibration = (_wanda_calibration(args, path, name, model) if calibrate is None
                           else calibrate(_calibration_prompts(args)))
        result = sweep(model, sparsities, evaluate, criterion=criterion, include_conv=args.include_conv,
                       exclude=args.exclude, wanda_group=args.wanda_group, calibration=calibration,
                       component=name, progress=_say, jump_factor=args.jump_factor)
        results.append(result)
    if not group.is_writer:
        return 0
    out = write_sweep_report(args.out, results, _command(args, "sweep"), info=info, overwrite=args.overwrite,
                             title=args.title or f"{type(model).__name__} ({name}): magnitude-pruning sweep")
    print(f"wrote {out}/report.json, report.md, sweep.png")
    for r in results:
        print(knee_sentence(r))
    return 0
