"""Run a traced encoder stage by stage under any skip / re-use configuration, without rewriting it.

The search evaluates thousands of configurations; each one is the dense graph read through a different
set of substitutions, so no graph is copied or recompiled. A stage is executed node by node (the ops are
the ones the rewritten GraphModule would call, in the same order, so results are identical to it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch import fx

from skrr_compile.core.trace import EncoderGraph
from skrr_compile.passes.graph_utils import fetch_attr, strip_noops
from skrr_compile.passes.rewrite import reuse_param_map
from skrr_compile.passes.stages import needed_nodes, split_stages


@dataclass(frozen=True)
class Config:
    """A skip set and a re-use map: what the search scores (a Plan without metadata)."""

    skip: frozenset = frozenset()
    reuse: tuple = ()  # sorted (i, j) pairs

    @property
    def reuse_map(self) -> dict[int, int]:
        return dict(self.reuse)

    def mode(self, k: int):
        """'keep', 'skip' or the index of the sub-block whose weights stage k re-uses."""
        if k not in self.skip:
            return "keep"
        return self.reuse_map.get(k, "skip")

    def with_skip(self, j: int) -> Config:
        return Config(self.skip | {j}, self.reuse)

    def with_reuse(self, i: int, j: int) -> Config:
        return Config(self.skip, tuple(sorted({**self.reuse_map, i: j}.items())))


@dataclass
class Counter:
    """Sub-block evaluations (one stage on one prompt chunk whose branch actually runs)."""

    block_evals: int = 0
    candidates: int = 0
    abandoned: int = 0
    chunk_evals: int = 0
    recompute_evals: int = 0

    def to_dict(self) -> dict:
        return {
            "block_evals": self.block_evals,
            "candidates": self.candidates,
            "abandoned": self.abandoned,
            "chunk_evals": self.chunk_evals,
            "recompute_evals": self.recompute_evals,
        }


class StagedRunner:
    def __init__(self, graph: EncoderGraph):
        self.graph = graph
        gm = graph.graph_module
        self.gm = gm
        self.split = split_stages(gm, graph.blocks, graph.stream_in)
        self.num_blocks = len(graph.blocks)
        self.boundary_of = {s: k for k, s in enumerate(self.split.boundaries)}
        self.attrs = {n: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        self.attr_by_target = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
        by_name = {n.name: n for n in gm.graph.nodes}
        self.adds = [by_name[b.output] for b in graph.blocks]
        self.residuals = [by_name[b.residual] for b in graph.blocks]
        self._reuse_cache: dict[tuple[int, int], dict[fx.Node, torch.Tensor]] = {}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        prefix_set = set(self.split.prefix)
        later = [n for st in self.split.stages for n in st] + self.split.suffix + [self.split.output]
        later += [n for st in self.split.skip_stages for n in st]
        self.ctx_nodes = {a for n in later for a in n.all_input_nodes if a in prefix_set}
        self.leaves = pytree.tree_leaves(self.split.output.args[0])
        self.needed_leaves = list(range(len(self.leaves)))
        self._update_suffix_needs()
        self.counter = Counter()

    # what the output needs ----------------------------------------------------------------------------
    def restrict_outputs(self, select) -> None:
        """Keep only the output leaves `select` returns (probed with sentinel tensors)."""
        sentinels = [torch.empty(0) for _ in self.leaves]
        obj = pytree.tree_unflatten(sentinels, self.gm._out_spec)
        try:
            picked = select(obj)
        except Exception:
            return  # select does more than pick leaves: keep all of them
        picked = picked if isinstance(picked, (tuple, list)) else (picked,)
        ids = {id(s): i for i, s in enumerate(sentinels)}
        if all(id(p) in ids for p in picked):
            self.needed_leaves = sorted(ids[id(p)] for p in picked)
            self._update_suffix_needs()

    def _update_suffix_needs(self) -> None:
        targets = [self.leaves[i] for i in self.needed_leaves if isinstance(self.leaves[i], fx.Node)]
        needed = needed_nodes(targets, set(self.split.suffix))
        self.suffix_nodes = [n for n in self.split.suffix if n in needed]
        reads = {a for n in self.suffix_nodes for a in n.all_input_nodes} | set(targets)
        self.suffix_boundaries = sorted(
            {self.boundary_of[strip_noops(a)] for a in reads if strip_noops(a) in self.boundary_of}
        )

    @contextlib.contextmanager
    def overridden(self, tensors: Mapping[str, torch.Tensor]):
        """Temporarily read other values for some parameters (LaCo's merged layers)."""
        saved = dict(self.attrs)
        for target, t in tensors.items():
            self.attrs[self.attr_by_target[target]] = t
        self._reuse_cache.clear()
        try:
            yield
        finally:
            self.attrs = saved
            self._reuse_cache.clear()

    # execution ----------------------------------------------------------------------------------------
    def _run(self, nodes, env: dict, lookup) -> None:
        for n in nodes:
            if n.op in ("placeholder", "output") or n.op == "call_module":
                continue
            if n.op == "get_attr":
                env[n] = lookup(n)
                continue
            args = fx.node.map_arg(n.args, lookup)
            kwargs = fx.node.map_arg(n.kwargs, lookup)
            env[n] = n.target(*args, **kwargs)

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        env = dict(zip(self.placeholders, (input_ids, attention_mask)))

        def lookup(a):
            return self.attrs[a] if a.op == "get_attr" else env[a]

        self._run(self.split.prefix, env, lookup)
        ctx = {n: env[n] for n in self.ctx_nodes if n in env}
        ctx["s0"] = env[self.split.boundaries[0]]
        return ctx

    def _reuse_attrs(self, i: int, j: int) -> dict:
        key = (i, j)
        if key not in self._reuse_cache:
            mapping = reuse_param_map(self.graph.blocks[i], self.graph.blocks[j])
            self._reuse_cache[key] = {
                self.attr_by_target[a]: self.attrs[self.attr_by_target[b]]
                for a, b in mapping.items() if a in self.attr_by_target
            }
        return self._reuse_cache[key]

    @torch.no_grad()
    def stage(self, k: int, h: torch.Tensor, ctx: Mapping, mode="keep") -> torch.Tensor:
        """s_{k+1} from s_k = h: mode 'keep', 'skip', or j (re-use sub-block j's weights)."""
        s_k, s_next = self.split.boundaries[k], self.split.boundaries[k + 1]
        skip = mode == "skip"
        swap = {} if mode in ("keep", "skip") else self._reuse_attrs(k, mode)
        env: dict = {s_k: h}
        add, residual = self.adds[k], self.residuals[k]

        def lookup(a):
            if skip and a is add:
                return lookup(residual)
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return swap.get(a, self.attrs[a])
            if a in ctx:
                return ctx[a]
            base = strip_noops(a)
            if base is s_k:
                return h
            raise RuntimeError(f"stage {k} reads {a.name}, which is neither in the stage nor a boundary")

        self._run(self.split.skip_stages[k] if skip else self.split.stages[k], env, lookup)
        if not skip:
            self.counter.block_evals += 1
        return lookup(s_next)

    @torch.no_grad()
    def suffix(self, boundaries: Mapping[int, torch.Tensor], ctx: Mapping):
        """The HF output object from the boundary values the needed outputs read."""
        env: dict = {}

        def lookup(a):
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return self.attrs[a]
            if a in ctx:
                return ctx[a]
            base = strip_noops(a)
            if base in self.boundary_of:
                return boundaries[self.boundary_of[base]]
            raise RuntimeError(f"the suffix reads {a.name}, which is neither computed there nor a boundary")

        self._run(self.suffix_nodes, env, lookup)
        values = [None] * len(self.leaves)
        for i in self.needed_leaves:
            leaf = self.leaves[i]
            values[i] = lookup(leaf) if isinstance(leaf, fx.Node) else leaf
        return pytree.tree_unflatten(values, self.gm._out_spec)

    @torch.no_grad()
    def forward(self, config: Config, input_ids, attention_mask, ctx=None):
        """Full forward under `config` (used for references and reports)."""
        ctx = ctx if ctx is not None else self.prefix(input_ids, attention_mask)
        h = ctx["s0"]
        keep = {0: h} if 0 in self.suffix_boundaries else {}
        for k in range(self.num_blocks):
            h = self.stage(k, h, ctx, config.mode(k))
            if k + 1 in self.suffix_boundaries:
                keep[k + 1] = h
        return self.suffix(keep, ctx)
