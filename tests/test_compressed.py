"""Compressed sparse safetensors: bit-exact round trips, encoding choice, real file sizes, bad files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from skrr_compile.core.compressed import (
    META_KEY,
    PART_OVERHEAD,
    CompressedFormatError,
    choose_encoding,
    dense_to_csr,
    encoded_sizes,
    load_tensors,
    pack_bits,
    read_header,
    save_tensors,
    unpack_bits,
)

INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so -0.0 != 0.0 and NaN == NaN in comparisons."""
    if t.is_complex():
        t = torch.view_as_real(t)
    if t.is_floating_point():
        return t.contiguous().view(INT_VIEW[t.element_size()])
    return t


def assert_bit_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and tuple(a.shape) == tuple(b.shape)
    assert torch.equal(bits(a), bits(b))


def sparse_tensor(shape, sparsity, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g)
    t[torch.rand(*shape, generator=g) < sparsity] = 0
    return t.to(dtype)


@given(st.lists(st.booleans(), min_size=0, max_size=70))
@settings(max_examples=60, deadline=None)
def test_pack_bits_matches_numpy_little_endian(flags):
    mask = torch.tensor(flags, dtype=torch.bool)
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(np.array(flags, dtype=bool), bitorder="little"))
    assert torch.equal(unpack_bits(packed, len(flags)), mask)


SPECIALS = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"), 1e-45, -3.5])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97, 1.0])
@pytest.mark.parametrize("encoding", ["auto", "dense", "bitmask", "csr"])
def test_round_trip_is_bit_exact(tmp_path, dtype, sparsity, encoding):
    t = sparse_tensor((37, 29), sparsity, dtype)
    t.view(-1)[: len(SPECIALS)] = SPECIALS.to(dtype)  # -0.0 and NaN must survive as themselves
    path = tmp_path / "w.safetensors"
    save_tensors({"w": t, "b": torch.randn(29).to(dtype)}, path, encoding=encoding)
    out = load_tensors(path)
    assert_bit_exact(out["w"], t)
    assert read_header(path)["tensors"]["w"]["enc"] == (choose_encoding(t) if encoding == "auto" else encoding)


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(2.5),  # 0-d
        torch.empty(0, 7),  # empty
        sparse_tensor((4, 3, 3, 3), 0.6),  # conv weight
        sparse_tensor((2, 5, 6), 0.8, torch.float16),
        (torch.arange(40) % 3).reshape(8, 5),  # integers
        torch.rand(9, 9) < 0.2,  # bool
        torch.randn(6, 6, dtype=torch.complex64) * (torch.rand(6, 6) < 0.4),
    ],
    ids=["0d", "empty", "conv4d", "3d-fp16", "int64", "bool", "complex"],
)
def test_round_trip_odd_shapes_and_dtypes(tmp_path, tensor):
    path = tmp_path / "t.safetensors"
    for enc in ("auto", "bitmask", "csr", "dense"):
        if enc == "bitmask" and tensor.dim() == 0 or enc == "csr" and tensor.dim() < 2:
            continue
        save_tensors({"t": tensor}, path, encoding=enc)
        assert_bit_exact(load_tensors(path)["t"], tensor)


@given(
    rows=st.integers(1, 40), cols=st.integers(1, 40), sparsity=st.floats(0, 1), seed=st.integers(0, 10_000)
)
@settings(max_examples=40, deadline=None)
def test_round_trip_property(tmp_path_factory, rows, cols, sparsity, seed):
    t = sparse_tensor((rows, cols), sparsity, seed=seed)
    path = tmp_path_factory.mktemp("p") / "x.safetensors"
    save_tensors({"x": t}, path)
    assert_bit_exact(load_tensors(path)["x"], t)
    csr = load_tensors(path, layout="sparse_csr")["x"]
    assert torch.equal(csr.to_dense() if csr.layout == torch.sparse_csr else csr, t)


def test_sizes_follow_the_formulas():
    n, rows, cols = 64 * 48, 64, 48
    nnz = 1000
    s = encoded_sizes((rows, cols), torch.float32, nnz)
    assert s == {
        "dense": n * 4,
        "bitmask": math.ceil(n / 8) + nnz * 4,
        "csr": (rows + 1) * 4 + nnz * (2 + 4),  # int32 row pointers, int16 columns
    }
    wide = encoded_sizes((3, 70_000), torch.float16, 10)
    assert wide["csr"] == 4 * 4 + 10 * (4 + 2)  # columns no longer fit int16


def test_encoding_choice_by_sparsity():
    assert choose_encoding(sparse_tensor((256, 256), 0.0)) == "dense"
    assert choose_encoding(sparse_tensor((256, 256), 0.5)) == "bitmask"
    assert choose_encoding(sparse_tensor((256, 256), 0.99)) == "csr"
    # bitmask beats dense above 1/32 sparsity for fp32, csr beats bitmask above ~15/16 sparsity
    assert choose_encoding(sparse_tensor((256, 256), 0.9)) == "bitmask"
    tiny = torch.tensor([0.0, 1.0, 0.0, 2.0])  # saving 4 bytes does not pay for another header entry
    assert choose_encoding(tiny) == "dense"
    assert PART_OVERHEAD > 4


@pytest.mark.parametrize("dtype,limit", [(torch.float32, 0.60), (torch.float16, 0.65)])
def test_file_at_half_sparsity_is_much_smaller_than_dense(tmp_path, dtype, limit):
    """The files on disk, not payload arithmetic: 50 % sparse weights, compressed vs plain safetensors."""
    weights = {f"layer{i}.weight": sparse_tensor((384, 1536), 0.5, dtype, seed=i) for i in range(4)}
    dense_path, comp_path = tmp_path / "dense.safetensors", tmp_path / "comp.safetensors"
    save_file(weights, str(dense_path))
    stats = save_tensors(weights, comp_path)
    dense_size, comp_size = dense_path.stat().st_size, comp_path.stat().st_size
    assert stats.file_bytes == comp_size
    b = torch.empty((), dtype=dtype).element_size()
    expected = (1 / 8 + 0.5 * b) / b  # bitmask bits + half the values, per dense byte
    assert comp_size / dense_size == pytest.approx(expected, abs=0.01)
    assert comp_size <= limit * dense_size


def test_tied_tensors_are_stored_once_and_stay_tied(tmp_path):
    w = sparse_tensor((64, 64), 0.5)
    path = tmp_path / "tied.safetensors"
    save_tensors({"a.weight": w, "b.weight": w, "c": w.clone()}, path)
    header = read_header(path)
    assert header["aliases"] == {"b.weight": "a.weight"}
    assert set(header["tensors"]) == {"a.weight", "c"}
    out = load_tensors(path)
    assert out["a.weight"] is out["b.weight"]
    assert torch.equal(out["c"], w)


def test_sparse_csr_layout_matches_torch(tmp_path):
    w = sparse_tensor((50, 70), 0.8)
    path = tmp_path / "s.safetensors"
    save_tensors({"w": w, "dense_enough": torch.randn(8, 8)}, path)
    out = load_tensors(path, layout="sparse_csr")
    csr = out["w"]
    ref = w.to_sparse_csr()
    assert csr.layout == torch.sparse_csr and csr.crow_indices().dtype == torch.int32
    assert torch.equal(csr.crow_indices().long(), ref.crow_indices())
    assert torch.equal(csr.col_indices().long(), ref.col_indices())
    assert torch.equal(csr.values(), ref.values())
    assert out["dense_enough"].layout == torch.strided  # stored dense: stays dense
    only = load_tensors(path, layout="sparse_csr", sparse=lambda name: False)
    assert only["w"].layout == torch.strided
    assert torch.equal(dense_to_csr(w).to_dense(), w)


def test_plain_safetensors_files_load_unchanged(tmp_path):
    path = tmp_path / "plain.safetensors"
    t = {"x": torch.randn(3, 4), "y": torch.arange(5)}
    save_file(t, str(path))
    assert read_header(path) is None
    out = load_tensors(path)
    assert all(torch.equal(out[k], t[k]) for k in t)


def test_uncompressed_save_is_plain_size(tmp_path):
    w = sparse_tensor((128, 128), 0.5)
    stats = save_tensors({"w": w}, tmp_path / "u.safetensors", compress=False)
    assert stats.stored_bytes == stats.dense_bytes == w.numel() * 4
    assert torch.equal(load_tensors(tmp_path / "u.safetensors")["w"], w)


def _rewrite(path, parts, header):
    meta = {"format": "pt", META_KEY: json.dumps(header)}
    save_file(parts, str(path), metadata=meta)


def test_corrupt_files_are_refused(tmp_path):
    w = sparse_tensor((16, 16), 0.5)
    path = tmp_path / "c.safetensors"
    save_tensors({"w": w}, path)
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        parts = {k: f.get_tensor(k) for k in f.keys()}
    bad = tmp_path / "bad.safetensors"
    _rewrite(bad, {k: v for k, v in parts.items() if not k.endswith("::mask")}, header)
    with pytest.raises(CompressedFormatError, match="missing"):
        load_tensors(bad)
    wrong = json.loads(json.dumps(header))
    wrong["tensors"]["w"]["nnz"] += 1
    _rewrite(bad, parts, wrong)
    with pytest.raises(CompressedFormatError, match="values hold"):
        load_tensors(bad)
    future = {**header, "version": 99}
    _rewrite(bad, parts, future)
    with pytest.raises(CompressedFormatError, match="v99"):
        load_tensors(bad)
    with pytest.raises(FileNotFoundError):
        load_tensors(tmp_path / "nope.safetensors")


def test_reserved_separator_and_failed_writes_leave_nothing(tmp_path):
    with pytest.raises(CompressedFormatError, match="reserved"):
        save_tensors({"a::b": torch.zeros(2)}, tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())  # no file, no temporary left behind
