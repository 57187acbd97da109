"""Weights larger than the device: parameters stay on the host and each stage's move to the device just
before it runs, the next stage's prefetched (on a side stream on CUDA), within a device budget.

The parameters no sub-block owns (embeddings, final norm, T5's position bias) stay on the device. On a
CPU-only machine the same code path runs with the "device" copies made in host memory, so tests can
check the budget and the identical result.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from skrr_compile.passes.graph_utils import fetch_attr


class OffloadBudgetError(ValueError):
    """The device budget cannot hold the shared weights plus one stage."""


class WeightStore:
    def __init__(self, graph, device, budget_bytes: int | None = None):
        self.device = torch.device(device)
        gm = graph.graph_module
        targets = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"})
        owner = {p: k for k, b in enumerate(graph.blocks) for p in b.params}
        self.host = {t: fetch_attr(gm, t) for t in targets}
        self.groups: dict = {k: [t for t in targets if owner.get(t) == k] for k in range(len(graph.blocks))}
        shared = [t for t in targets if t not in owner]
        size = lambda names: sum(self.host[t].numel() * self.host[t].element_size()  # noqa: E731
                                 for t in names if isinstance(self.host[t], torch.Tensor))
        self.group_bytes = {k: size(v) for k, v in self.groups.items()}
        self.shared_bytes = size(shared)
        largest = max(self.group_bytes.values(), default=0)
        self.budget = budget_bytes
        if budget_bytes is not None and budget_bytes < self.shared_bytes + largest:
            raise OffloadBudgetError(
                f"the device budget ({budget_bytes / 2**30:.2f} GiB) cannot hold the weights no sub-block owns "
                f"({self.shared_bytes / 2**30:.2f} GiB) plus the largest stage ({largest / 2**30:.2f} GiB); "
                f"give at least {(self.shared_bytes + largest) / 2**30:.2f} GiB"
            )
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.resident: OrderedDict = OrderedDict()  # group -> {target: device tensor}, least recent first
        self.pending: dict = {}
        self.shared = {t: self._copy(self.host[t]) for t in shared}
        self.used = self.peak = self.shared_bytes
        self.loads = 0

    def _copy(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        if self.device.type == "cpu":
            return t.detach().clone()  # a separate "device" allocation, so the budget is real here too
        return t.detach().to(self.device, non_blocking=True)

    def _load(self, k) -> dict:
        need = self.group_bytes[k]
        while self.budget is not None and self.resident and self.used + need > self.budget:
            old, _ = self.resident.popitem(last=False)
            self.used -= self.group_bytes[old]
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                tensors = {t: self._copy(self.host[t]) for t in self.groups[k]}
        else:
            tensors = {t: self._copy(self.host[t]) for t in self.groups[k]}
        self.loads += 1
        self.used += need
        self.peak = max(self.peak, self.used)
        return tensors

    def enter(self, key) -> None:
        """Make stage `key`'s weights resident (an int: sub-block key; 'prefix'/'suffix' need only the shared)."""
        if not isinstance(key, int):
            return
        if key in self.resident:
            self.resident.move_to_end(key)
        else:
            self.resident[key] = self._load(key)
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        nxt = key + 1
        if nxt in self.groups and nxt not in self.resident and (
                self.budget is None or self.used + self.group_bytes[nxt] <= self.budget):
            self.resident[nxt] = self._load(nxt)  # prefetch: copied on the side stream while stage key runs
            self.resident.move_to_end(key)

    def get(self, target: str, default):
        if target in self.shared:
            return self.shared[target]
        for tensors in self.resident.values():
            if target in tensors:
                return tensors[target]
        return self._fault(target)

    def _fault(self, target: str):
        k = next(k for k, names in self.groups.items() if target in names)
        self.enter(k)
        return self.resident[k][target]

    def to_dict(self) -> dict:
        return {"budget_bytes": self.budget, "shared_bytes": self.shared_bytes, "peak_bytes": self.peak,
                "stage_loads": self.loads}
