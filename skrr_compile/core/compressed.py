"""Compressed sparse safetensors: pruned weights stored as values + bitmask, or CSR where that is smaller.

A dense tensor full of zeros saves nothing on disk. This format stores each tensor in the smallest of three
encodings, chosen per tensor:

- ``dense``: the tensor as is (`n * b` bytes, `b` the element size);
- ``bitmask``: one bit per element saying which are non-zero (little-endian within each byte, like
  ``numpy.packbits(bitorder="little")``) and the non-zero values in row-major order
  (`ceil(n / 8) + nnz * b` bytes);
- ``csr``: the tensor seen as a matrix ``[shape[0], numel / shape[0]]`` in compressed sparse rows: row pointers
  (int32), column indices (int16 when the row length fits, else int32) and values
  (`(rows + 1) * 4 + nnz * (idx + b)` bytes); it wins only above about 94 % sparsity.

"Non-zero" means a non-zero bit pattern, so ``-0.0`` and NaN are stored as values and the round trip is
bit-exact. The file is an ordinary safetensors file: the parts of tensor ``name`` are stored as
``name::mask``/``name::values`` or ``name::crow``/``name::col``/``name::values``, and the header metadata key
``skrr_compressed`` holds a JSON map ``name -> {"enc", "shape", "dtype", "nnz"}``; tensors that share storage
are stored once (``aliases``). A file without that key is read as a plain safetensors file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from skrr_compile.utils.files import follow_umask

META_KEY = "skrr_compressed"
COMPRESSED_VERSION = 1
ENCODINGS = ("dense", "bitmask", "csr")
SEP = "::"
PARTS = {"dense": 1, "bitmask": 2, "csr": 3}  # stored tensors per encoding
PART_OVERHEAD = 160  # header bytes per stored part (name, dtype, shape, offsets, our metadata entry)

_BIT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class CompressedFormatError(ValueError):
    """A compressed safetensors file whose header or parts do not fit together."""


# encoding ---------------------------------------------------------------------------------------------
def nonzero_mask(t: torch.Tensor) -> torch.Tensor:
    """True where the element's bit pattern is non-zero (so -0.0 and NaN count as values)."""
    if t.dtype == torch.bool:
        return t.clone()
    if t.is_complex():
        r = torch.view_as_real(t).contiguous()
        return (r.view(_BIT_VIEW[r.element_size()]) != 0).any(dim=-1)
    if t.is_floating_point():
        return t.contiguous().view(_BIT_VIEW[t.element_size()]) != 0
    return t != 0


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat bool mask -> uint8, bit i of byte j = element 8 j + i (little-endian bit order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].bool()


def _csr_index_dtypes(cols: int, nnz: int) -> tuple[torch.dtype, torch.dtype]:
    col = torch.int16 if cols <= 2**15 else (torch.int32 if cols <= 2**31 else torch.int64)
    crow = torch.int32 if nnz < 2**31 else torch.int64
    return crow, col


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0]
    return rows, (math.prod(shape) // rows if rows else 0)


def encoded_sizes(shape: tuple[int, ...], dtype: torch.dtype, nnz: int) -> dict[str, int]:
    """Payload bytes of each encoding for a tensor of `shape`/`dtype` with `nnz` non-zero elements."""
    n = math.prod(shape)
    b = torch.empty((), dtype=dtype).element_size()
    sizes = {"dense": n * b}
    if n and len(shape) >= 1:
        sizes["bitmask"] = (n + 7) // 8 + nnz * b
    if n and len(shape) >= 2:
        rows, cols = _matrix_shape(shape)
        crow, col = _csr_index_dtypes(cols, nnz)
        sizes["csr"] = (rows + 1) * crow.itemsize + nnz * (col.itemsize + b)
    return sizes


def choose_encoding(t: torch.Tensor, nnz: int | None = None) -> str:
    """The smallest encoding for `t` (dense on ties), counting about PART_OVERHEAD header bytes per stored part."""
    if nnz is None:
        nnz = int(torch.count_nonzero(nonzero_mask(t)))
    sizes = encoded_sizes(tuple(t.shape), t.dtype, nnz)
    cost = {k: v + PART_OVERHEAD * PARTS[k] for k, v in sizes.items()}
    return min(cost, key=lambda k: (cost[k], ENCODINGS.index(k)))


def encode(name: str, t: torch.Tensor, encoding: str = "auto") -> tuple[dict[str, torch.Tensor], dict]:
    """The stored parts of one tensor and its header entry."""
    if SEP in name:
        raise CompressedFormatError(f"tensor name {name!r} contains the reserved separator {SEP!r}")
    t = t.detach().contiguous().cpu()
    mask = nonzero_mask(t)
    nnz = int(torch.count_nonzero(mask))
    if encoding == "auto":
        encoding = choose_encoding(t, nnz)
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS} or 'auto'")
    if encoding == "csr" and t.dim() < 2:  # a forced encoding applies where the tensor can take it
        encoding = "bitmask"
    if encoding == "bitmask" and t.dim() < 1:
        encoding = "dense"
    entry = {"enc": encoding, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "nnz": nnz}
    if encoding == "dense" or t.numel() == 0:
        entry["enc"] = "dense"
        return {name: t}, entry
    flat_mask = mask.reshape(-1)
    values = t.reshape(-1)[flat_mask].contiguous()
    if encoding == "bitmask":
        return {f"{name}{SEP}mask": pack_bits(flat_mask), f"{name}{SEP}values": values}, entry
    rows, cols = _matrix_shape(tuple(t.shape))
    crow_dtype, col_dtype = _csr_index_dtypes(cols, nnz)
    m2 = flat_mask.view(rows, cols)
    crow = torch.zeros(rows + 1, dtype=torch.int64)
    crow[1:] = m2.sum(dim=1).cumsum(0)
    col = m2.nonzero()[:, 1]
    return {
        f"{name}{SEP}crow": crow.to(crow_dtype),
        f"{name}{SEP}col": col.to(col_dtype),
        f"{name}{SEP}values": values,
    }, entry


# decoding ---------------------------------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CompressedFormatError(f"unknown dtype {name!r} in the header")
    return dt


def decode(name: str, entry: Mapping, get: Callable[[str], torch.Tensor], layout: str = "dense") -> torch.Tensor:
    """Rebuild tensor `name` from its parts (`get(part_name)`); layout "sparse_csr" keeps 2-D tensors sparse."""
    enc, shape, dtype = entry["enc"], tuple(entry["shape"]), _dtype(entry["dtype"])
    if enc == "dense":
        return get(name)  # stored dense because it is not sparse enough to gain: stays dense
    values = get(f"{name}{SEP}values")
    if values.dtype != dtype or values.numel() != entry["nnz"]:
        raise CompressedFormatError(f"{name}: values hold {values.numel()} x {values.dtype}, header says "
                                    f"{entry['nnz']} x {dtype}")
    n = math.prod(shape)
    if enc == "bitmask":
        mask = unpack_bits(get(f"{name}{SEP}mask"), n)
        set_bits = int(torch.count_nonzero(mask))
        if set_bits != values.numel():
            raise CompressedFormatError(f"{name}: the bitmask has {set_bits} bits set for {values.numel()} values")
        if layout == "sparse_csr" and len(shape) == 2:
            m2 = mask.view(shape)
            crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=values.device)
            crow[1:] = m2.sum(dim=1).cumsum(0)
            col = m2.nonzero()[:, 1]
            return _csr(crow, col, values, shape)
        out = torch.zeros(n, dtype=dtype, device=values.device)
        return out.masked_scatter_(mask, values).view(shape)
    if enc == "csr":
        crow = get(f"{name}{SEP}crow").long()
        col = get(f"{name}{SEP}col").long()
        rows, cols = _matrix_shape(shape)
        if crow.numel() != rows + 1 or col.numel() != values.numel() or int(crow[-1]) != values.numel():
            raise CompressedFormatError(f"{name}: CSR parts do not fit shape {shape} with {values.numel()} values")
        if layout == "sparse_csr" and len(shape) == 2:
            return _csr(crow, col, values, shape)
        row = torch.repeat_interleave(torch.arange(rows, device=values.device), crow.diff())
        out = torch.zeros(rows, cols, dtype=dtype, device=values.device)
        out[row, col] = values
        return out.view(shape)
    raise CompressedFormatError(f"{name}: unknown encoding {enc!r}")


def dense_to_csr(t: torch.Tensor) -> torch.Tensor:
    """A 2-D dense tensor as sparse CSR with int32 indices (elements with a zero bit pattern dropped)."""
    if t.dim() != 2:
        raise ValueError(f"CSR needs a 2-D tensor, got shape {tuple(t.shape)}")
    mask = nonzero_mask(t)
    crow = torch.zeros(t.shape[0] + 1, dtype=torch.int64, device=t.device)
    crow[1:] = mask.sum(dim=1).cumsum(0)
    return _csr(crow, mask.nonzero()[:, 1], t[mask], tuple(t.shape))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape) -> torch.Tensor:
    """A CSR tensor with int32 indices (half the index memory of int64) where they fit."""
    idx = torch.int32 if values.numel() < 2**31 and max(shape) < 2**31 else torch.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(
            crow.to(idx), col.to(idx), values, size=tuple(shape), check_invariants=True
        )


# files ------------------------------------------------------------------------------------------------
@dataclass
class CompressionStats:
    """What a compressed save wrote: dense payload bytes vs stored payload bytes, and the file size."""

    tensors: int = 0
    dense_bytes: int = 0
    stored_bytes: int = 0
    file_bytes: int = 0
    encodings: dict = field(default_factory=lambda: dict.fromkeys(ENCODINGS, 0))

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.dense_bytes if self.dense_bytes else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def dedup(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One entry per (storage, offset, shape, dtype); other names become aliases of the first (sorted) name."""
    unique, aliases, first = {}, {}, {}
    for name in sorted(tensors):
        t = tensors[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
        if key in first and t.numel():
            aliases[name] = first[key]
        else:
            first[key] = name
            unique[name] = t
    return unique, aliases


def save_tensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    compress: bool = True,
    encoding: str | Callable[[str, torch.Tensor], str] = "auto",
) -> CompressionStats:
    """Write `tensors` to a safetensors file (atomically), compressed unless `compress=False`.

    `encoding` is "auto" (smallest per tensor), one of ENCODINGS (where a tensor can take it: csr needs 2+ dims,
    bitmask 1+), or a function (name, tensor) -> encoding.
    Shared tensors (tied weights) are stored once.
    """
    path = Path(path)
    unique, aliases = dedup(tensors)
    stats = CompressionStats()
    parts: dict[str, torch.Tensor] = {}
    header: dict[str, dict] = {}
    for name, t in unique.items():
        if isinstance(t, torch.Tensor) and t.layout != torch.strided:
            t = t.to_dense()
        enc = encoding(name, t) if callable(encoding) else encoding
        if compress:
            stored, entry = encode(name, t, enc)
        else:
            stored = {name: t.detach().contiguous().cpu()}
            entry = {"enc": "dense", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        parts.update(stored)
        header[name] = entry
        stats.tensors += 1
        stats.dense_bytes += t.numel() * t.element_size()
        stats.stored_bytes += sum(p.numel() * p.element_size() for p in stored.values())
        stats.encodings[entry["enc"]] += 1
    meta = {"format": "pt", **dict(metadata or {})}
    meta[META_KEY] = json.dumps({"version": COMPRESSED_VERSION, "tensors": header, "aliases": aliases})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(parts, tmp, metadata=meta)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stats.file_bytes = path.stat().st_size
    return stats


def _unreadable(path, e: Exception) -> CompressedFormatError:
    return CompressedFormatError(
        f"{str(path)!r} cannot be read as safetensors ({e}): the file is truncated or not a safetensors file"
    )


def read_header(path: str | Path) -> dict | None:
    """The compressed-format header of a safetensors file, or None for a plain file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise _unreadable(path, e) from e
    if META_KEY not in meta:
        return None
    header = json.loads(meta[META_KEY])
    if header.get("version") != COMPRESSED_VERSION:
        raise CompressedFormatError(f"{path}: compressed format v{header.get('version')} is not supported "
                                    f"(this skrr-compile reads v{COMPRESSED_VERSION})")
    return header


def load_tensors(
    path: str | Path,
    device: str | torch.device = "cpu",
    layout: str = "dense",
    sparse: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Read a (compressed or plain) safetensors file back to tensors.

    layout "dense" restores every tensor bit-exactly; "sparse_csr" returns the 2-D tensors that were stored
    sparse (and that `sparse(name)` accepts, all by default) as torch sparse CSR tensors with int32 indices;
    tensors stored dense stay dense. For a plain file, "sparse_csr" converts every 2-D tensor `sparse` accepts.
    """
    if layout not in ("dense", "sparse_csr"):
        raise ValueError(f"layout must be 'dense' or 'sparse_csr', got {layout!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    header = read_header(path)
    try:
        return _load_tensors(path, header, device, layout, sparse)
    except SafetensorError as e:  # a header that reads but data cut short
        raise _unreadable(path, e) from e


def _load_tensors(path: Path, header: dict | None, device, layout: str, sparse) -> dict[str, torch.Tensor]:
    if header is None:
        tensors = load_file(str(path), device=str(device))
        if layout == "sparse_csr":
            tensors = {
                k: dense_to_csr(v) if v.dim() == 2 and v.numel() and (sparse is None or sparse(k)) else v
                for k, v in tensors.items()
            }
        return tensors
    out = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        stored = set(f.keys())

        def get(part: str) -> torch.Tensor:
            if part not in stored:
                raise CompressedFormatError(f"{path}: part {part!r} is missing")
            return f.get_tensor(part)

        for name, entry in header["tensors"].items():
            want = layout if (sparse is None or sparse(name)) else "dense"
            out[name] = decode(name, entry, get, want)
    for alias, canonical in header.get("aliases", {}).items():
        out[alias] = out[canonical]
    return out
