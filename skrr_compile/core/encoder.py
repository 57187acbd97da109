"""PrunedEncoder: the rewritten graph behind the HF encoder's call signature and output type."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx, nn

from skrr_compile.core.plan import Plan, PlanError
from skrr_compile.core.rebuild import build_graph_module
from skrr_compile.core.trace import EncoderGraph, apply_to_graph, block_table, trace
from skrr_compile.utils.tensors import bind_tensors, named_tensors, param_bytes, param_numel, retarget_devices

_UNSUPPORTED_INPUTS = ("position_ids", "inputs_embeds", "head_mask", "past_key_values")




class PrunedEncoder(nn.Module):
    """Drop-in replacement for the HF text encoder a plan was applied to.

    Call it like the HF model (`input_ids`, `attention_mask`, `output_hidden_states`, `return_dict`); it
    returns the same output class (last_hidden_state, pooled output / text_embeds where the model has one,
    hidden_states when asked). `.to(device)` works; `.to(dtype)` re-traces the graph from the config.
    """

    main_input_name = "input_ids"

    def __init__(self, graph_module: fx.GraphModule, config, plan: Plan, architecture: str, info: dict | None = None):
        super().__init__()
        self.graph_module = graph_module
        self.config = config
        self.plan = plan
        self.architecture = architecture
        self.info = dict(info or {})  # dense_params, removed_params, fingerprint, blocks
        self._graph_device = self.device
        self._graph_dtype = self.dtype

    # HF-like attributes ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.graph_module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.graph_module.parameters() if p.is_floating_point()).dtype

    @property
    def num_params(self) -> int:
        return param_numel(self.graph_module)

    @property
    def num_bytes(self) -> int:
        return param_bytes(self.graph_module)

    @property
    def sparsity(self) -> float:
        dense = self.info.get("dense_params")
        return 1.0 - self.num_params / dense if dense else float("nan")

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ):
        token_types = kwargs.pop("token_type_ids", None)
        if token_types is not None:
            if torch.compiler.is_compiling():  # a data-dependent branch would break the graph: assert in-graph
                torch._assert_async(token_types.eq(0).all(), "the pruned encoder was traced with token_type_ids = 0")
            elif bool(token_types.any()):
                raise ValueError("the pruned encoder was traced with token_type_ids = 0; got non-zero token_type_ids")
        given = [k for k in _UNSUPPORTED_INPUTS if kwargs.get(k) is not None]
        if given or output_attentions:
            raise ValueError(
                f"the pruned encoder takes input_ids and attention_mask only; got {given or ['output_attentions']}"
            )
        if input_ids is None:
            raise ValueError("input_ids is required")
        if self.dtype != self._graph_dtype:
            self._retrace()
        if self.device != self._graph_device:
            retarget_devices(self.graph_module, self.device)
            self._graph_device = self.device
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.graph_module(input_ids, attention_mask=attention_mask.to(input_ids.dtype))
        want_hidden = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        if not want_hidden and hasattr(out, "hidden_states"):
            out.hidden_states = None
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)  # use_return_dict is deprecated
        return out if use_dict else out.to_tuple()

    def to(self, *args, **kwargs):
        """nn.Module.to; a quantized model refuses another dtype (its torchao weights hold their scales in
        the dtype they were quantized in)."""
        dtype = torch._C._nn._parse_to(*args, **kwargs)[1]
        if dtype is not None:
            self._refuse_dtype(dtype)
        return super().to(*args, **kwargs)

    def half(self):
        self._refuse_dtype(torch.float16)
        return super().half()

    def bfloat16(self):
        self._refuse_dtype(torch.bfloat16)
        return super().bfloat16()

    def float(self):
        self._refuse_dtype(torch.float32)
        return super().float()

    def double(self):
        self._refuse_dtype(torch.float64)
        return super().double()

    def _refuse_dtype(self, dtype: torch.dtype) -> None:
        q = self.info.get("quantization")
        if q and dtype.is_floating_point and dtype != self.dtype:
            raise ValueError(
                f"this model is quantized ({q.get('scheme')}) in {str(self.dtype).removeprefix('torch.')}: "
                f".to({dtype}) is refused; quantize a full-precision model in that dtype instead "
                "(skrr.quantize(pruned.to(dtype), scheme))"
            )

    def _retrace(self) -> None:
        """Rebuild the graph for the current dtype from the config and bind the current tensors to it."""
        tensors = named_tensors(self.graph_module)
        gm = build_graph_module(self.config, self.architecture, self.plan, dtype=self.dtype)
        bind_tensors(gm, tensors)
        self.graph_module = gm
        self._graph_dtype = self.dtype
        self._graph_device = torch.device("meta")

    def extra_repr(self) -> str:
        return (
            f"architecture={self.architecture}, params={self.num_params:,}, "
            f"skip={list(self.plan.skip)}, reuse={self.plan.reuse}"
        )






def apply(model_or_graph, plan: Plan, merged: Mapping[str, torch.Tensor] | None = None) -> PrunedEncoder:
    """Apply `plan` to a HF text encoder (or an EncoderGraph from `trace`); returns a PrunedEncoder.

    A LaCo plan (info["merged_params"]) needs `merged`, the merged weights its search scored (from
    `SearchResult.overrides`, or `skrr_compile.blocksearch.laco.merged_weights(plan, plan_path)`): without
    them the result would only skip the layers, so it is refused.
    """
    graph = model_or_graph if isinstance(model_or_graph, EncoderGraph) else trace(model_or_graph)
    names = sorted(plan.info.get("merged_params") or ())
    if names and sorted(merged or {}) != names:
        raise PlanError(
            f"this {'healed' if plan.info.get('heal') else 'LaCo'} plan merges {len(names)} parameters (e.g. {names[0]}) "
            "and needs their merged weights: "
            "pass merged=SearchResult.overrides or merged_weights(plan, plan_path); "
            + ("none were given" if not merged else "the given ones name other parameters")
        )
    fingerprint = graph.fingerprint
    gm = apply_to_graph(graph, plan)
    if names:
        tensors = named_tensors(gm)
        wrong = [n for n in names if n not in tensors or tuple(merged[n].shape) != tuple(tensors[n].shape)]
        if wrong:
            raise PlanError(f"the merged LaCo weights do not fit this model (e.g. {wrong[0]})")
        tensors.update({n: merged[n].detach().clone().to(tensors[n].dtype) for n in names})
        bind_tensors(gm, tensors)
    if plan.fingerprint is None:
        plan = Plan(**{**plan.__dict__, "fingerprint": fingerprint})
    dense = graph.total_params
    info = {
        "dense_params": dense,
        "dense_bytes": param_bytes(graph.graph_module),
        "removed_params": dense - param_numel(gm),
        "fingerprint": fingerprint,
        "blocks": block_table(graph.blocks),
    }
    return PrunedEncoder(gm, graph.config, plan, graph.architecture, info)
