"""The memory plan of a search, computed from the traced graph's shapes before anything runs.

What the device holds during a search (the memory model the search keeps):
  weights        the encoder in the search dtype (offloaded: the two largest stages, one running, one arriving)
  reference      the projected dense reference, unless kept on the host or on disk
  caches         boundary states of the beams and of candidates being scored, at most `cache_bytes`
  context        one prompt chunk's prefix values (embeddings, masks, position bias)
  working set    the largest stage's live values on the largest chunk (values are freed after their last
                 reader, as the staged runner does), plus the discrepancy's temporaries
Nothing else grows with the number of prompts. Node sizes come from `node.meta["val"]` of the
torch.export graph, with the symbolic batch and sequence sizes replaced by the chunk's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import fx

from skrr_compile.blocksearch.runner import StagedRunner, _Segment

GiB = 1 << 30


def _symbols(runner: StagedRunner, batch: int, length: int) -> dict:
    subs = {}
    ids = runner.placeholders[0].meta.get("val")
    if ids is not None:
        for sym, value in zip(ids.shape, (batch, length)):
            if isinstance(sym, torch.SymInt):
                subs[sym.node.expr] = value
    return subs


def _size(value, subs) -> int:
    if isinstance(value, (tuple, list)):
        return sum(_size(v, subs) for v in value)
    if not isinstance(value, torch.Tensor):
        return 0
    numel = 1
    for d in value.shape:
        numel *= int(d.node.expr.subs(subs)) if isinstance(d, torch.SymInt) else int(d)
    return numel * value.element_size()


def node_bytes(node: fx.Node, subs) -> int:
    return 0 if node.op == "get_attr" else _size(node.meta.get("val"), subs)


def segment_peak(segment: _Segment, subs, held: int = 0) -> int:
    """Peak bytes of live values while `segment` runs, `held` bytes alive throughout."""
    live = peak = held
    for n, frees in zip(segment.nodes, segment.frees):
        live += node_bytes(n, subs)
        peak = max(peak, live)
        live -= sum(node_bytes(a, subs) for a in frees if a.op != "placeholder")
    return peak


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    prompts: int
    chunks: int
    chunk_shape: tuple[int, int]
    weights: int
    weights_total: int
    reference: int
    reference_placement: str
    caches: int
    cache_budget: int
    context: int
    working_set: int
    peak: int
    offload: str = "none"
    note: str = ""

    def lines(self) -> list[str]:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        w = f"{g(self.weights)}" + (f" (offload {self.offload}: of {g(self.weights_total)})" if self.offload != "none" else "")
        ref = g(self.reference) if self.reference_placement == "device" else f"0 (on {self.reference_placement})"
        return [
            f"memory plan ({self.device}, {self.dtype}; {self.prompts} prompts in {self.chunks} chunks, "
            f"largest {self.chunk_shape[0]} x {self.chunk_shape[1]} tokens){': ' + self.note if self.note else ''}",
            f"  weights          {w}",
            f"  reference        {ref}",
            f"  boundary caches  {g(self.caches)} (budget {g(self.cache_budget)})",
            f"  chunk context    {g(self.context)}",
            f"  peak working set {g(self.working_set)}",
            f"estimated peak device memory: {g(self.peak)}",
        ]

    def to_dict(self) -> dict:
        return asdict(self)


def plan_memory(runner: StagedRunner, chunk_shapes: Sequence[tuple[int, int]], *, projection_width: int | None,
                dtype: torch.dtype, cache_bytes: int, beam: int, reference: str = "device",
                offload: str = "none", device: str = "cpu", note: str = "") -> MemoryPlan:
    """Estimate what a search over chunks of these (batch, length) shapes holds on the device."""
    graph = runner.graph
    itemsize = torch.empty((), dtype=dtype).element_size()
    weights_total = graph.total_params * itemsize
    K = runner.num_blocks
    s0 = runner.split.boundaries[0]
    prompts = sum(b for b, _ in chunk_shapes)
    big = max(chunk_shapes, key=lambda bl: bl[0] * bl[1] * bl[1])
    subs = _symbols(runner, *big)
    hidden = lambda b, length: _size(s0.meta.get("val"), _symbols(runner, b, length))  # noqa: E731
    per_boundary = sum(hidden(b, length) for b, length in chunk_shapes) + hidden(1, max(1, big[1] // 8))
    width = projection_width or (s0.meta["val"].shape[-1] if s0.meta.get("val") is not None else 0)
    width = int(width) if not isinstance(width, torch.SymInt) else 0
    ref_all = sum(b * length for b, length in chunk_shapes) * width * itemsize
    context = sum(node_bytes(n, subs) for n in runner.ctx_nodes)
    h = node_bytes(s0, subs)
    stage_peak = max(segment_peak(runner._stage_segment(k, False), subs, held=h) for k in range(K))
    suffix_peak = segment_peak(runner._suffix_segment, subs, held=h)
    tokens = big[0] * big[1]
    discrepancy = tokens * width * (itemsize + 4 + 4)  # projected features, fp32 difference and square
    chunk_ref = tokens * width * itemsize if reference != "device" else 0
    working = max(stage_peak, suffix_peak + discrepancy + chunk_ref) + 2 * h  # + the boundary in and out
    # beam caches (at most half the budget) and candidate states: every boundary 1..K-1 of every beam, twice
    caches = min(cache_bytes, 2 * beam * max(0, K - 1) * per_boundary)
    if offload == "none":
        weights = weights_total
    else:
        per_stage = [sum(t.numel() for t in _stage_params(graph, k)) * itemsize for k in range(K)]
        shared = weights_total - sum(per_stage)
        weights = shared + 2 * max(per_stage)
    peak = weights + (ref_all if reference == "device" else 0) + caches + context + working
    return MemoryPlan(device=str(device), dtype=str(dtype).removeprefix("torch."), prompts=prompts,
                      chunks=len(chunk_shapes), chunk_shape=tuple(big), weights=weights,
                      weights_total=weights_total, reference=ref_all if reference == "device" else 0,
                      reference_placement=reference, caches=caches, cache_budget=cache_bytes, context=context,
                      working_set=working, peak=peak, offload=offload, note=note)


def _stage_params(graph, k: int) -> list[torch.Tensor]:
    from skrr_compile.passes.graph_utils import fetch_attr

    return [fetch_attr(graph.graph_module, name) for name in sorted(graph.blocks[k].params)]


def measured_peak(device) -> dict:
    """The process's peak so far: CUDA max_memory_allocated, or the peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"what": "torch.cuda.max_memory_allocated", "bytes": int(torch.cuda.max_memory_allocated(device))}
    return {"what": "peak RSS (VmHWM)", "bytes": peak_rss()}


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def chunk_shapes_of(calibration) -> list[tuple[int, int]]:
    return [tuple(ids.shape) for ids, _ in calibration.chunks]


def padded_shapes(n_prompts: int, length: int, chunk_size: int) -> list[tuple[int, int]]:
    """Every prompt padded to `length` tokens (the worst case, when no tokenizer is at hand)."""
    full, rest = divmod(n_prompts, chunk_size)
    return [(chunk_size, length)] * full + ([(rest, length)] if rest else [])

