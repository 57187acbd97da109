"""Search state after every step, written atomically; the key that ties it to its inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.utils.files import atomic_write_text
from skrr_compile.utils.tensors import named_tensors

STATE_FILE = "search_state.json"


class Checkpoint:
    """Search state after every step, written atomically; resumable after a crash or Ctrl-C."""

    def __init__(self, path: Path | None, key: str, resume: bool):
        self.path, self.key = path, key
        self.state: dict = {}
        if path is None:
            return
        if path.exists():
            if not resume:
                raise SearchError(f"{path} exists: pass --resume (resume=True) to continue it, or use a new --out")
            try:
                state = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise SearchError(f"{path} is not a readable search state ({e}); delete it or use a new --out") from e
            if not isinstance(state, dict) or state.get("key") != key:
                raise SearchError(
                    f"{path} was written for other inputs (model weights, prompts, sparsity, method or beam differ); "
                    "use a new --out"
                )
            self.state = state

    def save(self, **state) -> None:
        self.state.update(state)
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"key": self.key, **self.state}, indent=1))


def weights_digest(graph: EncoderGraph) -> str:
    """sha256 over the bytes of every tensor the graph reads (names, dtypes, shapes and values).

    Two checkpoints of one architecture share the fingerprint; only this tells their states apart. Each unique
    storage is hashed once, one tensor at a time on the CPU (about 1 s per GB). The digest is cached on the graph
    and recomputed when a tensor is replaced or modified in place (its version counter moves).
    """
    tensors = named_tensors(graph.graph_module)
    stamp = tuple((n, t.data_ptr(), t._version, t.device.type) for n, t in sorted(tensors.items()))
    cached = getattr(graph, "_skrr_weights_digest", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    h = hashlib.sha256()
    seen: dict[tuple, str] = {}
    for name, t in sorted(tensors.items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.device.type == "meta":  # offloaded / not materialised: only its description is known
            h.update(b"meta;")
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:  # tied / re-used weights: hash the reference, not the bytes again
            h.update(f"={seen[ident]};".encode())
            continue
        seen[ident] = name
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).cpu().numpy().tobytes() if flat.dtype != torch.bool
                     else flat.cpu().numpy().tobytes())
        h.update(b";")
    digest = h.hexdigest()
    try:
        graph._skrr_weights_digest = (stamp, digest)
    except AttributeError:  # a graph class with __slots__
        pass
    return digest


def input_key(graph: EncoderGraph, calibration: Calibration, **kw) -> str:
    h = hashlib.sha256()
    h.update(graph.fingerprint.encode())
    h.update(weights_digest(graph).encode())
    for ids, mask in [calibration.null, *calibration.chunks]:
        h.update(ids.cpu().numpy().tobytes())
        h.update(mask.cpu().numpy().tobytes())
    h.update(json.dumps(kw, sort_keys=True, default=str).encode())
    return h.hexdigest()
