"""CLI: `magnitude` (prune components of a model / pipeline and save them compressed) and `sweep`."""

from __future__ import annotations

import dataclasses
import glob
import importlib
import json
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
from skrr_compile.core.checkpoints import refuse_pruned_dir, resolve_model_path
from skrr_compile.core.plan import Plan
from skrr_compile.magnitude.config import CRITERIA, PRESETS, WANDA_GROUPS, MagnitudeConfig, get_preset
from skrr_compile.magnitude.denoiser import (
    DEFAULT_TIMESTEPS,
    NoisePredictionDiscrepancy,
    denoiser_inputs,
    is_denoiser,
)
from skrr_compile.magnitude.layers import layers_read, select_layers
from skrr_compile.magnitude.prune import hybrid, prune
from skrr_compile.magnitude.storage import (
    SINGLE,
    is_pipeline_dir,
    load_source_component,
    load_source_tokenizer,
    model_components,
    parse_targets,
    pipeline_index,
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
    p.add_argument("--max-length", type=int,
                   help="a text encoder in a pipeline: the max_sequence_length the pipeline runs with (default: its "
                   "own), for Wanda's calibration")
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
    pipe, specs = _pipeline_specs(args, path, targets) if pipeline else (None, {})
    for name, sparsity in targets.items():
        try:
            config = MagnitudeConfig(sparsity, criterion, pattern=args.pattern, include_conv=args.include_conv,
                                     exclude=tuple(args.exclude), wanda_group=args.wanda_group)
        except ValueError as e:
            raise CLIError(f"component {name!r}: {e}") from e
        is_plan_target = args.plan and name == (args.plan_component if pipeline else SINGLE)
        if name in specs:  # a text encoder of a supported pipeline: what the pipeline runs and reads
            _say(f"pruning {name}: {config.criterion}, {config.pattern}, {100 * config.sparsity:.2f}% of the "
                 "layers that reach what the pipeline reads" + (" after the Skrr plan" if is_plan_target else ""))
            model, result = _prune_text_model(args, pipe, specs[name], config,
                                              Plan.load(args.plan) if is_plan_target else None)
            components[name] = model
            reports[name] = result.to_dict()
            summary[name] = {"config": config.to_dict(), "hybrid": bool(is_plan_target),
                             "sparsity": result.sparsity.to_dict(), "threshold": result.threshold, **result.info}
            continue
        _say(f"loading {name} ...")
        model = getattr(pipe, name) if pipe is not None else load_source_component(path, name, dtype=_dtype(args))
        calibration = _wanda_calibration(args, path, name, model) if criterion == "wanda" else None
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
    for name, info in summary.items():
        if "text_model" in info:
            print(_text_model_sentence(name, info))
    return 0


def _text_model_sentence(name: str, info: dict) -> str:
    """What a pipeline text encoder's figures count: the text model it runs, what was left dense and why."""
    text = (f"{name}: sparsity of the {info['text_model']} the pipeline runs ({info['text_model_params']:,} params; "
            f"reads {', '.join(info['reads'])}); {info['layers_pruned']} Linear layers pruned")
    if info["unread_layers"]:
        text += f", {len(info['unread_layers'])} past the hidden state read left dense (they reach nothing it reads)"
    if info["unused_params"]:
        text += (f"; the {info['component']} ({info['component_params']:,} params) also holds "
                 f"{info['unused_params']:,} params the pipeline never runs (LM head / vision tower), saved as they are")
    return text


PROBE_PROMPT = "a photo of a cat"  # traced once to find the layers that reach what the pipeline reads
CALIBRATION_CHUNK = 32  # prompts per Wanda calibration batch (as text_calibration and sweep's default)


def _pipeline_specs(args, path: Path, targets) -> tuple[object | None, dict]:
    """(the pipeline, {target: EncoderSpec}) when targets are text encoders of a supported pipeline, else (None, {}).

    The pipeline is loaded with its targets for real and every other model component built on the meta device
    (its config is all `describe_pipeline` reads), so memory stays what the targets need.
    """
    try:
        from diffusers import DiffusionPipeline

        from skrr_compile.deploy.pipelines.encoder import (
            TEXT_ENCODERS,
            NoTextEncoderError,
            UnsupportedPipelineError,
        )
        from skrr_compile.deploy.pipelines.specs import describe_pipeline, resolve_family
    except ImportError as e:
        _say(f"note: {e}; text encoders are pruned whole (every Linear layer) and calibrated without the "
             "pipeline's template")
        return None, {}
    if not any(n in TEXT_ENCODERS for n in targets):
        return None, {}
    import diffusers

    cls = getattr(diffusers, json.loads((path / "model_index.json").read_text()).get("_class_name", ""), None)
    if resolve_family(cls) is None:  # by what the class does (variants of a family included), not its name
        return None, {}
    refuse_pruned_dir(path)
    for name in targets:
        refuse_pruned_dir(path / name)
    _say("loading the pipeline (the components not pruned on the meta device) ...")
    stand_ins = {n: _meta_component(path, n) for n in model_components(path) if n not in targets}
    dtype = _dtype(args)
    pipe = DiffusionPipeline.from_pretrained(
        path, **{n: m for n, m in stand_ins.items() if m is not None}, **({"torch_dtype": dtype} if dtype else {})
    )
    for name in targets:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval()
    try:
        spec = describe_pipeline(pipe, args.max_length)
    except (UnsupportedPipelineError, NoTextEncoderError) as e:
        _say(f"note: {e}; its text encoders are pruned whole (every Linear layer) without the pipeline's template")
        return pipe, {}
    return pipe, {n: s for n, s in spec.encoders.items() if n in targets}


def _meta_component(path: Path, name: str):
    """Component `name` built from its config on the meta device (no weights), or None to let diffusers load it."""
    library, cls_name = pipeline_index(path)[name]
    try:
        cls = getattr(importlib.import_module(library), cls_name)
        with torch.device("meta"):
            if library == "transformers":
                from transformers import AutoConfig

                return cls(AutoConfig.from_pretrained(path / name)).eval()
            return cls.from_config(cls.load_config(path / name)).eval()
    except Exception:  # a model that cannot be built on meta is loaded for real: only memory is at stake
        return None


def _prune_text_model(args, pipe, spec, config: MagnitudeConfig, plan: Plan | None):
    """Prune the text model the pipeline runs for `spec` (`spec.encoder`: the language model inside an LLM
    component), only its layers that reach what the pipeline reads, Wanda calibrated on what it feeds.

    Which layers: those whose weights the spec's outputs depend on (`layers_read`, on a probe prompt through the
    spec): a layer past the hidden state read (hidden_states[-2]: the last decoder layer), an LM head or a vision
    tower is left as it is, and the sparsity counts the text model (`SparsityReport` of it, as `encoder_sizes`
    counts it). Wanda's calibration is `spec_scoring`'s, the Skrr search's: the pipeline's tokenizer, template,
    mask, special tokens, length, and only the tokens that reach the denoiser (dropped tokens left out).
    Returns (what replaces the component: the component with its text model pruned in place, or with a plan
    the pruned text model, as prune-pipeline's), the PruneResult (`info`: what was pruned and counted).
    """
    from skrr_compile.core.encoder import apply
    from skrr_compile.deploy.pipelines.encoder import record_component
    from skrr_compile.deploy.pipelines.prune import spec_scoring
    from skrr_compile.utils.tensors import param_numel

    component = getattr(pipe, spec.component)
    dense = spec.encoder(pipe).eval()
    text = apply(dense, plan) if plan is not None else dense
    probe = spec_scoring(pipe, spec, [PROBE_PROMPT], chunk_size=1)
    ids, mask = probe.calibration.chunks[0]
    run = probe.call(text)
    read, unread = _split_read(text, config, lambda: probe.select(run(ids, attention_mask=mask)))
    if not read and unread:
        raise CLIError(f"none of the Linear layers of {spec.component}'s {type(dense).__name__} reaches what the "
                       "pipeline reads")
    effective = dataclasses.replace(config, exclude=(*config.exclude, *(glob.escape(n) for n in unread)))
    calibration = info_cal = None
    if config.criterion == "wanda":
        calibration = spec_scoring(pipe, spec, _calibration_prompts(args), chunk_size=CALIBRATION_CHUNK).calibration
        info_cal = {"prompts": calibration.num_prompts, "template": calibration.template,
                    "drop_tokens": calibration.drop_tokens, "max_length": calibration.max_length,
                    "read": calibration.read}
    if plan is not None:
        replacement, result = hybrid(text, None, effective, calibration)
        record_component(replacement, component)
    else:
        result = prune(text, effective, calibration)
        replacement = component  # its text model pruned in place
    whole, params = param_numel(component), param_numel(dense)
    result.info.update({
        "text_model": type(dense).__name__, "module": spec.module, "reads": [o.describe() for o in spec.outputs],
        "component": type(component).__name__, "component_params": whole, "text_model_params": params,
        "unused_params": whole - params, "layers_pruned": len(read), "unread_layers": unread,
        **({"calibration": info_cal} if info_cal else {}),
    })
    return replacement, result


def _split_read(model, config: MagnitudeConfig, forward) -> tuple[list, list[str]]:
    """(the layers `config` selects whose weights reach the outputs of `forward()`, the names of the others)."""
    layers = select_layers(model, config)
    read = layers_read(layers, forward)
    names = {layer.name for layer in read}
    return read, [layer.name for layer in layers if layer.name not in names]


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
        # layers past the hidden state the pipeline reads (the last decoder layer for hidden_states[-2], an LM
        # head) reach nothing it reads: left dense and out of the sweep's sparsity, as `magnitude` does
        ids, mask = cal.chunks[0]
        _, unread = _split_read(model, MagnitudeConfig(0.0, include_conv=args.include_conv, exclude=tuple(args.exclude)),
                                lambda: select(call(model)(ids, attention_mask=mask)))
        extra = {"text_model": type(model).__name__, "spec": spec.to_dict(), "unread_layers": unread}
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
    exclude = [*args.exclude, *(glob.escape(n) for n in info.get("unread_layers", ()))]
    info = {"model": str(args.model), "component": name, "class": type(model).__name__, **info}
    results = []
    for criterion in criteria:
        calibration = None
        if criterion == "wanda":
            calibration = (_wanda_calibration(args, path, name, model) if calibrate is None
                           else calibrate(_calibration_prompts(args)))
        result = sweep(model, sparsities, evaluate, criterion=criterion, include_conv=args.include_conv,
                       exclude=exclude, wanda_group=args.wanda_group, calibration=calibration,
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
