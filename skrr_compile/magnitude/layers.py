"""Which weights magnitude pruning touches (Linear, optionally conv) and how sparse a model is."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.magnitude.config import MagnitudeConfig

aten = torch.ops.aten


LINEAR_OPS = (aten.linear.default,)


CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)


CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# which layers ----------------------------------------------------------------------------------------
@dataclass
class Layer:
    """One prunable weight: its parameter name, kind ("linear" / "conv") and the tensor itself."""

    name: str
    kind: str
    weight: torch.Tensor
    modules: list[nn.Module] = field(default_factory=list)  # the nn.Linear / nn.ConvNd using it (modules)
    nodes: list[fx.Node] = field(default_factory=list)  # the aten.linear / conv nodes using it (graphs)
    aliases: tuple[str, ...] = ()
    groups: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


def _graph_module(model) -> fx.GraphModule | None:
    if isinstance(model, PrunedEncoder):
        return model.graph_module
    if isinstance(model, fx.GraphModule):
        return model
    return None


def _fetch(gm: nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def find_layers(model: nn.Module) -> list[Layer]:
    """Every Linear and convolution weight of `model` (HF / diffusers module, PrunedEncoder or GraphModule).

    Weights shared by several layers (tied or re-used) are listed once, their other names as aliases.
    """
    gm = _graph_module(model)
    found: list[Layer] = []
    by_id: dict[int, Layer] = {}

    def add(layer: Layer) -> None:
        key = id(layer.weight)
        if key in by_id:  # a shared weight: one layer, every use recorded (Wanda counts all its inputs)
            first = by_id[key]
            if layer.name != first.name and layer.name not in first.aliases:
                first.aliases = (*first.aliases, layer.name)
            first.modules += layer.modules
            first.nodes += layer.nodes
            return
        by_id[key] = layer
        found.append(layer)

    if gm is not None:
        nested = [n for n, m in gm.named_modules() if n and isinstance(m, fx.GraphModule)]
        for node in gm.graph.nodes:
            if node.op != "call_function" or node.target not in LINEAR_OPS + CONV_OPS:
                continue
            w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not isinstance(w, fx.Node) or w.op != "get_attr":
                continue
            tensor = _fetch(gm, w.target)
            kind = "linear" if node.target in LINEAR_OPS else "conv"
            groups = int(node.args[6]) if kind == "conv" and len(node.args) > 6 else 1
            add(Layer(w.target, kind, tensor, nodes=[node], groups=groups))
        if nested and any(
            n.op == "call_function" and n.target in LINEAR_OPS + CONV_OPS
            for m in (gm.get_submodule(x) for x in nested)
            for n in m.graph.nodes
        ):
            raise ValueError(f"Linear layers inside nested graph modules {nested} are not supported")
        return found
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            add(Layer(f"{name}.weight" if name else "weight", "linear", mod.weight, modules=[mod]))
        elif isinstance(mod, CONV_MODULES):
            add(Layer(f"{name}.weight" if name else "weight", "conv", mod.weight, modules=[mod], groups=mod.groups))
    return found


def select_layers(model: nn.Module, config: MagnitudeConfig) -> list[Layer]:
    """The layers `config` prunes: Linear weights, plus convolutions with include_conv, minus `exclude`."""
    layers = [layer for layer in find_layers(model) if layer.kind == "linear" or config.include_conv]
    if config.exclude:
        layers = [
            layer for layer in layers
            if not any(fnmatch.fnmatchcase(n, p) for n in (layer.name, *layer.aliases) for p in config.exclude)
        ]
    return layers


def layers_read(layers: Sequence[Layer], forward: Callable[[], object]) -> list[Layer]:
    """The `layers` whose weights the outputs of `forward()` depend on (tensors, or tuples / lists / dicts of them).

    One forward that records autograd for these weights only, then a walk of its graph back from the outputs:
    exact data flow, not a numerical test. A layer past the hidden state a pipeline reads (for hidden_states[-2],
    the last decoder layer), an LM head or a vision tower never reaches the outputs, so it is left out.
    """
    weights = _unique(layer.weight for layer in layers if layer.weight.layout == torch.strided)
    saved = [w.requires_grad for w in weights]
    reached: set[int] = set()
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            out = forward()
        stack = [t.grad_fn for t in _output_tensors(out)]
        seen: set = set()
        while stack:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf, i.e. one of the weights
            if variable is not None:
                reached.add(id(variable))
            stack.extend(next_fn for next_fn, _ in fn.next_functions)
        del out
    finally:
        for w, flag in zip(weights, saved):
            w.requires_grad_(flag)
    return [layer for layer in layers if id(layer.weight) in reached]


def _output_tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _output_tensors(item)]
    return []


# sparsity accounting -----------------------------------------------------------------------------------
def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _zeros(t: torch.Tensor) -> int:
    if t.layout != torch.strided:
        t = t.to_dense()
    return int((t == 0).sum())


@dataclass
class SparsityReport:
    """Zeros among Linear weights, conv weights and all other parameters of a component.

    For a Skrr-pruned encoder `dense_params` / `removed_params` count what the plan removed, so `total` gives
    the sparsity of plan + magnitude together, each parameter counted once.
    """

    linear_params: int = 0
    linear_zeros: int = 0
    conv_params: int = 0
    conv_zeros: int = 0
    other_params: int = 0
    other_zeros: int = 0
    dense_params: int | None = None
    removed_params: int = 0

    @property
    def params(self) -> int:
        return self.linear_params + self.conv_params + self.other_params

    @property
    def zeros(self) -> int:
        return self.linear_zeros + self.conv_zeros + self.other_zeros

    @property
    def linear(self) -> float:
        """The study's definition: zeros among Linear weights."""
        return self.linear_zeros / self.linear_params if self.linear_params else 0.0

    @property
    def linear_conv(self) -> float:
        n = self.linear_params + self.conv_params
        return (self.linear_zeros + self.conv_zeros) / n if n else 0.0

    @property
    def all_params(self) -> float:
        return self.zeros / self.params if self.params else 0.0

    @property
    def total(self) -> float:
        """(removed by a plan + zeros among what is left) / parameters before the plan."""
        dense = self.dense_params or self.params
        return (self.removed_params + self.zeros) / dense if dense else 0.0

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "sparsity_linear": self.linear,
            "sparsity_linear_conv": self.linear_conv,
            "sparsity_all_params": self.all_params,
            "sparsity_total": self.total,
        }


def measure_sparsity(model: nn.Module) -> SparsityReport:
    """Count zeros in every parameter of `model`, by kind (each shared tensor once)."""
    layers = find_layers(model)
    kinds = {id(layer.weight): layer.kind for layer in layers}
    rep = SparsityReport()
    for t in _unique(model.parameters()):
        kind = kinds.get(id(t), "other")
        setattr(rep, f"{kind}_params", getattr(rep, f"{kind}_params") + t.numel())
        setattr(rep, f"{kind}_zeros", getattr(rep, f"{kind}_zeros") + _zeros(t))
    if isinstance(model, PrunedEncoder):
        rep.dense_params = model.info.get("dense_params")
        rep.removed_params = int(model.info.get("removed_params", 0))
    return rep
