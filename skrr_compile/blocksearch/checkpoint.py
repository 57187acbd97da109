"""Search state after every step, written atomically; the key that ties it to its inputs."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.utils.files import atomic_write_text, follow_umask
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
        if self.path is not None and getattr(self, "writable", True):  # distributed: rank 0 writes
            atomic_write_text(self.path, json.dumps({"key": self.key, **self.state}, indent=1))

    # tensors that belong to the state (LaCo's merged weights): a safetensors file next to it --------------
    def _tensor_path(self, name: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.{name}.safetensors")

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write `tensors` next to the state; the next `save` records their digest (call it right after)."""
        if self.path is None or not getattr(self, "writable", True):
            return
        path = self._tensor_path(name)
        digest = write_tensors_atomically(path, tensors)
        self.state.setdefault("tensors", {})[name] = {"file": path.name, "sha256": digest}

    def load_tensors(self, name: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        entry = self.state.get("tensors", {}).get(name)
        if entry is None or self.path is None:
            return {}
        return read_tensors_checked(self.path.parent / entry["file"], entry["sha256"], device, what=str(self.path))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_tensors_atomically(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """A safetensors file written to a temporary sibling and moved into place; returns its sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # as atomic_write_text (the API's out_dir may not exist yet)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        digest = _sha256_file(Path(tmp))
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def read_tensors_checked(path: Path, sha256: str, device="cpu", what: str = "") -> dict[str, torch.Tensor]:
    """Tensors from a file whose sha256 must match the one recorded when it was written."""
    path = Path(path)
    if not path.is_file():
        raise SearchError(f"{path} is missing ({what} needs it); keep it next to {Path(what).name or 'its owner'}")
    if _sha256_file(path) != sha256:
        raise SearchError(f"{path} is not the file {what} was written with (its sha256 differs)")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise SearchError(f"{path} cannot be read as safetensors ({e})") from e


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
