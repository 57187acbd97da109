"""Transform pass: apply a skip / re-use plan to a partitioned graph, in place.

* skip i      : the residual add of sub-block i is replaced by its residual input; its branch dies.
* re-use i->j : sub-block i stays in the graph but reads sub-block j's parameters (one shared storage).
Then every dead node is erased and every parameter no get_attr reads is deleted from the module, so the
module's memory really shrinks.  Post-LN (BERT): the LayerNorm after the add reads the residual input,
i.e. a skipped sub-block keeps its LayerNorm (it is not part of the branch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import fx

from .graph_utils import fetch_attr, live_nodes
from .partition import SubBlock


@dataclass
class RewriteResult:
    graph_module: fx.GraphModule
    removed_nodes: int
    removed_attrs: list[str]
    modified: bool = True


def reuse_param_map(src: SubBlock, dst: SubBlock) -> dict[str, str]:
    """Map each parameter of `src` to the parameter at the same place in `dst` (same relative path)."""
    prefix_src, prefix_dst = src.path + ".", dst.path + "."
    mapping = {}
    for name in src.params:
        if not name.startswith(prefix_src):
            raise ValueError(f"parameter {name!r} of sub-block {src.index} is outside its layer {src.path!r}")
        mapping[name] = prefix_dst + name[len(prefix_src) :]
    missing = sorted(set(mapping.values()) - set(dst.params))
    if missing:
        raise ValueError(
            f"cannot re-use sub-block {dst.index} for {src.index}: it lacks {missing} "
            f"(sub-block {dst.index} owns {list(dst.params)})"
        )
    return mapping


def plan_redirects(
    gm: fx.GraphModule, blocks: Sequence[SubBlock], skip: Sequence[int], reuse: Mapping[int, int]
) -> dict[fx.Node, fx.Node]:
    """The node substitutions a plan makes: add -> residual for skips, param -> param for re-use."""
    nodes = {n.name: n for n in gm.graph.nodes}
    attr_nodes: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            attr_nodes.setdefault(n.target, n)
    redirect: dict[fx.Node, fx.Node] = {}
    for i in skip:
        block = blocks[i]
        if i in reuse:
            for p_src, p_dst in reuse_param_map(block, blocks[reuse[i]]).items():
                if p_src in attr_nodes and p_dst in attr_nodes:
                    redirect[attr_nodes[p_src]] = attr_nodes[p_dst]
        else:
            redirect[nodes[block.output]] = nodes[block.residual]
    for old in redirect:  # consecutive skips: block k+1's residual is block k's (skipped) add
        new = redirect[old]
        while new in redirect:
            new = redirect[new]
        redirect[old] = new
    return redirect


def rewrite(
    gm: fx.GraphModule, blocks: Sequence[SubBlock], skip: Sequence[int], reuse: Mapping[int, int]
) -> RewriteResult:
    """Apply `skip` / `reuse` to `gm` in place; `blocks` must come from partitioning this graph."""
    graph = gm.graph
    for old, new in plan_redirects(gm, blocks, skip, reuse).items():
        if old.op == "get_attr":  # re-point in place: get_attr nodes keep their position
            src, dst = fetch_attr(gm, old.target), fetch_attr(gm, new.target)
            if src.shape != dst.shape or src.dtype != dst.dtype:
                raise ValueError(
                    f"re-use needs equal shapes: {old.target} {tuple(src.shape)} vs {new.target} {tuple(dst.shape)}"
                )
            old.target = new.target
        else:
            old.replace_all_uses_with(new)

    live = live_nodes(graph)
    dead = [n for n in graph.nodes if n not in live and n.op != "placeholder"]
    for n in reversed(dead):
        graph.erase_node(n)

    referenced = {n.target for n in graph.nodes if n.op == "get_attr"}
    removed_attrs = []
    for name in [k for k, _ in gm.named_parameters(remove_duplicate=False)] + [
        k for k, _ in gm.named_buffers(remove_duplicate=False)
    ]:
        if name not in referenced:
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
            removed_attrs.append(name)
    for name in list(vars(gm)):  # plain tensor constants set as attributes
        if name.startswith("_tensor_constant") and name not in referenced:
            delattr(gm, name)
            removed_attrs.append(name)
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    return RewriteResult(graph_module=gm, removed_nodes=len(dead), removed_attrs=removed_attrs)
