"""Quantized weights in safetensors: torchao's flattening (values, scales, zero points), int4 packed two per byte.

    data, metadata, aliases = flatten(named_tensors)   # plain tensors + str->str metadata for safetensors
    tensors = unflatten(data, metadata)                # back to torchao tensors (aliases re-added by the caller)

A tensor shared by several names (re-use, tied weights) is stored once; the other names are aliases. torchao's
`IntxUnpackedToInt8Tensor` (the int4 scheme) keeps one int4 value per int8 byte; in the file its values are
packed two per byte (low nibble first, value + 8), listed under the metadata key `skrr_int4_packed`
(stored name -> shape), and unpacked on load. No pickle anywhere: the metadata is JSON.
"""

from __future__ import annotations

import json

import torch

PACKED_KEY = "skrr_int4_packed"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7] -> uint8, two per byte (low nibble first); odd counts pad one nibble."""
    flat = (q.reshape(-1).to(torch.int16) + 8).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= int(s)
    out = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n]
    return (out.to(torch.int16) - 8).to(torch.int8).reshape(tuple(shape))


def flatten(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """(stored tensors, safetensors metadata, aliases) for a mix of plain and torchao tensors."""
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    canonical: dict[int, str] = {}
    by_storage: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    unique: dict[str, torch.Tensor] = {}
    for name in sorted(tensors):
        t = tensors[name]
        plain = type(t) in (torch.Tensor, torch.nn.Parameter)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if plain else None
        if id(t) in canonical:
            aliases[name] = canonical[id(t)]
        elif key is not None and key in by_storage:
            aliases[name] = by_storage[key]
        else:
            canonical[id(t)] = name
            if key is not None:
                by_storage[key] = name
            unique[name] = t.detach().contiguous().cpu() if plain else _as_subclass(t)
    data, metadata = flatten_tensor_state_dict(unique)
    packed = {}
    for name, t in unique.items():
        if getattr(t, "target_dtype", None) == torch.int4:
            stem, _, leaf = name.rpartition(".")
            key = f"{stem}._{leaf}_qdata"
            packed[key] = list(data[key].shape)
            data[key] = pack_int4(data[key])
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    metadata[PACKED_KEY] = json.dumps(packed)
    data = {k: v.detach().contiguous().cpu() for k, v in data.items()}
    return data, metadata, aliases


def _as_subclass(t: torch.Tensor) -> torch.Tensor:
    """A torchao tensor behind an nn.Parameter, detached (torchao's flattening reads its class name)."""
    return t.detach() if isinstance(t, torch.nn.Parameter) else t


def unflatten(data: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, torch.Tensor]:
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    data = dict(data)
    for key, shape in json.loads(metadata.get(PACKED_KEY, "{}")).items():
        data[key] = unpack_int4(data[key], shape)
    meta = {k: v for k, v in metadata.items() if k != PACKED_KEY and k not in ("format", "producer")}
    tensors, leftover = unflatten_tensor_state_dict(data, meta)
    if leftover:
        raise ValueError(f"quantized weights file has {len(leftover)} tensors no entry names, e.g. {sorted(leftover)[:3]}")
    return tensors


def stored_bytes(data: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in data.values())
