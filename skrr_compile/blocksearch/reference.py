"""The projected dense reference of a search, one entry per prompt chunk: kept on the device, in host
memory, or written to a safetensors file and read back through a memory map (`--reference`)."""

from __future__ import annotations

import json
import mmap
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

PLACEMENTS = ("device", "cpu", "disk")
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}


class ReferenceStore(Sequence):
    """`store[i]` is chunk i's tuple of projected reference tensors, on `device`."""

    def __init__(self, placement: str = "device", path: str | Path | None = None):
        if placement not in PLACEMENTS:
            raise ValueError(f"reference placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
        self.placement = placement
        self.device: torch.device | None = None
        self._items: list[tuple[torch.Tensor, ...]] = []
        self._path = Path(path) if path is not None else None
        self._raw = None  # disk: the data section, written as chunks arrive
        self._entries: list[list[dict]] = []
        self._offset = 0
        self._mmap = None
        self.nbytes = 0

    def append(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.device = self.device or tensors[0].device
        self.nbytes += sum(t.numel() * t.element_size() for t in tensors)
        if self.placement == "device":
            self._items.append(tuple(tensors))
        elif self.placement == "cpu":
            self._items.append(tuple(t.to("cpu") for t in tensors))
        else:
            if self._raw is None:
                if self._path is None:
                    self._tmpdir = tempfile.TemporaryDirectory(prefix="skrr-reference-")
                    self._path = Path(self._tmpdir.name) / "reference.safetensors"
                self._path.parent.mkdir(parents=True, exist_ok=True)
                self._raw = open(self._path.with_suffix(".raw"), "w+b")  # noqa: SIM115
            entries = []
            for t in tensors:
                if t.dtype not in _ST_DTYPES:
                    raise ValueError(f"the disk reference stores float tensors, got {t.dtype}")
                data = t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()
                self._raw.write(data)
                entries.append({"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                                "data_offsets": [self._offset, self._offset + len(data)]})
                self._offset += len(data)
            self._entries.append(entries)

    def finish(self) -> None:
        """Disk: write the safetensors file (header + the data written so far) and map it."""
        if self.placement != "disk" or self._raw is None or self._mmap is not None:
            return
        header = {f"{c}.{i}": e for c, entries in enumerate(self._entries) for i, e in enumerate(entries)}
        header["__metadata__"] = {"producer": "skrr-compile", "what": "projected dense reference"}
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        tmp = self._path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            self._raw.seek(0)
            while block := self._raw.read(64 << 20):
                f.write(block)
        os.replace(tmp, self._path)
        self._raw.close()
        os.unlink(self._path.with_suffix(".raw"))
        self._data_start = 8 + len(text)
        self._file = open(self._path, "rb")  # noqa: SIM115
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)  # writable view, file untouched

    def __len__(self) -> int:
        return len(self._items) if self.placement != "disk" else len(self._entries)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.placement == "device":
            return self._items[i]
        if self.placement == "cpu":
            return tuple(t.to(self.device, non_blocking=True) for t in self._items[i])
        self.finish()
        out = []
        for e in self._entries[i]:
            start, end = e["data_offsets"]
            dtype = _TORCH_DTYPES[e["dtype"]]
            flat = torch.frombuffer(self._mmap, dtype=torch.uint8, count=end - start,
                                    offset=self._data_start + start)
            out.append(flat.view(dtype).view(e["shape"]).to(self.device))
        return tuple(out)

    @property
    def path(self) -> Path | None:
        return self._path if self.placement == "disk" else None

    def device_bytes(self) -> int:
        return self.nbytes if self.placement == "device" else 0

    def close(self) -> None:
        if self._mmap is not None:
            self._mmap.close()
            self._file.close()
            self._mmap = None
        if self.placement == "disk" and self._path is not None:  # a scratch file: the search is over
            self._path.unlink(missing_ok=True)
        if getattr(self, "_tmpdir", None) is not None:
            self._tmpdir.cleanup()
