"""Trace a HF text encoder to an FX graph (torch.export, non-strict) and find its sub-blocks."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export import Dim

from skrr_compile.core.plan import Plan
from skrr_compile.passes.graph_utils import ASSERT_TARGETS, fetch_attr, live_nodes, unique_tensors
from skrr_compile.passes.partition import SubBlock, UnsupportedModelError, partition
from skrr_compile.passes.rewrite import plan_redirects, rewrite
from skrr_compile.utils.quiet import dependency_warnings_silenced
from skrr_compile.utils.tensors import param_numel

SUPPORTED = (
    "T5EncoderModel",
    "UMT5EncoderModel",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "BertModel",
    "LlamaModel",
    "Qwen2Model",
    "Gemma2Model",
    # issue 12: the LLM / multilingual encoders of today's pipelines (tests/test_llm_encoders.py)
    "Qwen3Model",
    "MistralModel",
    "Phi3Model",
    "Gemma3TextModel",
    "MT5EncoderModel",
    "XLMRobertaModel",
)


def find_layer_list(model: nn.Module) -> str:
    """The module path of the encoder's layer list: the ModuleList of identical, parameter-carrying layers."""
    candidates = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            classes = {type(m) for m in mod}
            n_params = sum(p.numel() for p in mod.parameters())
            if len(classes) == 1 and n_params > 0 and len(list(next(iter(mod)).children())) > 0:
                candidates.append((name, n_params))
    # a ModuleList nested in another one's layers (e.g. T5Block.layer) is part of that layer
    top = [c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)]
    if len(top) != 1:
        found = [c[0] for c in top] or "none"
        raise UnsupportedModelError(
            f"{type(model).__name__}: expected one stack of transformer layers, found {found}. "
            f"Pass a text encoder; supported: {', '.join(SUPPORTED)}"
        )
    return top[0][0]


@contextlib.contextmanager
def _trace_settings(model: nn.Module):
    """Eval mode and config flags that make the graph return every output a pipeline may read.

    The flags go on every config in the model, not only `model.config`: UMT5EncoderModel and MT5EncoderModel
    give their encoder stack a deep copy of the config, and the stack's `capture_outputs` reads
    `output_hidden_states` from its own copy (T5EncoderModel shares one config object, hence T5 worked)."""
    keys = ("output_hidden_states", "use_cache", "return_dict")
    configs = {id(model.config): model.config}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):  # a PretrainedConfig
            configs.setdefault(id(cfg), cfg)
    saved = [(cfg, {k: getattr(cfg, k, None) for k in keys}) for cfg in configs.values()]
    was_training = model.training
    for cfg, _ in saved:
        cfg.output_hidden_states, cfg.use_cache, cfg.return_dict = True, False, True
    model.eval()
    try:
        yield
    finally:
        for cfg, values in saved:
            for k, v in values.items():
                setattr(cfg, k, v)
        model.train(was_training)


def _example_inputs(model: nn.Module):
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    ids = (torch.arange(16, device=device).reshape(2, 8) * 7 + 3) % vocab
    return ids, torch.ones_like(ids)


def export_encoder(model: nn.Module) -> fx.GraphModule:
    """torch.export (non-strict) with dynamic batch and sequence dims; run-time dtype asserts removed."""
    ids, mask = _example_inputs(model)
    max_len = getattr(model.config, "max_position_embeddings", None)
    batch, seq = Dim("batch", min=1, max=65536), Dim("seq", min=1, max=max_len or 65536)
    shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    with _trace_settings(model):
        try:
            ep = torch.export.export(
                model, (ids,), {"attention_mask": mask}, strict=False, dynamic_shapes=shapes
            )
        except Exception as e:
            raise UnsupportedModelError(
                f"torch.export could not trace {type(model).__name__} with dynamic batch/sequence dims: {e}"
            ) from e
    gm = ep.module()
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERT_TARGETS:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm






@dataclass
class EncoderGraph:
    """The traced encoder: its torch.export graph module and the table of its sub-blocks."""

    graph_module: fx.GraphModule
    blocks: list[SubBlock]
    config: object
    architecture: str  # HF class name, used to rebuild the model from its config
    layers_path: str
    stream_in: str

    @property
    def total_params(self) -> int:
        """All encoder parameters, embeddings included (the paper's denominator)."""
        return param_numel(self.graph_module)

    @property
    def fingerprint(self) -> str:
        """Identifies the architecture: class, layer list, and every sub-block's parameter names/shapes."""
        gm = self.graph_module
        desc = {
            "architecture": self.architecture,
            "layers": self.layers_path,
            "total": self.total_params,
            "blocks": [
                [b.kind, b.layer, [[p, list(fetch_attr(gm, p).shape)] for p in b.params]] for b in self.blocks
            ],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()

    def live_param_names(self, plan: Plan | None = None) -> set[str]:
        gm = self.graph_module
        redirect = {} if plan is None else plan_redirects(gm, self.blocks, plan.skip, plan.reuse)
        live = live_nodes(gm.graph, redirect)
        return {n.target for n in live if n.op == "get_attr"}

    def removed_params(self, plan: Plan) -> int:
        """Parameters that leave the model under `plan` (measured by graph liveness, so exact)."""
        gm = self.graph_module
        kept = unique_tensors(
            t for t in (fetch_attr(gm, n) for n in self.live_param_names(plan)) if isinstance(t, nn.Parameter)
        )
        return self.total_params - sum(t.numel() for t in kept)

    def sparsity(self, plan: Plan) -> float:
        return self.removed_params(plan) / self.total_params

    def table(self) -> str:
        total = self.total_params
        rows = [f"{self.architecture}: {len(self.blocks)} sub-blocks, {total:,} params (layers at {self.layers_path})"]
        rows.append(f"{'idx':>4} {'kind':<5} {'layer':>5} {'params':>14} {'% of model':>10}  path")
        for b in self.blocks:
            rows.append(
                f"{b.index:>4} {b.kind:<5} {b.layer:>5} {b.num_params:>14,} {100 * b.num_params / total:>9.2f}%  {b.path}"
            )
        return "\n".join(rows)

    def copy_graph_module(self) -> fx.GraphModule:
        """A new GraphModule with a copied graph; parameters are shared, not copied."""
        gm = self.graph_module
        with dependency_warnings_silenced():  # torch's pytree LeafSpec deprecation, on every deepcopy
            new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
        for key in ("_in_spec", "_out_spec"):
            if hasattr(gm, key):
                setattr(new, key, getattr(gm, key))
        return new


def trace(model: nn.Module) -> EncoderGraph:
    """Trace a HF text encoder and partition it into MHA / FFN sub-blocks."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise UnsupportedModelError(
            f"expected a HF text encoder (an nn.Module with .config), got {type(model).__name__}; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "decoder"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; pass its encoder (e.g. T5EncoderModel)"
        )
    layers_path = find_layer_list(model)
    n_layers = len(model.get_submodule(layers_path))
    gm = export_encoder(model)
    try:
        result = partition(gm, [f"{layers_path}.{i}" for i in range(n_layers)])
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{type(model).__name__} (layers at {layers_path!r}): {e}") from e
    return EncoderGraph(
        graph_module=gm,
        blocks=result.blocks,
        config=model.config,
        architecture=type(model).__name__,
        layers_path=layers_path,
        stream_in=result.stream_in,
    )


def apply_to_graph(graph: EncoderGraph, plan: Plan) -> fx.GraphModule:
    """A new GraphModule with `plan` applied (the EncoderGraph itself is left untouched)."""
    plan.validate(graph.blocks, graph.fingerprint)
    gm = graph.copy_graph_module()
    rewrite(gm, graph.blocks, plan.skip, plan.reuse)
    return gm


def block_table(blocks: list[SubBlock]) -> list[Mapping]:
    return [
        {"index": b.index, "kind": b.kind, "layer": b.layer, "params": b.num_params, "path": b.path} for b in blocks
    ]


# load -------------------------------------------------------------------------------------------------
