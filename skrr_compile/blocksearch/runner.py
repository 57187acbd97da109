"""Run a traced encoder stage by stage under any skip / re-use configuration, without rewriting it.

The search evaluates thousands of configurations; each one is the dense graph read through a different
set of substitutions, so no graph is copied or recompiled. A stage is executed node by node (the ops are
the ones the rewritten GraphModule would call, in the same order, so results are identical to it).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
    """Where a search's time goes. block_evals: one stage whose branch runs, on one prompt chunk;
    prompt_block_evals: the same per prompt (a chunk of n prompts counts n), the unit that does not depend
    on the chunk size; token_block_evals: the same per token (a chunk counts its padded tokens: the work
    a stage does, where the null prompt's few tokens weigh little); recompute_evals: stages run before a
    candidate's first change (rebuilding a state the budget did not keep); memo_starts / memo_stages_saved:
    chunk evaluations that started past their first change, from a state another configuration computed,
    and the stages that saved; stacked_stage_runs / stacked_lanes: stage runs that carried several states
    stacked on the batch dimension (candidate batching) and the states they carried."""

    block_evals: int = 0
    prompt_block_evals: int = 0
    token_block_evals: int = 0
    candidates: int = 0
    abandoned: int = 0
    chunk_evals: int = 0
    recompute_evals: int = 0
    prefix_evals: int = 0
    memo_starts: int = 0
    memo_stages_saved: int = 0
    stacked_stage_runs: int = 0
    stacked_lanes: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class _Segment:
    """Nodes run in order, with the values each node is the last reader of (freed right after it)."""

    def __init__(self, nodes: list[fx.Node], keep: set[fx.Node], redirect: Mapping | None = None):
        self.nodes = [n for n in nodes if n.op not in ("placeholder", "output", "call_module")]
        redirect = redirect or {}
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[redirect.get(a, a)] = i
        frees: list[list[fx.Node]] = [[] for _ in self.nodes]
        for a, i in last.items():
            if a not in keep:
                frees[i].append(a)
        self.frees = frees


class StagedRunner:
    """Executes prefix, stages and suffix of the traced graph node by node.

    Memory: a stage holds only the values still to be read (each is freed after its last reader); the
    prefix values that only one stage reads (T5's per-layer copies of the position bias + mask) are
    computed inside that stage, so a chunk's context holds each shared value once.
    """

    def __init__(self, graph: EncoderGraph, weights=None):
        self.graph = graph
        gm = graph.graph_module
        self.gm = gm
        self.split = split_stages(gm, graph.blocks, graph.stream_in)
        self.num_blocks = len(graph.blocks)
        self.boundary_of = {s: k for k, s in enumerate(self.split.boundaries)}
        self.attrs = {n: fetch_attr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"}
        self.attr_by_target = {n.target: n for n in gm.graph.nodes if n.op == "get_attr"}
        self.weights = weights  # an offloading WeightStore, or None (parameters stay where they are)
        self._overridden: set[fx.Node] = set()
        by_name = {n.name: n for n in gm.graph.nodes}
        self.adds = [by_name[b.output] for b in graph.blocks]
        self.residuals = [by_name[b.residual] for b in graph.blocks]
        self._reuse_cache: dict[tuple[int, int], dict[fx.Node, torch.Tensor]] = {}
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._split_prefix()
        self.leaves = pytree.tree_leaves(self.split.output.args[0])
        self.needed_leaves = list(range(len(self.leaves)))
        self._update_suffix_needs()
        self.counter = Counter()
        self.live: int | None = None  # set to 0 to measure the peak bytes alive in the segments run

    def _split_prefix(self) -> None:
        """Shared prefix values (read by several stages or the suffix) vs values private to one stage."""
        sp = self.split
        group: dict[fx.Node, object] = {}
        for k in range(self.num_blocks):
            for n in sp.stages[k] + sp.skip_stages[k]:
                group[n] = k
        for n in sp.suffix + [sp.output]:
            group[n] = "suffix"
        prefix_set = set(sp.prefix)
        readers: dict[fx.Node, set] = {}
        for n in reversed(sp.prefix):
            g: set = set()
            for u in n.users:
                if u in prefix_set:
                    g |= readers.get(u, set())
                elif u in group:
                    g.add(group[u])
            readers[n] = g
        s0 = sp.boundaries[0]
        private: set[fx.Node] = set()  # read (through prefix nodes private too) by exactly one stage
        for n in reversed(sp.prefix):
            g = readers[n]
            if (len(g) == 1 and isinstance(next(iter(g)), int) and n.op not in ("placeholder", "get_attr")
                    and n is not s0 and all(u in private or u not in prefix_set for u in n.users
                                            if readers.get(u, {None}) or u not in prefix_set)):
                private.add(n)
        shared = [n for n in sp.prefix if n not in private]
        order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        self.private_full, self.private_skip = [], []
        for k in range(self.num_blocks):
            mine = {n for n in private if readers[n] == {k}}
            for stage_nodes, out in ((sp.stages[k], self.private_full), (sp.skip_stages[k], self.private_skip)):
                roots = [a for n in stage_nodes for a in n.all_input_nodes if a in mine]
                out.append(sorted(needed_nodes(roots, mine), key=order.__getitem__))
        later = [n for st in sp.stages + sp.skip_stages + self.private_full + self.private_skip for n in st]
        later += sp.suffix + [sp.output]
        shared_set = set(shared)
        self.ctx_nodes = {a for n in later for a in n.all_input_nodes if a in shared_set} | {s0}
        needed = needed_nodes(list(self.ctx_nodes), shared_set)  # nodes no stage reads are not run
        self._prefix_segment = _Segment([n for n in shared if n in needed], self.ctx_nodes)
        self._stage_segments: dict[tuple[int, bool], _Segment] = {}

    def _stage_segment(self, k: int, skip: bool) -> _Segment:
        key = (k, skip)
        if key not in self._stage_segments:
            sp = self.split
            nodes = (self.private_skip[k] + sp.skip_stages[k]) if skip else (self.private_full[k] + sp.stages[k])
            redirect = {self.adds[k]: self.residuals[k]} if skip else {}
            target = sp.boundaries[k + 1]
            keep = {target, redirect.get(target, target)}
            self._stage_segments[key] = _Segment(nodes, keep, redirect)
        return self._stage_segments[key]

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
        self._suffix_segment = _Segment(self.suffix_nodes, set(targets))
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
        self._overridden = {self.attr_by_target[t] for t in tensors}
        self._reuse_cache.clear()
        try:
            yield
        finally:
            self.attrs = saved
            self._overridden = set()
            self._reuse_cache.clear()

    # execution ----------------------------------------------------------------------------------------
    def _attr(self, node: fx.Node) -> torch.Tensor:
        t = self.attrs[node]
        if self.weights is None or node in self._overridden:
            return t
        return self.weights.get(node.target, t)

    def _run(self, segment: _Segment, env: dict, lookup, capture: dict | None = None) -> None:
        for n, frees in zip(segment.nodes, segment.frees):
            if n.op == "get_attr":
                env[n] = lookup(n)
            else:
                args = fx.node.map_arg(n.args, lookup)
                kwargs = fx.node.map_arg(n.kwargs, lookup)
                env[n] = n.target(*args, **kwargs)
                del args, kwargs
                if capture is not None and n.name in capture:  # healing reads a value inside the stage
                    capture[n.name] = env[n]
            if self.live is not None:  # measuring: the bytes of the values alive (candidate batching's sizing)
                self.live = max(self.live, sum(v.numel() * v.element_size() for a, v in env.items()
                                               if isinstance(v, torch.Tensor) and a.op != "get_attr"))
            for a in frees:
                env.pop(a, None)

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        """The shared context of one prompt chunk (recomputed on demand: it is cheap and not kept)."""
        env = dict(zip(self.placeholders, (input_ids, attention_mask)))
        if self.weights is not None:
            self.weights.enter("prefix")

        def lookup(a):
            return self._attr(a) if a.op == "get_attr" else env[a]

        self._run(self._prefix_segment, env, lookup)
        ctx = {n: env[n] for n in self.ctx_nodes if n in env}
        ctx["s0"] = env[self.split.boundaries[0]]
        return ctx

    def _reuse_attrs(self, i: int, j: int) -> dict:
        key = (i, j)
        if key not in self._reuse_cache:
            mapping = reuse_param_map(self.graph.blocks[i], self.graph.blocks[j])
            self._reuse_cache[key] = {
                self.attr_by_target[a]: self.attr_by_target[b]
                for a, b in mapping.items() if a in self.attr_by_target
            }
        return self._reuse_cache[key]

    @torch.no_grad()
    def stage(self, k: int, h: torch.Tensor, ctx: Mapping, mode="keep", capture: dict | None = None) -> torch.Tensor:
        """s_{k+1} from s_k = h: mode 'keep', 'skip', or j (re-use sub-block j's weights). `capture`: node
        names -> None, filled with the values those nodes of the stage compute (healing's f)."""
        s_k, s_next = self.split.boundaries[k], self.split.boundaries[k + 1]
        skip = mode == "skip"
        swap = {} if mode in ("keep", "skip") else self._reuse_attrs(k, mode)
        if self.weights is not None and not skip:
            self.weights.enter(k if mode == "keep" else mode)
        env: dict = {s_k: h}
        add, residual = self.adds[k], self.residuals[k]

        def lookup(a):
            if skip and a is add:
                a = residual
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return self._attr(swap.get(a, a))
            if a in ctx:
                return ctx[a]
            if strip_noops(a) is s_k:
                return h
            raise RuntimeError(f"stage {k} reads {a.name}, which is neither in the stage nor a boundary")

        self._run(self._stage_segment(k, skip), env, lookup, capture)
        if not skip:
            self.counter.block_evals += 1
        out = lookup(s_next)
        env.clear()
        return out

    @torch.no_grad()
    def suffix(self, boundaries: Mapping[int, torch.Tensor], ctx: Mapping):
        """The HF output object from the boundary values the needed outputs read."""
        env: dict = {}
        if self.weights is not None:
            self.weights.enter("suffix")

        def lookup(a):
            if a in env:
                return env[a]
            if a.op == "get_attr":
                return self._attr(a)
            if a in ctx:
                return ctx[a]
            base = strip_noops(a)
            if base in self.boundary_of:
                return boundaries[self.boundary_of[base]]
            raise RuntimeError(f"the suffix reads {a.name}, which is neither computed there nor a boundary")

        self._run(self._suffix_segment, env, lookup)
        values = [None] * len(self.leaves)
        for i in self.needed_leaves:
            leaf = self.leaves[i]
            values[i] = lookup(leaf) if isinstance(leaf, fx.Node) else leaf
        env.clear()
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
