"""A torch.compile backend that applies a skrr plan to the graph Dynamo captures, then compiles it.

    enc = torch.compile(hf_encoder, backend=skrr.backend(plan))                    # a Plan, plan.json or pruned dir
    enc = torch.compile(hf_encoder, backend="skrr", options={"plan": "plan.json"})  # by name

What happens to each graph Dynamo hands the backend:
1. it is traced to ATen (pre-dispatch, the op set torch.export produces) in Dynamo's fake mode, so batch and
   sequence sizes stay symbolic and every node keeps Dynamo's `nn_module_stack`;
2. parameters, which Dynamo passes as graph inputs, become `get_attr` nodes named by their module path
   (`encoder.block.0.layer.0.SelfAttention.q.weight`), the names `skrr.trace` gives them;
3. the sub-blocks are found with the same partition pass as `skrr.trace`, the plan is checked against the
   model's fingerprint, and the rewrite pass applies it (skipped branches are erased, re-used sub-blocks read
   the other layer's parameter inputs);
4. the `get_attr` nodes go back to being the graph's inputs (same signature as Dynamo's graph) and the result
   goes to inductor (or `inner`).
Nothing is specialised on sizes here (guards are suppressed while the graph is analysed), so a graph
compiled with `dynamic=True` serves every batch and sequence length without a recompile.

The compiled module still holds the dense parameters (they are the inputs Dynamo passes); to also free
their memory, compile the PrunedEncoder from `skrr.apply` instead.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import fx

from skrr_compile.core.plan import Plan, PlanError
from skrr_compile.core.trace import SUPPORTED, EncoderGraph
from skrr_compile.passes.partition import UnsupportedModelError, partition
from skrr_compile.passes.rewrite import rewrite

BACKEND_NAME = "skrr"
INNER_BACKENDS = ("inductor", "aot_eager", "eager")

_PARAM_SOURCE = re.compile(
    r"^(?P<root>.*?)(?P<path>(?:\._modules\['[^']+'\])*)\._(?P<kind>parameters|buffers)\['(?P<leaf>[^']+)'\]$"
)
_MODULE_ITEM = re.compile(r"\._modules\['([^']+)'\]")
_STACK_ROOT = re.compile(r"^[A-Za-z_]+\['[^']*'\]\.?")
_INDEX = re.compile(r"\[(\d+)\]")


class SkrrBackendError(RuntimeError):
    """The plan cannot be applied to the graph Dynamo captured."""


class MergedWeightsPlanError(SkrrBackendError, ValueError):
    """A plan whose result needs merged weights (LaCo), which applying the plan to the dense model cannot give."""


def resolve_plan(plan) -> Plan:
    """A Plan from a Plan, a dict, a plan JSON file, a pruned-model directory or a PrunedEncoder."""
    resolved = _resolve_plan(plan)
    if resolved.info.get("merged_params"):
        raise MergedWeightsPlanError(
            "a LaCo plan replaces weights by merged ones, which re-wiring the dense model cannot do (it would only "
            "skip the layers): apply it with `skrr-compile apply` (plan.merged.safetensors next to the plan), "
            "load the result with skrr.load and torch.compile that PrunedEncoder"
        )
    return resolved


def _resolve_plan(plan) -> Plan:
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, dict):
        return Plan.from_dict(plan)
    if hasattr(plan, "plan") and isinstance(plan.plan, Plan):  # PrunedEncoder
        return plan.plan
    if isinstance(plan, (str, Path)):
        p = Path(plan)
        if p.is_dir():
            from skrr_compile.core.storage import PLAN_FILE, read_model_meta

            read_model_meta(p)  # a clear error when the directory is not a pruned model
            return Plan.load(p / PLAN_FILE)
        return Plan.load(p)
    raise TypeError(
        f"plan must be a Plan, a dict, a plan.json path, a pruned model directory or a PrunedEncoder, "
        f"got {type(plan).__name__}"
    )


# ---------------------------------------------------------------------------------------------------
# Dynamo graph -> ATen graph with the module structure skrr.trace produces
# ---------------------------------------------------------------------------------------------------
def _fakify(example_inputs: Sequence, fake_mode) -> list:
    """Fake copies of the example inputs with the symbolic sizes Dynamo chose for them."""
    from torch._guards import TracingContext

    ctx = TracingContext.try_get()
    known = getattr(ctx, "tensor_to_context", None) if ctx is not None else None
    out = []
    with fake_mode:
        for x in example_inputs:
            if not isinstance(x, torch.Tensor):
                out.append(x)
            elif isinstance(x, torch._subclasses.fake_tensor.FakeTensor) and x.fake_mode is fake_mode:
                out.append(x)
            elif known is not None and x in known:
                sym = known[x]
                try:
                    out.append(fake_mode.from_tensor(x, symbolic_context=sym, source=sym.tensor_source, trace=False))
                except TypeError:  # torch versions without the `trace` argument
                    out.append(fake_mode.from_tensor(x, symbolic_context=sym, source=sym.tensor_source))
            else:
                out.append(fake_mode.from_tensor(x, static_shapes=True))
    return out


def _fake_mode(example_inputs: Sequence):
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode(example_inputs)
    if mode is None:  # called outside torch.compile (e.g. directly in a test): static shapes
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import ShapeEnv

        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    return mode


def to_aten(gm: fx.GraphModule, example_inputs: Sequence) -> tuple[fx.GraphModule, object]:
    """Trace a Dynamo graph to pre-dispatch ATen in Dynamo's fake mode, keeping each node's meta."""
    from torch.fx import traceback as fx_traceback
    from torch.fx.experimental.proxy_tensor import make_fx

    fake_mode = _fake_mode(example_inputs)
    fake_args = _fakify(example_inputs, fake_mode)

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    with fx_traceback.preserve_node_meta(), fake_mode:
        aten = make_fx(run, pre_dispatch=True)(*fake_args)
    return aten, fake_mode


def param_fqn(source_name: str) -> str | None:
    """`L['self']._modules['encoder']._parameters['weight']` -> `encoder.weight` (None: not a parameter)."""
    m = _PARAM_SOURCE.match(source_name)
    if m is None:
        return None
    return ".".join([*_MODULE_ITEM.findall(m.group("path")), m.group("leaf")])


def _stack_fqn(name: str) -> str:
    """Dynamo's module-stack names (`L['self'].encoder.block[0]`) in torch.export's form (`encoder.block.0`)."""
    name = _STACK_ROOT.sub("", name)
    name = _MODULE_ITEM.sub(lambda m: "." + m.group(1), name)
    name = _INDEX.sub(lambda m: "." + m.group(1), name)
    return name.strip(".")


def _normalize_module_stacks(graph: fx.Graph) -> None:
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (_stack_fqn(v[0]), v[1]) for k, v in stack.items()}


def find_layer_paths(graph: fx.Graph, param_names: Sequence[str]) -> list[str]:
    """The layers of the encoder's layer stack, from the module stacks the graph's nodes carry.

    The stack is the outermost module path P whose children P.0 .. P.n-1 share one class and own parameters.
    """
    modules: dict[str, type] = {}
    for node in graph.nodes:
        for fqn, cls in (node.meta.get("nn_module_stack") or {}).values():
            modules.setdefault(fqn, cls)
    groups: dict[str, dict[int, type]] = {}
    for fqn, cls in modules.items():
        prefix, _, idx = fqn.rpartition(".")
        if prefix and idx.isdigit():
            groups.setdefault(prefix, {})[int(idx)] = cls
    candidates = []
    for prefix, members in groups.items():
        n = len(members)
        if sorted(members) != list(range(n)) or len(set(members.values())) != 1:
            continue
        if all(any(p.startswith(f"{prefix}.{i}.") for p in param_names) for i in range(n)):
            candidates.append(prefix)
    top = [c for c in candidates if not any(c != o and c.startswith(o + ".") for o in candidates)]
    if len(top) > 1:
        raise SkrrBackendError(f"the captured graph holds several layer stacks {top}; compile one encoder")
    if not top:
        return []
    n = len(groups[top[0]])
    return [f"{top[0]}.{i}" for i in range(n)]


def _lift_params(aten: fx.GraphModule, sources: Sequence[str | None], example_inputs: Sequence):
    """Parameter placeholders -> get_attr nodes named by module path, on a module holding the tensors."""
    graph = aten.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(sources):
        raise SkrrBackendError(
            f"internal: {len(placeholders)} graph inputs after ATen tracing, {len(sources)} in Dynamo's graph"
        )
    root: dict[str, object] = {}
    for node in graph.nodes:  # constants make_fx lifted (tensors created in forward) stay attributes
        if node.op == "get_attr":
            root[node.target] = _fetch(aten, node.target)
    by_name: dict[str, fx.Node] = {}
    last = placeholders[-1] if placeholders else None
    for ph, src, value in zip(placeholders, sources, example_inputs):
        fqn = param_fqn(src) if src else None
        if fqn is None or not isinstance(value, torch.Tensor) or fqn in root:
            continue
        root[fqn] = value
        by_name[fqn] = ph
        with graph.inserting_after(last):
            attr = graph.create_node("get_attr", fqn)
        attr.meta = dict(ph.meta)
        ph.replace_all_uses_with(attr)
        last = attr
    holder = fx.GraphModule(root, graph)
    return holder, by_name


def _lower_params(gm: fx.GraphModule, by_name: dict[str, fx.Node]) -> fx.GraphModule:
    """get_attr nodes back to the graph inputs they came from (a re-used parameter: the other layer's input)."""
    graph = gm.graph
    constants = {}
    for node in list(graph.nodes):
        if node.op == "get_attr":
            if node.target in by_name:
                node.replace_all_uses_with(by_name[node.target])
                graph.erase_node(node)
            else:
                constants[node.target] = _fetch(gm, node.target)
    graph.lint()
    return fx.GraphModule(constants, graph)


def _fetch(module, target: str):
    obj = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _match_architecture(graph: EncoderGraph, fingerprint: str | None, hint: str | None) -> str | None:
    names = [hint] if hint else list(SUPPORTED)
    for name in names:
        graph.architecture = name
        if fingerprint is None or graph.fingerprint == fingerprint:
            return name
    return None


# ---------------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------------
class SkrrBackend:
    """torch.compile backend: apply `plan` to each captured encoder graph, then compile it with `inner`.

    `inner` is "inductor" (default), "aot_eager", "eager" or any backend callable `(gm, example_inputs)`.
    `architecture` (a HF class name) narrows the fingerprint check; by default every supported class is
    tried against the plan's fingerprint (a plan without a fingerprint is only checked for range and kinds).
    After compiling, `reports` holds one dict per captured graph (what was found and removed).
    """

    def __init__(
        self, plan, inner: str | Callable = "inductor", architecture: str | None = None, strict: bool = True
    ):
        self.plan = resolve_plan(plan)
        if isinstance(inner, str) and inner not in INNER_BACKENDS:
            raise ValueError(f"inner backend must be one of {INNER_BACKENDS} or a callable, got {inner!r}")
        self.inner = inner
        self.architecture = architecture
        self.strict = strict
        self.reports: list[dict] = []

    @property
    def compiles(self) -> int:
        """Graphs this backend compiled (a recompile adds one)."""
        return len(self.reports)

    @property
    def applied(self) -> int:
        return sum(1 for r in self.reports if r["applied"])

    def __repr__(self) -> str:
        return f"SkrrBackend(skip={list(self.plan.skip)}, reuse={self.plan.reuse}, inner={self.inner!r})"

    def transform(self, gm: fx.GraphModule, example_inputs: Sequence) -> tuple[fx.GraphModule, dict]:
        """The rewritten ATen graph (same inputs as `gm`) and a report; no compilation."""
        sources = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                arg = n.meta.get("grapharg")
                sources.append(arg.source.name if arg is not None and arg.source is not None else None)
        aten, fake_mode = to_aten(gm, example_inputs)
        holder, by_name = _lift_params(aten, sources, example_inputs)
        _normalize_module_stacks(holder.graph)
        report = {
            "applied": False,
            "graph_nodes": len(gm.graph.nodes),
            "compile_id": str(gm.meta.get("dynamo_compile_id", "")),
            "skip": [],
            "reuse": {},
        }
        shape_env = getattr(fake_mode, "shape_env", None)
        guard_free = shape_env.suppress_guards() if shape_env is not None else _null()
        with guard_free:
            layers = find_layer_paths(holder.graph, list(by_name))
            if not layers:
                if self.strict and any(".layer" in p or ".block" in p for p in by_name):
                    raise SkrrBackendError(
                        "the captured graph has encoder parameters but no complete layer stack; compile the "
                        "text encoder module itself (fullgraph=True shows graph breaks)"
                    )
                return _lower_params(holder, by_name), report
            try:
                result = partition(holder, layers)
            except UnsupportedModelError as e:
                raise SkrrBackendError(f"cannot find the sub-blocks of the captured graph: {e}") from e
            layers_path = layers[0].rpartition(".")[0]
            enc = EncoderGraph(holder, result.blocks, None, self.architecture or "", layers_path, result.stream_in)
            arch = _match_architecture(enc, self.plan.fingerprint, self.architecture)
            if arch is None:
                raise PlanError(
                    f"this plan was made for another model (plan fingerprint {self.plan.fingerprint[:12]}); the "
                    f"captured graph has {len(result.blocks)} sub-blocks in {layers_path!r} and matches no "
                    f"supported architecture ({', '.join(SUPPORTED)}) with that fingerprint (with graph breaks, "
                    "a captured graph holds only part of the encoder: fullgraph=True shows them)"
                )
            self.plan.validate(result.blocks, enc.fingerprint if self.plan.fingerprint else None)
            dense = enc.total_params
            rewrite(holder, result.blocks, self.plan.skip, self.plan.reuse)
            kept = enc.total_params  # the holder lost the removed parameters
        report.update(
            applied=True,
            architecture=arch or None,
            layers=layers_path,
            blocks=len(result.blocks),
            skip=list(self.plan.skip),
            reuse=dict(self.plan.reuse),
            dense_params=dense,
            kept_params=kept,
        )
        return _lower_params(holder, by_name), report

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence, **kwargs):
        new_gm, report = self.transform(gm, example_inputs)
        compiled = _compile_inner(self.inner, new_gm, list(example_inputs))
        self.reports.append(report)  # after success: inductor may restart Dynamo's analysis (scalar inputs)
        return compiled


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _compile_inner(inner, gm: fx.GraphModule, example_inputs: list):
    if callable(inner):
        return inner(gm, example_inputs)
    if inner == "eager":
        return gm.forward
    if inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def backend(plan, inner: str | Callable = "inductor", architecture: str | None = None, strict: bool = True):
    """A torch.compile backend applying `plan` (a Plan, plan.json, pruned model directory or PrunedEncoder).

    `torch.compile(hf_encoder, backend=skrr.backend(plan), dynamic=True)`; the returned object counts the
    graphs it compiled (`.compiles`) and reports what it removed (`.reports`).
    """
    return SkrrBackend(plan, inner=inner, architecture=architecture, strict=strict)


def skrr_backend(gm: fx.GraphModule, example_inputs: Sequence, options: dict | None = None, **kwargs):
    """The backend registered as "skrr": `torch.compile(m, backend="skrr", options={"plan": ...})`."""
    options = dict(options or {})
    if "plan" not in options:
        raise SkrrBackendError(
            'the "skrr" backend needs a plan: torch.compile(model, backend="skrr", options={"plan": "plan.json"}) '
            "(or a pruned model directory, a Plan, or a PrunedEncoder); or pass backend=skrr.backend(plan)"
        )
    unknown = sorted(set(options) - {"plan", "inner", "architecture", "strict"})
    if unknown:
        raise SkrrBackendError(f"unknown options for the skrr backend: {unknown} (known: plan, inner, architecture, strict)")
    return SkrrBackend(**options)(gm, example_inputs)


def register(name: str = BACKEND_NAME) -> None:
    """Register `skrr_backend` under `name` with torch._dynamo (idempotent).

    When torch has discovered the package's `torch_dynamo_backends` entry point but not loaded it yet, this
    module is (being) imported by that entry point: torch registers the loaded function itself right after the
    import, and registering it here too would make torch's own registration fail ("duplicate name").
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS:
        return
    if isinstance(registry._BACKENDS.get(name), EntryPoint):  # torch loads the entry point and registers it
        return
    registry.register_backend(skrr_backend, name=name)


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    register()
