"""Analysis pass: cut the partitioned graph into stages for the search.

  prefix  : everything that depends only on the inputs and shared parameters (embeddings, masks, T5's
            position bias, CLIP's pooling index), computed once per prompt chunk;
  stage k : s_k -> s_{k+1}, sub-block k's branch, its residual add and (post-LN) the norm after it;
  suffix  : the final norm / pooling / projection after the last sub-block.
s_0..s_K are the hidden states at sub-block boundaries. A node that depends on a parameter a sub-block
owns (UMT5's per-layer position bias) stays in that sub-block's stage, so re-use swaps it too.
Reads of earlier-stage values from later stages must be (no-op copies of) boundaries: the runner then
serves them from its boundary cache. Writes node.meta["skrr"]["stage"] = "prefix" | k | "suffix".
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .graph_utils import live_nodes, strip_noops
from .partition import META_KEY, SubBlock, UnsupportedModelError


@dataclass
class StageSplit:
    boundaries: list[fx.Node]  # s_0 .. s_K
    prefix: list[fx.Node]
    stages: list[list[fx.Node]]  # stage k: nodes needed to compute s_{k+1} from s_k
    skip_stages: list[list[fx.Node]]  # stage k when sub-block k is skipped (post-LN norm only, or nothing)
    suffix: list[fx.Node]
    output: fx.Node
    modified: bool = False


def _descendants(starts: list[fx.Node]) -> set[fx.Node]:
    seen, todo = set(), list(starts)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.users)
    return seen


def needed_nodes(targets: list[fx.Node], members: set[fx.Node], redirect=None) -> set[fx.Node]:
    """Members of `members` that `targets` need (backwards through inputs, honouring a redirect)."""
    redirect = redirect or {}
    seen, todo = set(), list(targets)
    while todo:
        n = todo.pop()
        n = redirect.get(n, n)
        if n in seen or n not in members:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen


def split_stages(gm: fx.GraphModule, blocks: list[SubBlock], stream_in: str) -> StageSplit:
    nodes = list(gm.graph.nodes)
    by_name = {n.name: n for n in nodes}
    order = {n: i for i, n in enumerate(nodes)}
    boundaries = [by_name[stream_in]] + [by_name[b.stream_out] for b in blocks]
    for k, b in enumerate(blocks):
        if strip_noops(by_name[b.residual]) is not strip_noops(boundaries[k]):
            raise UnsupportedModelError(
                f"sub-block {k} reads {b.residual} but the previous boundary is {boundaries[k].name}"
            )
    owned = [n for n in nodes if n.op == "get_attr" and any(n.target in b.params for b in blocks)]
    dynamic = _descendants([boundaries[0]] + owned) - {boundaries[0]}
    live = live_nodes(gm.graph)
    output = next(n for n in nodes if n.op == "output")
    prefix = [n for n in nodes if n not in dynamic and n.op != "output" and n in live]
    positions = [order[s] for s in boundaries]
    rest = [n for n in nodes if n in dynamic and n in live and n.op != "output"]
    stage_members: list[set[fx.Node]] = [set() for _ in blocks]
    suffix_members: set[fx.Node] = set()
    for n in rest:
        p = order[n]
        if p <= positions[0]:
            continue  # s_0 itself
        if p > positions[-1]:
            suffix_members.add(n)
            continue
        k = next(i for i in range(len(blocks)) if positions[i] < p <= positions[i + 1])
        stage_members[k].add(n)

    stages, skip_stages = [], []
    for k, b in enumerate(blocks):
        target = [boundaries[k + 1]]
        full = needed_nodes(target, stage_members[k])
        skip = needed_nodes(target, stage_members[k], {by_name[b.output]: by_name[b.residual]})
        stages.append(sorted(full, key=order.__getitem__))
        skip_stages.append(sorted(skip - {by_name[b.output]}, key=order.__getitem__))
        for n in full:
            n.meta.setdefault(META_KEY, {})["stage"] = k
    suffix = sorted(suffix_members, key=order.__getitem__)
    for n in prefix:
        n.meta.setdefault(META_KEY, {})["stage"] = "prefix"
    for n in suffix:
        n.meta.setdefault(META_KEY, {})["stage"] = "suffix"
    return StageSplit(boundaries, prefix, stages, skip_stages, suffix, output)
