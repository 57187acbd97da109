"""Search state after every step, written atomically; the key that ties it to its inputs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from skrr_compile.blocksearch.calibration import Calibration
from skrr_compile.blocksearch.errors import SearchError
from skrr_compile.core.trace import EncoderGraph
from skrr_compile.utils.files import atomic_write_text

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
            state = json.loads(path.read_text())
            if state.get("key") != key:
                raise SearchError(
                    f"{path} was written for other inputs (model, prompts, sparsity, method or beam differ); "
                    "use a new --out"
                )
            self.state = state

    def save(self, **state) -> None:
        self.state.update(state)
        if self.path is not None:
            atomic_write_text(self.path, json.dumps({"key": self.key, **self.state}, indent=1))


def input_key(graph: EncoderGraph, calibration: Calibration, **kw) -> str:
    h = hashlib.sha256()
    h.update(graph.fingerprint.encode())
    for ids, mask in [calibration.null, *calibration.chunks]:
        h.update(ids.cpu().numpy().tobytes())
        h.update(mask.cpu().numpy().tobytes())
    h.update(json.dumps(kw, sort_keys=True, default=str).encode())
    return h.hexdigest()
