"""Tests of skrr_compile.kernels: torch references, Triton kernels (interpreter on CPU), dispatch, bad input.

Every result is compared with the independent fp64 references of tests/kernels_reference.py. The Triton
kernels run under the interpreter in a subprocess (tests/kernels_interpret_worker.py) so TRITON_INTERPRET
never leaks into this process; tests marked ``gpu`` run them natively and skip without CUDA.
"""

from __future__ import annotations

import math
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import skrr_compile.kernels as kernels
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernels_reference import masked_mse_sums_fp64, projected_mse_sums_fp64, projection_fp64
from skrr_compile.kernels import (
    ProjectionSpec,
    explain_backend,
    last_backend,
    masked_mse_sums,
    projected_mse_sums,
    select_backend,
)
from skrr_compile.kernels import masked_mse as masked_mse_module
from skrr_compile.kernels import projected_mse as projected_mse_module
from skrr_compile.kernels._inputs import Candidates
from torch import nn

WORKER = Path(__file__).with_name("kernels_interpret_worker.py")
HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# (C, B, L, D): tiny, power of two, odd, non-power-of-two D spanning several channel blocks.
MSE_SHAPES = [(1, 1, 1, 1), (2, 3, 4, 16), (3, 5, 7, 33), (4, 2, 9, 70)]
# Inputs are exact in their dtype and differences/squares/sums are fp32, so every dtype is held tight.
MSE_TOLERANCES = [
    (torch.float32, 1e-6, 1e-5),
    (torch.float16, 1e-6, 1e-5),
    (torch.bfloat16, 1e-6, 1e-5),
]
# (C, B, L, D, H, P); the last one has 42 rows, crossing the interpreter's 40-row chunk.
PROJ_SHAPES = [(1, 1, 2, 3, 5, 4), (2, 3, 5, 33, 24, 17), (3, 2, 7, 48, 40, 40)]
# The hidden activations and the projected output are rounded to the weights' dtype (as the module does).
PROJ_TOLERANCES = [
    (torch.float32, 1e-5, 1e-4),
    (torch.float16, 1e-3, 5e-3),
    (torch.bfloat16, 1e-2, 3e-2),
]
LAYOUTS = ["contiguous", "permuted", "sliced", "list", "list_views"]
MASKS = [None, "bool", "int", "float"]


def _id(value) -> str:
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    return str(value)


# --------------------------------------------------------------------------------------------- case builders


def _randn(shape, dtype, gen, layout):
    """A tensor of ``shape`` with the memory layout the case asks for (values exact in ``dtype``)."""
    if layout == "permuted":  # every stride differs from the contiguous one, channel stride != 1
        order = list(reversed(range(len(shape))))
        base = torch.randn([shape[i] for i in order], generator=gen).to(dtype)
        return base.permute(*[order.index(i) for i in range(len(shape))])
    if layout == "sliced":  # padded rows: the token stride exceeds D
        return torch.randn(*shape[:-1], shape[-1] + 5, generator=gen).to(dtype)[..., : shape[-1]]
    return torch.randn(*shape, generator=gen).to(dtype)


def _candidates(tensor: torch.Tensor, layout: str, gen):
    if layout == "list":
        return [c.clone() for c in tensor.unbind(0)]
    if layout == "list_views":
        return list(tensor.unbind(0))
    return tensor


def _mask(kind, batch, length, gen):
    if kind is None:
        return None
    counted = torch.rand(batch, length, generator=gen) < 0.7
    counted[:, 0] = True
    if batch > 2:
        counted[1] = False  # a prompt without counted tokens
    if kind == "bool":
        return counted
    if kind == "int":
        return counted.to(torch.int64)
    return counted.float() * torch.where(torch.rand(batch, length, generator=gen) < 0.5, 0.5, 1.0)


def masked_case(shape, dtype, layout="contiguous", mask_kind="bool", nan_padding=False, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    num_candidates, batch, length, dim = shape
    tensor_layout = "contiguous" if layout.startswith("list") else layout
    cands = _randn((num_candidates, batch, length, dim), dtype, gen, tensor_layout)
    reference = _randn((batch, length, dim), dtype, gen, tensor_layout)
    mask = _mask(mask_kind, batch, length, gen)
    if nan_padding:
        padded = mask == 0
        cands[:, padded] = float("nan")
        reference[padded] = float("nan")
    return {
        "op": "masked",
        "candidates": _candidates(cands, layout, gen),
        "reference": reference,
        "mask": mask,
    }


def projected_case(
    shape,
    dtype,
    activation="gelu_tanh",
    two_layers=True,
    bias=True,
    layout="contiguous",
    mask_kind="bool",
    seed=0,
) -> dict:
    gen = torch.Generator().manual_seed(seed)
    num_candidates, batch, length, dim, hidden, out = shape
    if not two_layers:
        out = hidden
    w1 = (torch.randn(hidden, dim, generator=gen) / math.sqrt(dim)).to(dtype)
    w2 = (torch.randn(out, hidden, generator=gen) / math.sqrt(hidden)).to(dtype) if two_layers else None
    b1 = (0.1 * torch.randn(hidden, generator=gen)).to(dtype) if bias else None
    b2 = (0.1 * torch.randn(out, generator=gen)).to(dtype) if bias and two_layers else None
    projection = {"w1": w1, "b1": b1, "activation": activation, "w2": w2, "b2": b2}
    tensor_layout = "contiguous" if layout.startswith("list") else layout
    reference = torch.randn(batch, length, dim, generator=gen)
    # Candidates near the reference, as pruned encoders are; the reference is projected once, in fp64.
    noise = _randn((num_candidates, batch, length, dim), torch.float32, gen, tensor_layout)
    cands = (reference + 0.5 * noise).to(dtype)
    reference_projected = projection_fp64(reference, **projection).to(dtype)
    return {
        "op": "projected",
        "candidates": _candidates(cands, layout, gen),
        "reference_projected": reference_projected,
        "mask": _mask(mask_kind, batch, length, gen),
        "projection": projection,
    }


def run_case(case: dict, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if case["op"] == "masked":
        return masked_mse_sums(case["candidates"], case["reference"], case["mask"], backend=backend)
    spec = ProjectionSpec(**case["projection"])
    return projected_mse_sums(
        case["candidates"], case["reference_projected"], case["mask"], spec, backend=backend
    )


def expected_for(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    if case["op"] == "masked":
        return masked_mse_sums_fp64(case["candidates"], case["reference"], case["mask"])
    return projected_mse_sums_fp64(
        case["candidates"], case["reference_projected"], case["mask"], **case["projection"]
    )


def assert_matches_fp64(
    case: dict, sums: torch.Tensor, counts: torch.Tensor, atol: float, rtol: float
) -> None:
    expected_sums, expected_counts = expected_for(case)
    assert sums.dtype == torch.float32 and counts.dtype == torch.float32
    assert sums.shape == expected_sums.shape and counts.shape == expected_counts.shape
    torch.testing.assert_close(counts.double().cpu(), expected_counts, atol=0, rtol=0)
    # Compare per-element means so atol means the same thing for every shape.
    per_element = counts.double().cpu().clamp(min=1)
    torch.testing.assert_close(
        sums.double().cpu() / per_element, expected_sums / per_element, atol=atol, rtol=rtol
    )


# --------------------------------------------------------------------------------------------- torch reference


@pytest.mark.parametrize("dtype, atol, rtol", MSE_TOLERANCES, ids=_id)
@pytest.mark.parametrize("shape", MSE_SHAPES, ids=_id)
def test_masked_mse_torch_matches_fp64(shape, dtype, atol, rtol):
    case = masked_case(shape, dtype)
    assert_matches_fp64(case, *run_case(case, backend="torch"), atol, rtol)


@pytest.mark.parametrize("mask_kind", MASKS, ids=_id)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_masked_mse_torch_layouts_and_masks(layout, mask_kind):
    case = masked_case((3, 5, 7, 33), torch.bfloat16, layout, mask_kind)
    assert_matches_fp64(case, *run_case(case, backend="torch"), 1e-6, 1e-5)


def test_masked_mse_torch_ignores_nan_in_padding():
    case = masked_case((3, 5, 7, 33), torch.float16, nan_padding=True)
    sums, _ = run_case(case, backend="torch")
    assert torch.isfinite(sums).all()
    assert_matches_fp64(case, sums, _, 1e-6, 1e-5)


def test_masked_mse_identical_candidate_is_zero_and_counts():
    reference = torch.randint(-8, 8, (2, 6, 10)).to(torch.bfloat16)  # x + 1 stays exact
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    sums, counts = masked_mse_sums([reference, reference + 1], reference, mask)
    assert sums[0].tolist() == [0.0, 0.0]
    assert sums[1].tolist() == [30.0, 60.0]
    assert counts.tolist() == [30.0, 60.0]


def test_torch_paths_chunk_without_changing_results(monkeypatch):
    masked = masked_case((3, 5, 7, 33), torch.float32)
    projected = projected_case((3, 2, 7, 48, 40, 40), torch.float32)
    full = masked_case((2, 3, 4, 16), torch.float32, mask_kind=None)
    before = [run_case(case, backend="torch")[0] for case in (masked, projected, full)]
    monkeypatch.setattr(masked_mse_module, "TORCH_CHUNK_ELEMENTS", 40)
    monkeypatch.setattr(projected_mse_module, "TORCH_CHUNK_ELEMENTS", 100)
    after = [run_case(case, backend="torch")[0] for case in (masked, projected, full)]
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*(st.integers(1, n) for n in (4, 4, 9, 80))),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    mask_kind=st.sampled_from(MASKS),
    seed=st.integers(0, 2**16),
)
def test_masked_mse_torch_property(shape, dtype, mask_kind, seed):
    case = masked_case(shape, dtype, mask_kind=mask_kind, seed=seed)
    assert_matches_fp64(case, *run_case(case, backend="torch"), 1e-6, 1e-5)


@pytest.mark.parametrize("dtype, atol, rtol", PROJ_TOLERANCES, ids=_id)
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=_id)
def test_projected_mse_torch_matches_fp64(shape, dtype, atol, rtol):
    case = projected_case(shape, dtype)
    assert_matches_fp64(case, *run_case(case, backend="torch"), atol, rtol)


@pytest.mark.parametrize(
    "variant",
    [
        {"activation": "gelu"},
        {"activation": "silu"},
        {"activation": "identity"},
        {"two_layers": False, "activation": "identity"},
        {"two_layers": False, "activation": "silu", "bias": False},
        {"bias": False},
        {"layout": "permuted"},
        {"layout": "list"},
        {"mask_kind": None},
        {"mask_kind": "float"},
    ],
    ids=lambda v: "-".join(f"{k}={v}" for k, v in v.items()),
)
def test_projected_mse_torch_variants(variant):
    case = projected_case((2, 3, 5, 33, 24, 17), torch.float32, **variant)
    assert_matches_fp64(case, *run_case(case, backend="torch"), 1e-5, 1e-4)


def test_list_of_equally_spaced_views_is_not_copied():
    stacked = torch.randn(3, 2, 4, 8)
    as_views = Candidates(list(stacked.unbind(0)), "test").as_tensor()
    assert as_views.data_ptr() == stacked.data_ptr() and as_views.stride() == stacked.stride()
    copies = Candidates([t.clone() for t in stacked.unbind(0)], "test").as_tensor()
    assert copies.data_ptr() != stacked.data_ptr() and torch.equal(copies, stacked)


def test_identity_projection_is_masked_mse():
    case = masked_case((2, 3, 4, 16), torch.float32)
    sums, counts = projected_mse_sums(
        case["candidates"], case["reference"], case["mask"], ProjectionSpec.identity(), backend="torch"
    )
    assert_matches_fp64(case, sums, counts, 1e-6, 1e-5)
    assert last_backend("projected_mse_sums") == "torch"


# --------------------------------------------------------------------------------------------- ProjectionSpec


def test_from_module_pixart_text_projection_matches_module():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    torch.manual_seed(0)
    for act_fn, expected in [("gelu_tanh", "gelu_tanh"), ("silu", "silu"), ("silu_fp32", "silu")]:
        module = embeddings.PixArtAlphaTextProjection(
            in_features=24, hidden_size=16, out_features=12, act_fn=act_fn
        )
        spec = ProjectionSpec.from_module(module)
        assert spec is not None and spec.activation == expected
        assert (spec.in_features, spec.hidden_features, spec.out_features) == (24, 16, 12)
        x = torch.randn(2, 5, 24)
        with torch.no_grad():
            torch.testing.assert_close(spec(x), module(x))
        reference = torch.randn(2, 5, 24)
        with torch.no_grad():
            projected_ref = module(reference)
            expected_sums = ((module(x) - projected_ref) ** 2).sum(dim=(1, 2))
        sums, counts = projected_mse_sums([x], projected_ref, None, spec)
        torch.testing.assert_close(sums[0], expected_sums, rtol=1e-5, atol=1e-5)
        assert counts.tolist() == [60.0, 60.0]
        assert not spec.w1.requires_grad


def test_from_module_linear_identity_and_unknown():
    linear = nn.Linear(8, 6)
    spec = ProjectionSpec.from_module(linear)
    assert spec.w2 is None and spec.activation == "identity" and spec.out_features == 6
    assert ProjectionSpec.from_module(nn.Linear(8, 6, bias=False)).b1 is None
    assert ProjectionSpec.from_module(nn.Identity()).is_identity
    assert ProjectionSpec.from_module(nn.Sequential(nn.Linear(8, 6), nn.GELU())) is None

    class PixArtAlphaTextProjection(nn.Module):  # same attributes as diffusers', unsupported activation
        def __init__(self):
            super().__init__()
            self.linear_1, self.act_1, self.linear_2 = nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6)

    assert ProjectionSpec.from_module(PixArtAlphaTextProjection()) is None
    module = PixArtAlphaTextProjection()
    module.act_1 = nn.GELU()
    assert ProjectionSpec.from_module(module).activation == "gelu"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"w1": torch.zeros(4, 3), "activation": "relu"}, "activation 'relu'"),
        ({"w1": torch.zeros(4)}, "w1 must be"),
        ({"w1": torch.zeros(4, 3), "b1": torch.zeros(3)}, "b1 must be"),
        ({"w1": torch.zeros(4, 3), "w2": torch.zeros(5, 3)}, "w2 must be"),
        ({"w1": torch.zeros(4, 3), "w2": torch.zeros(5, 4), "b2": torch.zeros(4)}, "b2 must be"),
        ({"w1": torch.zeros(4, 3), "b2": torch.zeros(4)}, "b2 given without w2"),
        ({"w1": torch.zeros(4, 3), "w2": torch.zeros(5, 4, dtype=torch.float16)}, "w2 is torch.float16"),
        ({"w1": torch.zeros(4, 3, dtype=torch.int32)}, "weights must be"),
        ({"w1": None, "activation": "silu"}, "identity"),
    ],
)
def test_projection_spec_rejects_bad_fields(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProjectionSpec(**kwargs)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda: (torch.zeros(2, 3, 4, 5), torch.zeros(3, 4, 6), None), r"reference has shape \(3, 4, 6\)"),
        (lambda: (torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 5), None), r"reference has shape \(2, 4, 5\)"),
        (
            lambda: (torch.zeros(2, 3, 4, 5), torch.zeros(3, 4, 5), torch.ones(3, 5)),
            r"mask must have shape \[B, L\]",
        ),
        (lambda: (torch.zeros(2, 3, 4, 5), torch.zeros(3, 4, 5), torch.ones(4, 3)), r"mask must have shape"),
        (lambda: (torch.zeros(3, 4, 5), torch.zeros(3, 4, 5), None), r"\[C, B, L, D\] tensor"),
        (lambda: ([], torch.zeros(3, 4, 5), None), "no candidates"),
        (lambda: ([torch.zeros(3, 4, 5), torch.zeros(3, 4, 6)], torch.zeros(3, 4, 5), None), "candidate 1"),
        (lambda: (torch.zeros(1, 3, 4, 5, dtype=torch.int64), torch.zeros(3, 4, 5), None), "floating point"),
        (
            lambda: (torch.zeros(1, 3, 4, 5), torch.zeros(3, 4, 5, device="meta"), None),
            "reference is on meta",
        ),
    ],
)
def test_masked_mse_bad_input(make_args, message):
    with pytest.raises(ValueError, match=message):
        masked_mse_sums(*make_args())


def test_projected_mse_bad_input():
    spec = ProjectionSpec(torch.zeros(6, 16), None, "gelu_tanh", torch.zeros(4, 6))
    cands, ref_p, mask = torch.zeros(2, 3, 5, 16), torch.zeros(3, 5, 4), torch.ones(3, 5)
    with pytest.raises(ValueError, match=r"D = 8 channels .*w1 is \(6, 16\).*expecting D = 16"):
        projected_mse_sums(torch.zeros(2, 3, 5, 8), ref_p, mask, spec)
    with pytest.raises(
        ValueError, match=r"reference_projected has shape \(3, 5, 6\) but \[B, L, P\] = \(3, 5, 4\)"
    ):
        projected_mse_sums(cands, torch.zeros(3, 5, 6), mask, spec)
    with pytest.raises(ValueError, match="mask must have shape"):
        projected_mse_sums(cands, ref_p, torch.ones(5, 3), spec)
    with pytest.raises(ValueError, match="projection must be a ProjectionSpec"):
        projected_mse_sums(cands, ref_p, mask, nn.Linear(16, 4))


# --------------------------------------------------------------------------------------------- dispatch


@pytest.fixture
def no_overrides(monkeypatch):
    monkeypatch.delenv("SKRR_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_auto_selects_torch_on_cpu_and_triton_on_cuda(no_overrides):
    assert select_backend(torch.device("cpu")) == "torch"
    assert select_backend("cpu") == "torch"
    expected_cuda = "triton" if kernels.dispatch.triton_available() else "torch"
    assert select_backend(torch.device("cuda")) == expected_cuda
    assert explain_backend("cpu") == "torch (auto: tensors on cpu)"


def test_wrappers_record_the_path_they_took(no_overrides):
    case = masked_case((2, 3, 4, 16), torch.float32)
    run_case(case)
    assert last_backend("masked_mse_sums") == "torch"
    run_case(projected_case((1, 1, 2, 3, 5, 4), torch.float32))
    recorded = last_backend()
    assert recorded["masked_mse_sums"] == recorded["projected_mse_sums"] == "torch"


def test_env_override(no_overrides):
    no_overrides.setenv("SKRR_KERNELS", "torch")
    assert select_backend("cuda") == "torch"
    assert "SKRR_KERNELS=torch" in explain_backend("cuda")
    no_overrides.setenv("SKRR_KERNELS", "auto")
    assert select_backend("cpu") == "torch"
    no_overrides.setenv("SKRR_KERNELS", "fast")
    with pytest.raises(ValueError, match="SKRR_KERNELS='fast'"):
        select_backend("cpu")


@pytest.mark.skipif(not kernels.dispatch.triton_available(), reason="triton not installed")
def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error(no_overrides):
    no_overrides.setenv("SKRR_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        select_backend("cpu")
    assert select_backend("cuda") == "triton"
    no_overrides.delenv("SKRR_KERNELS")
    case = masked_case((2, 3, 4, 16), torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        run_case(case, backend="triton")
    with pytest.raises(ValueError, match="backend='cuda'"):
        run_case(case, backend="cuda")


@pytest.mark.skipif(not kernels.dispatch.triton_available(), reason="triton not installed")
def test_kernels_defined_without_interpreter_refuse_cpu_tensors(no_overrides):
    # TRITON_INTERPRET switched on after import: the kernels were compiled for the GPU, say so.
    no_overrides.setenv("TRITON_INTERPRET", "1")
    case = masked_case((2, 3, 4, 16), torch.float32)
    with pytest.raises(RuntimeError, match="before skrr_compile.kernels is first imported"):
        run_case(case, backend="triton")


# --------------------------------------------------------------------------------------------- Triton interpreter


def _interpreter_cases() -> dict[str, tuple[dict, float, float]]:
    cases: dict[str, tuple[dict, float, float]] = {}
    for shape in MSE_SHAPES:
        for dtype, atol, rtol in MSE_TOLERANCES:
            cases[f"masked-{_id(shape)}-{_id(dtype)}"] = (masked_case(shape, dtype), atol, rtol)
    for layout in LAYOUTS[1:]:
        cases[f"masked-layout-{layout}"] = (masked_case((3, 5, 7, 33), torch.bfloat16, layout), 1e-6, 1e-5)
    for mask_kind in (None, "int", "float"):
        cases[f"masked-mask-{mask_kind}"] = (
            masked_case((3, 5, 7, 33), torch.float16, mask_kind=mask_kind),
            1e-6,
            1e-5,
        )
    cases["masked-nan-padding"] = (masked_case((3, 5, 7, 33), torch.float32, nan_padding=True), 1e-6, 1e-5)
    for shape in PROJ_SHAPES:
        for dtype, atol, rtol in PROJ_TOLERANCES:
            cases[f"projected-{_id(shape)}-{_id(dtype)}"] = (projected_case(shape, dtype), atol, rtol)
    small = (2, 3, 5, 33, 24, 17)
    variants = {
        "gelu": {"activation": "gelu"},
        "silu": {"activation": "silu"},
        "identity": {"activation": "identity"},
        "single-linear": {"two_layers": False, "activation": "identity"},
        "single-linear-silu-nobias": {"two_layers": False, "activation": "silu", "bias": False},
        "permuted": {"layout": "permuted"},
        "list": {"layout": "list"},
        "no-mask": {"mask_kind": None},
    }
    for name, variant in variants.items():
        cases[f"projected-{name}"] = (projected_case(small, torch.float32, **variant), 1e-5, 1e-4)
    cases["projected-single-linear-bf16"] = (
        projected_case(small, torch.bfloat16, two_layers=False, activation="gelu_tanh"),
        1e-2,
        3e-2,
    )
    return cases


INTERPRETER_CASES = _interpreter_cases()


def _run_worker(cases: dict, directory: Path, tag: str) -> dict:
    import os

    cases_path, results_path = directory / f"cases-{tag}.pt", directory / f"results-{tag}.pt"
    torch.save(cases, cases_path)
    env = {**os.environ, "TRITON_INTERPRET": "1", "SKRR_KERNELS": "triton"}
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(cases_path), str(results_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"interpreter worker failed:\n{proc.stdout}\n{proc.stderr}"
    return torch.load(results_path)


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton")
    directory = tmp_path_factory.mktemp("interpret")
    cases = {name: case for name, (case, _, _) in INTERPRETER_CASES.items()}
    # Two workers in parallel (masked / projected) to use both CPU cores.
    groups = {op: {n: c for n, c in cases.items() if c["op"] == op} for op in ("masked", "projected")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(_run_worker, group, directory, op) for op, group in groups.items()]
        results: dict = {}
        for future in futures:
            results.update(future.result())
    return results


def test_interpreter_worker_used_interpreted_triton(interpreter_results):
    assert interpreter_results["_selected_backend"] == "triton"
    assert interpreter_results["_kernels"] == ["InterpretedFunction", "InterpretedFunction"]


@pytest.mark.parametrize("name", list(INTERPRETER_CASES))
def test_triton_interpreter_matches_fp64(interpreter_results, name):
    case, atol, rtol = INTERPRETER_CASES[name]
    result = interpreter_results[name]
    assert "error" not in result, result.get("error")
    assert result["backend"] == "triton"
    assert_matches_fp64(case, result["sums"], result["counts"], atol, rtol)


# --------------------------------------------------------------------------------------------- GPU


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype, atol, rtol", MSE_TOLERANCES, ids=_id)
@pytest.mark.parametrize("shape", [(3, 5, 7, 33), (4, 2, 300, 4096), (8, 4, 77, 768)], ids=_id)
def test_masked_mse_triton_gpu(shape, dtype, atol, rtol, no_overrides):
    case = _to_cuda(masked_case(shape, dtype))
    assert select_backend("cuda") == "triton"
    assert_matches_fp64(case, *run_case(case, backend="triton"), atol, rtol)
    assert last_backend("masked_mse_sums") == "triton"


@gpu
@requires_cuda
@pytest.mark.parametrize("dtype, atol, rtol", PROJ_TOLERANCES, ids=_id)
@pytest.mark.parametrize("shape", [(2, 3, 5, 33, 24, 17), (2, 2, 120, 4096, 1152, 1152)], ids=_id)
@pytest.mark.parametrize("layout", ["contiguous", "permuted"])
def test_projected_mse_triton_gpu(shape, dtype, atol, rtol, layout):
    case = _to_cuda(projected_case(shape, dtype, layout=layout))
    assert_matches_fp64(case, *run_case(case, backend="triton"), atol, rtol)


def _to_cuda(case: dict) -> dict:
    def move(value):
        if isinstance(value, torch.Tensor):
            return value.cuda()
        if isinstance(value, list):
            return [move(v) for v in value]
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        return value

    return move(case)
