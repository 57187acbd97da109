"""ShortGPT baseline: whole layers ranked once by block influence."""

from __future__ import annotations

import torch

from skrr_compile.blocksearch.evaluator import Evaluator
from skrr_compile.blocksearch.target import removed_by_skip
from skrr_compile.core.trace import EncoderGraph


# --- baselines ----------------------------------------------------------------------------------------
def shortgpt(graph: EncoderGraph, ev: Evaluator, target: int) -> tuple[list[int], list[dict]]:
    """Whole layers ranked once by block influence BI = 1 - cos(h_in, h_out), padding masked."""
    r = ev.runner
    n_layers = len(graph.blocks) // 2
    parts = []  # per chunk: (global chunk, BI sums per layer, tokens), folded in global order below
    for c in ev.owned:
        if c < 0:
            continue
        chunk_bi = [0.0] * n_layers
        ctx = ev.context(c)
        mask = ev.disc.masks[c]
        h = ctx["s0"]
        states = [h]
        for k in range(r.num_blocks):
            h = r.stage(k, h, ctx, "keep")
            states.append(h)
        for layer in range(n_layers):
            cos = torch.nn.functional.cosine_similarity(states[2 * layer].double(), states[2 * layer + 2].double(), -1)
            chunk_bi[layer] += float((1 - cos)[mask].sum())
        parts.append((ev.global_id[c], chunk_bi, int(mask.sum())))
    bi_sum, count = [0.0] * n_layers, 0
    for _, chunk_bi, n in sorted(p for rank_parts in ev.group.gather_objects(parts) for p in rank_parts):
        for layer in range(n_layers):
            bi_sum[layer] += chunk_bi[layer]
        count += n
    bi = [s / max(count, 1) for s in bi_sum]
    ranking = sorted(range(n_layers), key=lambda layer: (bi[layer], layer))
    skip: list[int] = []
    memo: dict = {}
    for layer in ranking:
        if removed_by_skip(graph, skip, memo) >= target:
            break
        if len(skip) + 2 >= len(graph.blocks):
            break
        skip += [2 * layer, 2 * layer + 1]
    return sorted(skip), [{"layer": layer, "block_influence": bi[layer]} for layer in ranking]
