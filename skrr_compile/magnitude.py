"""Magnitude pruning of text encoders and denoisers: per matrix, global, Wanda, and N:M (2:4) semi-structured.

Which layers count: the weight matrices of ``nn.Linear`` layers, as the Stable Diffusion pruning study prunes
them (its "UNet sparsity" excludes convolutions). ``include_conv=True`` adds the weights of
``nn.Conv1d/2d/3d`` (not transposed convolutions). Embeddings, norms and biases are never pruned. Every report
gives the sparsity three ways: over Linear weights (the study's definition), over Linear + conv weights, and over
all parameters of the component.

Criteria (``MagnitudeConfig.criterion``):

- ``magnitude``: each matrix pruned to the target on its own: the ``round(s * n)`` entries of smallest ``|w|``
  (ties broken by position, so the count is exact);
- ``global``: one threshold over all selected weights of the component, the k-th smallest ``|w|`` with
  ``k = round(s * N)``; entries below it are pruned, and entries equal to it in order until exactly k are;
- ``wanda``: score ``|W_ij| * ||X_j||_2`` (Sun et al. 2023), ``X_j`` the j-th input feature over the
  calibration tokens (padding excluded for text encoders); compared within each output row (``wanda_group="row"``,
  as the paper) or over the whole matrix.

``pattern="2:4"`` (or any ``N:M``) keeps the N largest scores in every M consecutive weights along the input
dimension instead (sparsity fixed at 1 - N/M); the input dimension must be a multiple of M.

``prune`` zeroes weights in place and returns a ``PruneResult``; ``hybrid`` applies a Skrr plan first and prunes
only the weights that remain, on copies (the dense model is left untouched).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from .calibration import Calibration
from .compressed import dense_to_csr
from .module import PrunedEncoder, apply, bind_tensors, named_tensors
from .plan import Plan

aten = torch.ops.aten

CRITERIA = ("magnitude", "global", "wanda")
WANDA_GROUPS = ("row", "matrix")
LINEAR_OPS = (aten.linear.default,)
CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default)
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# The Stable Diffusion pruning study's recommended configuration: text encoder 47.5 %, UNet 35 %, unstructured
# magnitude pruning of each Linear layer (convolutions untouched).
PRESETS: dict[str, dict] = {
    "sd2-study": {
        "targets": {"text_encoder": 0.475, "unet": 0.35},
        "criterion": "magnitude",
        "include_conv": False,
        "description": "the SD pruning study's recommendation: text encoder 47.5 % + UNet 35 % "
        "(per-Linear magnitude pruning, convolutions kept dense)",
    },
}
PRESET_ALIASES = {"study": "sd2-study", "recommended": "sd2-study"}


class SemiStructuredShapeError(ValueError):
    """An N:M (e.g. 2:4) request on a weight whose input dimension is not a multiple of M."""


def get_preset(name: str) -> dict:
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[key])


def check_sparsity(value, what: str = "sparsity") -> float:
    """A sparsity is a real number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0.0 or v >= 1.0:
        raise ValueError(f"{what} must be in [0, 1) (a fraction of weights to zero, 0.5 = half), got {value!r}")
    return v


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """"unstructured" -> None; "N:M" -> (N, M), N kept of every M."""
    if pattern in (None, "", "unstructured", "none"):
        return None
    try:
        n, m = (int(x) for x in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M (N weights kept of every M)")
    return n, m


@dataclass(frozen=True)
class MagnitudeConfig:
    """How to prune one component. `sparsity` is the fraction of selected weights set to zero."""

    sparsity: float | None = None
    criterion: str = "magnitude"
    pattern: str = "unstructured"
    include_conv: bool = False
    exclude: tuple[str, ...] = ()  # fnmatch patterns on parameter names, e.g. "*.proj_out.weight"
    wanda_group: str = "row"

    def __post_init__(self):
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.wanda_group not in WANDA_GROUPS:
            raise ValueError(f"wanda_group must be one of {WANDA_GROUPS}, got {self.wanda_group!r}")
        nm = parse_pattern(self.pattern)
        object.__setattr__(self, "pattern", "unstructured" if nm is None else f"{nm[0]}:{nm[1]}")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", tuple(str(p) for p in self.exclude))
        object.__setattr__(self, "include_conv", bool(self.include_conv))
        if nm is None:
            if self.sparsity is None:
                raise ValueError("give a sparsity in [0, 1) (or an N:M pattern such as '2:4')")
            object.__setattr__(self, "sparsity", check_sparsity(self.sparsity))
            return
        implied = 1.0 - nm[0] / nm[1]
        if self.sparsity is not None and abs(check_sparsity(self.sparsity) - implied) > 1e-9:
            raise ValueError(
                f"pattern {self.pattern} fixes the sparsity at {implied:g}; got sparsity={self.sparsity!r} "
                "(leave it out or use an unstructured pattern)"
            )
        if self.criterion == "global":
            raise ValueError("a global threshold cannot make an N:M pattern; use criterion 'magnitude' or 'wanda'")
        object.__setattr__(self, "sparsity", implied)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> MagnitudeConfig:
        known = {"sparsity", "criterion", "pattern", "include_conv", "exclude", "wanda_group"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MagnitudeConfig fields {unknown}; known: {sorted(known)}")
        return cls(**{k: (tuple(v) if k == "exclude" else v) for k, v in d.items()})


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


# masks (True = set to zero) ----------------------------------------------------------------------------
def n_pruned(numel: int, sparsity: float) -> int:
    """How many of `numel` weights a sparsity prunes: round(s * n), half up, so within half a weight."""
    return min(numel, int(math.floor(sparsity * numel + 0.5)))


def _smallest_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k smallest entries (1 <= k <= cols) of each row of a 2-D `scores`; ties: lower column first.

    The row's threshold is its k-th smallest score (the largest of the k smallest, from topk); entries below it
    are taken, then entries equal to it from the left until the row has exactly k.
    """
    thresholds = torch.topk(scores, k, dim=1, largest=False, sorted=False).values.amax(dim=1, keepdim=True)
    less = scores < thresholds
    eq = scores == thresholds
    need = k - less.sum(dim=1, keepdim=True)
    return less | (eq & (eq.cumsum(dim=1) <= need))


def magnitude_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly round(s * n) entries of smallest score (ties: lower flat index first)."""
    flat = scores.reshape(1, -1)
    k = n_pruned(flat.numel(), sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _smallest_k(flat, k).view(scores.shape)


def rowwise_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune round(s * cols) entries of smallest score in each output row (Wanda's comparison group)."""
    s2 = scores.reshape(scores.shape[0], -1)
    k = n_pruned(s2.shape[1], sparsity)
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return _smallest_k(s2, k).view(scores.shape)


def check_nm_shape(name: str, shape: tuple[int, ...], n: int, m: int) -> None:
    rows = shape[0] if shape else 0
    cols = math.prod(shape) // rows if rows else 0
    if not rows or cols % m:
        raise SemiStructuredShapeError(
            f"{name}: shape {shape} cannot take a {n}:{m} pattern: its input dimension ({cols} weights per "
            f"output row) is not a multiple of {m}; exclude this layer (--exclude) or prune it unstructured"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int, name: str = "weight") -> torch.Tensor:
    """Keep the n largest scores of every m consecutive entries along the input dimension."""
    check_nm_shape(name, tuple(scores.shape), n, m)
    rows = scores.shape[0]
    cols = scores.numel() // rows
    groups = scores.reshape(rows, cols // m, m)
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, torch.argsort(groups, dim=-1, stable=True)[..., : m - n], True)
    return mask.view(scores.shape)


def _abs_bits(t: torch.Tensor) -> torch.Tensor:
    """|t| as float32 bit patterns (int32): for non-negative floats, integer order = float order."""
    return t.detach().abs().float().reshape(-1).view(torch.int32)


def kth_smallest_abs(tensors: Sequence[torch.Tensor], k: int) -> float:
    """The k-th smallest |w| (1-based) over all `tensors`, exactly, without concatenating them.

    Two-pass radix select on the float32 bit patterns: a 2^16-bin histogram of the high half-words locates the
    bucket of the k-th value, a second histogram of the low half-words inside that bucket pins it down.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    device = tensors[0].device
    hist = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for t in tensors:
        hist += torch.bincount(_abs_bits(t) >> 16, minlength=1 << 16)
    cum = hist.cumsum(0)
    hi = int(torch.searchsorted(cum, torch.tensor(k, device=device)))
    before = int(cum[hi - 1]) if hi else 0
    hist_lo = torch.zeros(1 << 16, dtype=torch.int64, device=device)
    for t in tensors:
        bits = _abs_bits(t)
        hist_lo += torch.bincount(bits[(bits >> 16) == hi] & 0xFFFF, minlength=1 << 16)
    lo = int(torch.searchsorted(hist_lo.cumsum(0), torch.tensor(k - before, device=device)))
    return float(torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32))


def global_masks(weights: Sequence[torch.Tensor], sparsity: float) -> tuple[list[torch.Tensor], float | None]:
    """Masks pruning exactly round(s * N) weights of smallest |w| over all `weights`, and the threshold.

    Everything below the threshold (the k-th smallest |w|) is pruned; entries equal to it are pruned in order
    (tensor order, then flat index) until k are.
    """
    total = sum(w.numel() for w in weights)
    k = n_pruned(total, sparsity)
    if k == 0:
        return [torch.zeros_like(w, dtype=torch.bool) for w in weights], None
    threshold = kth_smallest_abs(weights, k)
    masks = [w.detach().abs().float() < threshold for w in weights]
    remaining = k - sum(int(m.sum()) for m in masks)
    for w, m in zip(weights, masks):
        if remaining <= 0:
            break
        eq = (w.detach().abs().float() == threshold).reshape(-1).nonzero().squeeze(1)[:remaining]
        m.view(-1)[eq] = True
        remaining -= eq.numel()
    return masks, threshold


# Wanda activations -------------------------------------------------------------------------------------
_TOKEN_MASK: list[torch.Tensor | None] = [None]


@contextlib.contextmanager
def token_mask(mask: torch.Tensor | None):
    """While active, Linear inputs shaped [batch, tokens, ...] count only the tokens where `mask` is True."""
    _TOKEN_MASK.append(mask)
    try:
        yield
    finally:
        _TOKEN_MASK.pop()


def _accumulate(sums: dict, name: str, kind: str, x: torch.Tensor) -> None:
    x = x.detach()
    if kind == "linear":
        mask = _TOKEN_MASK[-1]
        if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.to(x.device).bool()]
        sq = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
    else:  # conv: [batch, channels, *spatial]
        sq = x.float().pow(2).transpose(0, 1).reshape(x.shape[1], -1).sum(1)
    sums[name] = sq if name not in sums else sums[name] + sq


def _record_input(x: torch.Tensor, name: str, kind: str) -> None:
    _accumulate(_RECORDING[-1], name, kind, x)


_RECORDING: list[dict] = []


def input_norms(model: nn.Module, layers: Sequence[Layer], run: Callable[[Callable], None]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature / channel of each layer over the calibration data.

    `run(forward)` must call `forward(*args, **kwargs)` on each calibration batch (inside `token_mask(...)` to
    exclude padding); `forward` is the model itself, or for a graph module a copy with recording nodes.
    """
    sums: dict[str, torch.Tensor] = {}
    gm = _graph_module(model)
    if gm is not None:
        rec = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        for key in ("_in_spec", "_out_spec"):
            if hasattr(gm, key):
                setattr(rec, key, getattr(gm, key))
        by_name = {node.name: layer for layer in layers for node in layer.nodes}
        for node in list(rec.graph.nodes):
            if node.op == "call_function" and node.name in by_name:
                layer = by_name[node.name]
                with rec.graph.inserting_before(node):
                    rec.graph.call_function(_record_input, (node.args[0], layer.name, layer.kind))
        rec.recompile()

        def forward(input_ids, attention_mask=None, **_):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            return rec(input_ids, attention_mask=attention_mask.to(input_ids.dtype))

        _RECORDING.append(sums)
        try:
            with torch.no_grad():
                run(forward)
        finally:
            _RECORDING.pop()
    else:
        handles = []
        for layer in layers:
            def hook(mod, args, _layer=layer):
                _accumulate(sums, _layer.name, _layer.kind, args[0])

            handles += [m.register_forward_pre_hook(hook) for m in layer.modules]
        try:
            with torch.no_grad():
                run(model)
        finally:
            for h in handles:
                h.remove()
    missing = [layer.name for layer in layers if layer.name not in sums]
    if missing:
        raise ValueError(f"the calibration run never reached {len(missing)} layers, e.g. {missing[:3]}")
    return {name: s.sqrt() for name, s in sums.items()}


def calibration_runner(calibration) -> Callable[[Callable], None]:
    """`run(forward)` for `input_norms` from a Calibration (text encoders) or a list of kwargs (denoisers)."""
    if callable(calibration) and not isinstance(calibration, (Calibration, Sequence)):
        return calibration
    if isinstance(calibration, Calibration):

        def run(forward):
            for ids, mask in calibration.chunks:
                with token_mask(calibration.read_mask(mask)):
                    forward(ids, attention_mask=mask)

        return run
    if isinstance(calibration, Sequence) and all(isinstance(x, Mapping) for x in calibration):

        def run(forward):
            for kwargs in calibration:
                forward(**kwargs)

        return run
    raise TypeError(
        "Wanda needs calibration data: a Calibration (tokenized prompts), a list of forward kwargs, "
        f"or a function run(forward); got {type(calibration).__name__}"
    )


def wanda_scores(layer: Layer, norm: torch.Tensor) -> torch.Tensor:
    """|W| * ||X_j|| broadcast over the input dimension (input channels for a convolution)."""
    w = layer.weight.detach().abs().float()
    if layer.kind == "linear":
        return w * norm.to(w.device).view(1, -1)
    if layer.groups != 1:
        raise ValueError(f"{layer.name}: Wanda on a grouped convolution (groups={layer.groups}) is not supported")
    return w * norm.to(w.device).view(1, -1, *([1] * (w.dim() - 2)))


# pruning -----------------------------------------------------------------------------------------------
@dataclass
class LayerResult:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    pruned: int  # weights this call set to zero (or kept zero)
    zeros: int  # zeros in the weight afterwards

    @property
    def sparsity(self) -> float:
        return self.zeros / self.params if self.params else 0.0


@dataclass
class PruneResult:
    config: MagnitudeConfig
    layers: list[LayerResult]
    sparsity: SparsityReport
    threshold: float | None = None  # the global criterion's |w| threshold
    info: dict = field(default_factory=dict)

    def to_dict(self, per_layer: bool = True) -> dict:
        d = {
            "config": self.config.to_dict(),
            "threshold": self.threshold,
            "layers_pruned": len(self.layers),
            "sparsity": self.sparsity.to_dict(),
            **self.info,
        }
        if per_layer:
            d["layers"] = [
                {"name": r.name, "kind": r.kind, "shape": list(r.shape), "params": r.params, "zeros": r.zeros}
                for r in self.layers
            ]
        return d


def compute_masks(
    model: nn.Module,
    config: MagnitudeConfig,
    calibration=None,
    norms: Mapping[str, torch.Tensor] | None = None,
    layers: Sequence[Layer] | None = None,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The masks (True = zero) `config` gives for each selected layer, without touching the model."""
    layers = list(layers) if layers is not None else select_layers(model, config)
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no Linear{' or conv' if config.include_conv else ''} layers to prune"
            + (f" (all excluded by {list(config.exclude)})" if config.exclude else "")
        )
    nm = config.nm
    if nm is not None:  # check every shape before changing anything
        for layer in layers:
            check_nm_shape(layer.name, layer.shape, *nm)
    if config.criterion == "wanda" and norms is None:
        if calibration is None:
            raise ValueError("criterion 'wanda' needs calibration data (prompts for a text encoder, inputs for a denoiser)")
        norms = input_norms(model, layers, calibration_runner(calibration))
    if config.criterion == "global":
        masks, threshold = global_masks([layer.weight for layer in layers], config.sparsity)
        return {layer.name: m for layer, m in zip(layers, masks)}, threshold
    out = {}
    for layer in layers:
        if config.criterion == "wanda":
            scores = wanda_scores(layer, norms[layer.name])
        else:
            scores = layer.weight.detach().abs()
        if nm is not None:
            out[layer.name] = nm_mask(scores, *nm, name=layer.name)
        elif config.criterion == "wanda" and config.wanda_group == "row":
            out[layer.name] = rowwise_mask(scores, config.sparsity)
        else:
            out[layer.name] = magnitude_mask(scores, config.sparsity)
    return out, None


@torch.no_grad()
def prune(
    model: nn.Module,
    config: MagnitudeConfig | float,
    calibration=None,
    norms: Mapping[str, torch.Tensor] | None = None,
) -> PruneResult:
    """Zero the weights `config` selects, in place; returns per-layer counts and the sparsity report.

    `model`: a HF text encoder, a diffusers denoiser (any nn.Module), or a PrunedEncoder (then only the
    weights the plan kept are pruned). `calibration` (Wanda only): a Calibration, a list of forward kwargs,
    or run(forward). `norms`: precomputed Wanda input norms (as `input_norms` returns).
    """
    if not isinstance(config, MagnitudeConfig):
        config = MagnitudeConfig(sparsity=config)
    layers = select_layers(model, config)
    masks, threshold = compute_masks(model, config, calibration, norms, layers)
    results = []
    for layer in layers:
        mask = masks[layer.name]
        layer.weight.masked_fill_(mask.to(layer.weight.device), 0)
        results.append(
            LayerResult(layer.name, layer.kind, layer.shape, layer.weight.numel(), int(mask.sum()), _zeros(layer.weight))
        )
    return PruneResult(config, results, measure_sparsity(model), threshold)


magnitude_prune = prune  # the name skrr_compile exports


def snapshot(layers: Sequence[Layer]) -> dict[str, torch.Tensor]:
    """Copies of the layers' weights, to restore with `restore` (a sweep prunes the same model many times)."""
    return {layer.name: layer.weight.detach().clone() for layer in layers}


@torch.no_grad()
def restore(layers: Sequence[Layer], saved: Mapping[str, torch.Tensor]) -> None:
    for layer in layers:
        layer.weight.copy_(saved[layer.name])


# hybrid: Skrr plan + magnitude -------------------------------------------------------------------------
def _own_weights(pruned: PrunedEncoder, names: set[str]) -> None:
    """Give the PrunedEncoder its own copies of `names` (shared tensors stay shared) so pruning them leaves the
    dense model it was made from untouched."""
    tensors = named_tensors(pruned.graph_module)
    copies: dict[int, torch.Tensor] = {}
    new = {}
    for name, t in tensors.items():
        if name in names:
            if id(t) not in copies:
                copies[id(t)] = nn.Parameter(t.detach().clone(), requires_grad=False)
            new[name] = copies[id(t)]
        else:
            new[name] = t
    bind_tensors(pruned.graph_module, new)


def hybrid(model, plan: Plan | None, config: MagnitudeConfig | float, calibration=None) -> tuple[PrunedEncoder, PruneResult]:
    """Apply a Skrr plan, then magnitude-prune the Linear weights of the kept sub-blocks (and embeddings-side
    Linears such as a pooler), on copies. The sparsity report counts each parameter once: removed by the plan,
    zero in what is kept, or neither (`SparsityReport.total`)."""
    if not isinstance(config, MagnitudeConfig):
        config = MagnitudeConfig(sparsity=config)
    if isinstance(model, PrunedEncoder) and plan is None:
        pruned = model
    else:
        pruned = apply(model, plan if plan is not None else Plan())
    layers = select_layers(pruned, config)
    _own_weights(pruned, {n for layer in layers for n in (layer.name, *layer.aliases)})
    result = prune(pruned, config, calibration)
    result.info["plan"] = {"skip": list(pruned.plan.skip), "reuse": {str(k): v for k, v in pruned.plan.reuse.items()}}
    pruned.info["magnitude"] = result.to_dict(per_layer=False)
    return pruned, result


# layouts after loading ---------------------------------------------------------------------------------
def _set_weight(model: nn.Module, layer: Layer, tensor: torch.Tensor) -> None:
    param = nn.Parameter(tensor, requires_grad=False)
    gm = _graph_module(model)
    if gm is not None:
        for name in (layer.name, *layer.aliases):
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            owner._parameters[leaf] = param
    else:
        for m in layer.modules:
            m.weight = param
    layer.weight = param


def to_sparse_layout(model: nn.Module, min_sparsity: float = 0.5) -> list[str]:
    """Replace Linear weights at least `min_sparsity` sparse by torch sparse CSR tensors (int32 indices).

    F.linear accepts them (forward only). Memory: CSR keeps nnz * (value + 4 bytes) plus row pointers, so it
    only saves RAM above 50 % sparsity for fp32 (above 67 % for fp16); speed on CPU is usually worse than
    dense (see bench/bench_magnitude.py). Returns the converted names.
    """
    converted = []
    for layer in find_layers(model):
        w = layer.weight
        if layer.kind != "linear" or w.layout != torch.strided or w.dim() != 2 or not w.numel():
            continue
        if _zeros(w) / w.numel() >= min_sparsity:
            _set_weight(model, layer, dense_to_csr(w.detach()))
            converted.append(layer.name)
    return converted


def is_nm_sparse(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Every m consecutive weights along the input dimension hold at most n non-zeros."""
    rows = w.shape[0]
    cols = w.numel() // rows if rows else 0
    if cols % m:
        return False
    return bool(((w.detach().reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def to_semi_structured(model: nn.Module) -> dict:
    """Convert 2:4-sparse Linear weights to torch's semi-structured sparse tensors (CUDA, fp16/bf16/int8).

    Layers that are not 2:4, or whose shape/dtype torch's kernels do not take, stay dense and are listed under
    "skipped" with the reason. Raises RuntimeError off CUDA (torch has no CPU kernels for these tensors).
    """
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    layers = [layer for layer in find_layers(model) if layer.kind == "linear"]
    if not layers or not all(layer.weight.is_cuda for layer in layers):
        dev = layers[0].weight.device if layers else "none"
        raise RuntimeError(
            f"semi-structured (2:4) sparse tensors need the model on a CUDA device; its weights are on {dev}. "
            "Load with layout='dense' (or 'sparse_csr') on CPU"
        )
    constraints = getattr(SparseSemiStructuredTensor, "_DTYPE_SHAPE_CONSTRAINTS", {})
    converted, skipped = [], {}
    for layer in layers:
        w = layer.weight.detach()
        if not is_nm_sparse(w, 2, 4):
            skipped[layer.name] = "not 2:4 sparse"
            continue
        c = constraints.get(w.dtype)
        if c is None:
            skipped[layer.name] = f"dtype {w.dtype} has no semi-structured kernel (use fp16/bf16)"
            continue
        rows_min, cols_min = c.sparse_min_rows, c.sparse_min_cols
        if w.shape[0] % rows_min or w.shape[1] % cols_min:
            skipped[layer.name] = f"shape {tuple(w.shape)}: rows must be a multiple of {rows_min}, cols of {cols_min}"
            continue
        try:
            _set_weight(model, layer, to_sparse_semi_structured(w))
        except (RuntimeError, ValueError) as e:
            skipped[layer.name] = f"torch refused: {e}"
            continue
        converted.append(layer.name)
    return {"converted": converted, "skipped": skipped}
