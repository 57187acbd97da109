"""Weights larger than the device: parameters stay on the host and each stage's move to the device just
before it runs, the next stage's prefetched (on a side stream on CUDA), within a device budget.

The parameters no sub-block owns (embeddings, final norm, T5's position bias) stay on the device. On a
CPU-only machine the same code path runs with the "device" copies made in host memory, so tests can
check the budget and the identical result.

offload "cpu": the host copies are the model's own parameters. offload "disk": the model is built on the
meta device (buffers real) and the host copies are memory-mapped views of the checkpoint's safetensors
files (`SafetensorsSource`), read only when a stage moves to the device.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections import OrderedDict
from pathlib import Path

import torch

from skrr_compile.passes.graph_utils import fetch_attr


class OffloadBudgetError(ValueError):
    """The device budget cannot hold the shared weights plus one stage."""


_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsSource:
    """The tensors of a checkpoint's safetensors file(s), as views of a memory map (nothing read up front)."""

    def __init__(self, directory):
        d = Path(directory)
        index = d / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (d / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{str(d)!r} has no model.safetensors (or index): --offload disk reads the "
                                    "checkpoint's safetensors by memory map")
        self.entries: dict[str, tuple] = {}
        self._maps = []
        for name in files:
            with open(d / name, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps.append(m)
            for key, e in header.items():
                if key != "__metadata__":
                    self.entries[key] = (m, 8 + n + e["data_offsets"][0], e["data_offsets"][1] - e["data_offsets"][0],
                                         _ST_DTYPES[e["dtype"]], e["shape"])

    def key_for(self, name: str, aliases=()) -> str | None:
        for cand in (name, *aliases):
            for key in (cand, f"model.{cand}", f"encoder.{cand}"):
                if key in self.entries:
                    return key
            ends = [k for k in self.entries if k.endswith("." + cand)]
            if len(ends) == 1:
                return ends[0]
        return None

    def get(self, key: str) -> torch.Tensor:
        m, offset, size, dtype, shape = self.entries[key]
        flat = torch.frombuffer(m, dtype=torch.uint8, count=size, offset=offset) if size else torch.empty(0, dtype=torch.uint8)
        return flat.view(dtype).view(shape)


class WeightStore:
    def __init__(self, graph, device, budget_bytes: int | None = None, source: SafetensorsSource | None = None,
                 dtype: torch.dtype | None = None, tied: dict | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        gm = graph.graph_module
        targets = sorted({n.target for n in gm.graph.nodes if n.op == "get_attr"})
        owner = {p: k for k, b in enumerate(graph.blocks) for p in b.params}
        tied = dict(tied or {})  # HF's all_tied_weights_keys: tied name -> the name the checkpoint stores
        tied.update({v: k for k, v in list(tied.items())})
        aliases = _aliases(gm) if source is not None else {}
        for a, b in tied.items():
            aliases[a] = (*aliases.get(a, ()), b)
        self.host = {t: self._host(gm, t, source, aliases.get(t, ())) for t in targets}
        self.groups: dict = {k: [t for t in targets if owner.get(t) == k] for k in range(len(graph.blocks))}
        shared = [t for t in targets if t not in owner]
        size = lambda names: sum(self._nbytes(self.host[t]) for t in names)  # noqa: E731
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

    def _nbytes(self, t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        return t.numel() * torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def _host(gm, target: str, source: SafetensorsSource | None, aliases: tuple[str, ...]):
        t = fetch_attr(gm, target)
        if source is None or not (isinstance(t, torch.Tensor) and t.is_meta):
            return t
        key = source.key_for(target, aliases)
        if key is None:
            raise KeyError(f"the checkpoint has no tensor for {target!r} (shape {list(t.shape)}); "
                           "--offload disk needs every parameter in the checkpoint's safetensors")
        host = source.get(key)
        if list(host.shape) != list(t.shape):
            raise ValueError(f"checkpoint tensor {key!r} has shape {list(host.shape)}, the model expects "
                             f"{list(t.shape)} for {target!r}")
        return host

    def host_tensor(self, target: str) -> torch.Tensor:
        """The host value of a parameter in the search dtype (for binding a saved result)."""
        t = self.host[target]
        return t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def _copy(self, t):
        if not isinstance(t, torch.Tensor):
            return t
        dtype = self.dtype if (self.dtype is not None and t.is_floating_point()) else t.dtype
        if self.device.type == "cpu":  # a separate "device" allocation, so the budget is real here too
            return t.detach().to(dtype=dtype, copy=True)
        return t.detach().to(self.device, dtype=dtype, non_blocking=True)

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


def _aliases(gm) -> dict[str, tuple[str, ...]]:
    """Other names of each parameter that is shared under several names."""
    groups: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {n: tuple(x for x in names if x != n) for names in groups.values() for n in names}


def source_digest(directory) -> str:
    """Identifies a checkpoint's safetensors without reading the weights: names, sizes, headers, mtimes."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(Path(directory).glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}|".encode())
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(n))
    return h.hexdigest()
