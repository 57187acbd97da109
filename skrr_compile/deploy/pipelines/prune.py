"""Prune a pipeline's text encoders in one call: search each on what its consumer reads, swap it in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from skrr_compile.core.encoder import PrunedEncoder, apply
from skrr_compile.core.plan import Plan
from skrr_compile.deploy.pipelines.encoder import PrunedTextEncoder, record_component
from skrr_compile.deploy.pipelines.specs import EncoderSpec, PipelineSpec, describe_pipeline


# ---------------------------------------------------------------------------------------------------
# apply / prune
# ---------------------------------------------------------------------------------------------------
def _resolve_plan(plan) -> Plan:
    from skrr_compile.deploy.compile_backend import resolve_plan

    return resolve_plan(plan)


def apply_to_pipeline(pipe, plans: Mapping[str, Plan | str | Path | dict], *, spec=None, merged=None):
    """Replace each named text encoder of `pipe` by its pruned version under the given plan; returns `pipe`.

    `plans` maps component names (`text_encoder`, `text_encoder_2`, ...) to a Plan, a plan JSON file, a plan
    dict or a pruned model directory (its plan is applied to the pipeline's own encoder). `spec`: a family name
    or PipelineSpec for a pipeline the resolution refuses (`describe_pipeline`). `merged`: component name ->
    the merged weights of a plan that carries them (a healed or LaCo plan: `SearchResult.overrides`).
    """
    spec = describe_pipeline(pipe, spec=spec)
    if not plans:
        raise ValueError(f"no plans given; this pipeline's text encoders: {', '.join(spec.encoders)}")
    unknown = [name for name in plans if name not in spec.encoders]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} has no text encoder {unknown}; its text encoders: {', '.join(spec.encoders)}")
    resolved = {name: plan if isinstance(plan, Plan) and (merged or {}).get(name) else _resolve_plan(plan)
                for name, plan in plans.items()}  # a plan with its merged weights given needs no refusal
    pruned = {}
    for name, plan in resolved.items():  # prune all before swapping any: a bad plan leaves the pipe as it was
        encoder = spec.encoders[name].encoder(pipe)
        if isinstance(encoder, PrunedEncoder):
            raise ValueError(f"pipe.{name} is already pruned (plan skip={list(encoder.plan.skip)}); plans apply to dense encoders")
        weights = (merged or {}).get(name) or None
        pruned[name] = record_component(PrunedTextEncoder.from_pruned(apply(encoder, plan, merged=weights)),
                                        getattr(pipe, name))
    pipe.register_modules(**pruned)
    return pipe


class PipelinePlans(dict):
    """component name -> Plan, with the search reports (`.reports`) and the pipeline description (`.spec`)."""

    def __init__(self, plans: Mapping[str, Plan], reports: Mapping[str, dict] | None = None, spec: PipelineSpec | None = None):
        super().__init__(plans)
        self.reports = dict(reports or {})
        self.spec = spec

    def to_dict(self) -> dict:
        return {
            "spec": self.spec.to_dict() if self.spec else None,
            "plans": {k: v.to_dict() for k, v in self.items()},
            "reports": self.reports,
        }


@dataclass
class _HiddenStatesOn:
    """Temporarily make an HF encoder return hidden states by default (its config flag)."""

    module: nn.Module
    on: bool
    _saved: object = field(default=None, init=False)

    def __enter__(self):
        cfg = getattr(self.module, "config", None)
        if self.on and cfg is not None:
            self._saved = getattr(cfg, "output_hidden_states", None)
            cfg.output_hidden_states = True
        return self

    def __exit__(self, *exc):
        cfg = getattr(self.module, "config", None)
        if self.on and cfg is not None:
            cfg.output_hidden_states = self._saved
        return False


def search_arguments(pipe, spec: EncoderSpec) -> dict:
    """The keyword arguments of skrr_compile.search that make it score what the pipeline reads."""
    kwargs = {
        "select": spec.select(),
        "projection": spec.projections(pipe),
        "read": spec.read,
        "padding": spec.padding,
        "max_length": spec.max_length,
    }
    if spec.template is not None:
        kwargs["template"] = spec.template
    if spec.drop_tokens:
        kwargs["drop_tokens"] = spec.drop_tokens
    if spec.hidden_layer is not None:  # the search builds the selector of that layer (or stack)
        del kwargs["select"]
        kwargs["hidden_layer"] = spec.hidden_layer
    return kwargs


@dataclass
class SpecScoring:
    """What `skrr_compile.search` scores for one encoder spec, for metrics that must measure the same thing.

    `model`: the text model the search traces and prunes (`spec.encoder(pipe)`: the text model inside an LLM
    component, not its LM head or vision tower); `calibration`: the prompts tokenized as the search tokenizes
    them (the pipeline's tokenizer, mask and special tokens, the spec's template, dropped tokens, padding and
    length); `projection` and `select` as the search builds them (`hidden_layer` -> its selector).
    `call(m)` calls an encoder as the pipeline does (asking for hidden states when they are read).
    """

    model: nn.Module
    calibration: object
    projection: object
    select: object
    hidden_states: bool

    def call(self, module):
        if not self.hidden_states:
            return module

        def fn(input_ids, attention_mask=None):
            return module(input_ids, attention_mask=attention_mask, output_hidden_states=True)

        return fn


def spec_scoring(pipe, spec: EncoderSpec, prompts, *, chunk_size: int = 16, read: str | None = None) -> SpecScoring:
    """The search's inputs for `spec` (`search_arguments`, tokenized and selected as `skrr_compile.search`
    does), so that a metric scores exactly what the pipeline's denoiser reads. `read` overrides the spec's."""
    from skrr_compile.blocksearch.run import prepare_calibration
    from skrr_compile.blocksearch.selectors import output_selector

    kw = search_arguments(pipe, spec)
    select = output_selector(kw["hidden_layer"]) if "hidden_layer" in kw else kw["select"]
    calibration = prepare_calibration(
        spec.calibration_tokenizer(pipe), prompts, max_length=kw["max_length"], padding=kw["padding"],
        chunk_size=chunk_size, read=read or kw["read"], template=kw.get("template"),
        drop_tokens=kw.get("drop_tokens", 0),
    )
    hidden = spec.hidden_states or bool(getattr(select, "needs_hidden_states", False))
    return SpecScoring(spec.encoder(pipe), calibration, kw["projection"], select, hidden)


def prune_pipeline(
    pipe,
    prompts,
    sparsity: float | Mapping[str, float],
    encoders: Sequence[str] | str | None = None,
    method: str = "skrr",
    *,
    max_sequence_length: int | None = None,
    apply_plans: bool = True,
    out_dir: str | Path | None = None,
    overrides: Mapping[str, dict] | None = None,
    pipeline_kwargs: Mapping | None = None,
    config=None,
    quantize=None,
    spec=None,
    **search_kwargs,
) -> PipelinePlans:
    """Search a plan for each (or the named, or "all") text encoder(s) of `pipe` and swap in the pruned encoders.

    The discrepancy of each encoder covers every output the pipeline reads from it, through the module that
    consumes it (see the module docstring); by default every encoder but those a family leaves out (HiDream's
    CLIPs; `describe_pipeline(pipe).encoders[name].default`). `sparsity` is per encoder (a float, or a dict per component).
    `prompts`: a list, or a .txt/.jsonl/.tsv/.csv file. `config`: a `SearchConfig` every encoder's search
    starts from (its sparsity and method are replaced by this call's; what the pipeline reads, below, by the
    spec's); further keyword arguments are options of `skrr_compile.search` (e.g. beam, chunk_size) that change
    it; `overrides[component]` those of that encoder's search only. Each report keeps its config (`"config"`).
    Returns component -> Plan (with `.reports`); `apply_plans=False` leaves the pipeline dense.
    `pipeline_kwargs`: arguments the pipeline will be called with that change what it encodes (Sana's
    `complex_human_instruction`), so that the search scores the same text. `spec`: a family name or a
    PipelineSpec for a pipeline the resolution refuses (`describe_pipeline`).
    `quantize`: a scheme or `QuantConfig` (skrr_compile.core.quantize): the pruned encoders are then quantized
    (needs apply_plans).
    """
    if quantize is not None:
        from skrr_compile.core.quantize import as_config, check_runnable

        check_runnable(as_config(quantize))  # before any search: an unknown scheme or missing torchao fails now
        if not apply_plans:
            raise ValueError("quantize needs apply_plans=True: the quantized encoders replace the pruned ones")
    try:
        from skrr_compile.blocksearch.run import search
    except ImportError as e:
        raise ImportError(
            f"prune_pipeline needs the plan search (skrr_compile.blocksearch), which this build lacks ({e}); "
            "apply known plans with apply_to_pipeline(pipe, {component: plan})"
        ) from e
    from skrr_compile.blocksearch.calibration import read_prompts

    spec = describe_pipeline(pipe, max_sequence_length, spec=spec, **dict(pipeline_kwargs or {}))
    names = _select_encoders(spec, list(sparsity) if isinstance(sparsity, Mapping) and encoders is None else encoders)
    prompts = read_prompts(prompts)
    overrides = dict(overrides or {})
    plans, reports, merged = {}, {}, {}
    for name in names:
        es = spec.encoders[name]
        encoder = es.encoder(pipe)
        if isinstance(encoder, PrunedEncoder):
            raise ValueError(f"pipe.{name} is already pruned; load the dense pipeline to search again")
        target = sparsity[name] if isinstance(sparsity, Mapping) else sparsity
        kwargs = {**search_arguments(pipe, es), **search_kwargs, **overrides.get(name, {})}
        if out_dir is not None:
            kwargs["out_dir"] = Path(out_dir) / name
        with _HiddenStatesOn(encoder, es.hidden_states):
            result = search(encoder, es.calibration_tokenizer(pipe), prompts, config, sparsity=target, method=method,
                            **kwargs)
        plans[name] = result.plan
        if result.overrides:  # a healed plan's merged weights (LaCo's too) go with it
            merged[name] = result.overrides
        reports[name] = {**dict(result.report or {}), "reads": [o.describe() for o in es.outputs]}
    if apply_plans:
        apply_to_pipeline(pipe, plans, merged=merged)
    if quantize is not None:
        quantize_pipeline(pipe, as_config(quantize), names)
        for name in names:
            reports[name]["quantization"] = getattr(pipe, name).info["quantization"]
    return PipelinePlans(plans, reports, spec)


def _select_encoders(spec: PipelineSpec, encoders) -> list[str]:
    if encoders is None:
        return [n for n, es in spec.encoders.items() if es.default]
    if encoders == "all":
        return list(spec.encoders)
    names = [encoders] if isinstance(encoders, str) else list(encoders)
    unknown = [n for n in names if n not in spec.encoders]
    if unknown:
        raise ValueError(f"{spec.pipeline} has no text encoder {unknown}; its text encoders: {', '.join(spec.encoders)}")
    return names


def quantize_pipeline(pipe, config, encoders=None):
    """Quantize the pipeline's text encoders (pruned ones as they are; dense ones with an empty plan)."""
    from skrr_compile.core.quantize import QuantizationError
    from skrr_compile.core.quantize import quantize as quantize_encoder
    from skrr_compile.deploy.pipelines.encoder import TEXT_ENCODERS

    present = [n for n in TEXT_ENCODERS if getattr(pipe, n, None) is not None]
    names = list(encoders) if encoders is not None else present
    missing = [n for n in names if n not in present]
    if missing or not names:
        raise QuantizationError(f"{type(pipe).__name__} has no text encoder {missing or names}; "
                                f"its text encoders: {', '.join(present) or 'none'}")
    dense = [n for n in names if not isinstance(getattr(pipe, n), PrunedEncoder)]
    if dense:
        apply_to_pipeline(pipe, {n: Plan() for n in dense})
    quantized = {}
    for n in names:  # all before swapping any: an error leaves the pipe as it was (bar the empty plans)
        enc = getattr(pipe, n)
        q = quantize_encoder(enc, config)
        quantized[n] = PrunedTextEncoder.from_pruned(q)
    pipe.register_modules(**quantized)
    return pipe
