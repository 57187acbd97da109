"""ONNX export of a quantized pruned encoder, quantized by ONNX Runtime's own tools on the exported graph.

    report = export_quantized_onnx(q, "encoder.onnx", verify=True)   # q: a quantized PrunedEncoder (or dir)

The pruned graph is exported in fp32 with the torch model's quantized values (dequantized: what the torch
model computes with), then:
- `int8` / `int8-dynamic`: `onnxruntime.quantization.quantize_dynamic` (int8 weights per output channel,
  activations quantized per tensor at run time: ONNX Runtime's `DynamicQuantizeLinear` + `MatMulInteger`);
- `int4`: `MatMulNBitsQuantizer` (4-bit blocks of `group_size`, symmetric): `MatMulNBits`, ONNX Runtime's real
  4-bit kernel on CPU (two values per byte in the file and in memory);
- `fp8`: refused (ONNX Runtime has no fp8 weight-only CPU kernel): export `int8` or `int4`.
An initializer several MatMuls read (re-use, tied weights) is quantized once and stays one initializer.
Verification runs onnxruntime at two shapes the export never saw, against the quantized torch model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.core.quantize import QuantizationError, is_quantized
from skrr_compile.deploy.onnx import (
    VERIFY_SHAPES,
    OnnxExportReport,
    OnnxVerificationError,
    _as_pruned,
    _example_inputs,
    export_onnx,
    onnx_session,
)
from skrr_compile.utils.quiet import drop_log_records
from skrr_compile.utils.tensors import bind_tensors, named_tensors

# relative L2 error vs the quantized torch model: ONNX Runtime re-quantizes the torch model's values on its own
# grid (int8 per channel: nearly the same values, plus dynamic activation quantization; int4: symmetric blocks
# with another scale rule, so the two int4 models differ by about their own quantization error)
TOLERANCE = {"int8": 0.2, "int8-dynamic": 0.2, "int4": 0.25}  # MiniLM int8: 0.12-0.14 measured


def dequantized(pruned: PrunedEncoder) -> PrunedEncoder:
    """A full-precision copy holding the quantized model's values (shared tensors stay shared)."""
    from skrr_compile.deploy.onnx import _copy_graph_module

    gm = _copy_graph_module(pruned.graph_module)
    done: dict[int, torch.Tensor] = {}
    tensors = {}
    for name, t in named_tensors(pruned.graph_module).items():
        if id(t) not in done:
            done[id(t)] = t.dequantize().detach() if is_quantized(t) else t
        tensors[name] = done[id(t)]
    bind_tensors(gm, tensors)
    info = {k: v for k, v in pruned.info.items() if k != "quantization"}
    return PrunedEncoder(gm, pruned.config, pruned.plan, pruned.architecture, info)


def _unshare_weights(src: Path, dst: Path, op_types: tuple[str, ...]) -> None:
    """ONNX Runtime's quantizers only quantize a node whose weight is an initializer of its own. A re-used
    sub-block's weight is read by several nodes, and the exporter keeps it as Transpose(weight) (folding it
    would store it twice): give every reader its own (transposed) initializer here; the identical quantized
    copies are merged back into one after quantization (`_merge_quantized_twins`)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    inits = {t.name: t for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    reads: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type not in op_types:
            continue
        for i, name in enumerate(node.input):
            source, transposed = name, False
            t = producer.get(name)
            if t is not None and t.op_type == "Transpose" and t.input[0] in inits \
                    and len(inits[t.input[0]].dims) == 2 and [a.ints for a in t.attribute if a.name == "perm"] in ([], [[1, 0]]):
                source, transposed = t.input[0], True
            if source not in inits or np.prod(inits[source].dims) <= 64:
                continue
            reads[source] = reads.get(source, 0) + 1
            if reads[source] == 1 and not transposed:
                continue  # the first plain reader keeps the initializer itself
            array = numpy_helper.to_array(inits[source])
            copy = numpy_helper.from_array(np.ascontiguousarray(array.T if transposed else array),
                                           f"{source}__reader{reads[source]}")
            m.graph.initializer.append(copy)
            node.input[i] = copy.name
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    dead = [n for n in m.graph.node if n.op_type == "Transpose" and not set(n.output) & used]
    for n in dead:
        m.graph.node.remove(n)
    used = {i for n in m.graph.node for i in n.input} | {o.name for o in m.graph.output}
    for t in [t for t in m.graph.initializer if t.name not in used]:
        m.graph.initializer.remove(t)
    onnx.save(m, str(dst))


def _merge_quantized_twins(path: Path) -> None:
    """Store the identical quantized copies `_unshare_weights` led to once again (one initializer per weight)."""
    import onnx_ir as ir

    from skrr_compile.deploy.onnx import _merge_duplicate_initializers

    model = ir.load(str(path))
    if _merge_duplicate_initializers(model):
        ir.save(model, str(path))


def _quantize_file(src: Path, dst: Path, scheme: str, group_size: int, embeddings: bool) -> None:
    if scheme not in ("int8", "int8-dynamic", "int4"):
        raise QuantizationError(
            f"ONNX export of scheme {scheme!r} is not available: ONNX Runtime has no fp8 weight-only CPU kernel; "
            "quantize with int8, int8-dynamic or int4 to export ONNX"
        )
    drop_log_records("root", "Please consider to run pre-processing", "")  # ORT's advice, on every call
    ops = ("MatMul", "Gather") if embeddings else ("MatMul",)
    unshared = src.with_name("unshared.onnx")
    _unshare_weights(src, unshared, ops)
    if scheme in ("int8", "int8-dynamic"):
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(unshared), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(ops))
    else:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(str(unshared)), block_size=group_size, is_symmetric=True,
                                 op_types_to_quantize=ops)
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=False)
    _merge_quantized_twins(dst)


def export_quantized_onnx(model, path: str | Path, *, verify: bool = False, provider: str = "cpu",
                          tolerance: float | None = None, overwrite: bool = True) -> OnnxExportReport:
    """Export a quantized PrunedEncoder (or a directory saved from one) to a quantized ONNX file."""
    pruned = _as_pruned(model)
    q = pruned.info.get("quantization")
    if not q:
        raise QuantizationError("this model is not quantized: export it with export_onnx, or quantize it first")
    scheme = q["scheme"]
    if scheme not in TOLERANCE:
        _quantize_file(Path(), Path(), scheme, 0, False)  # raises the one-line refusal
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        dense = dequantized(pruned)
        report = export_onnx(dense, tmp / "fp32.onnx", external_data=False)
        _quantize_file(tmp / "fp32.onnx", tmp / path.name, scheme, int(q.get("group_size", 32)),
                       bool(q.get("embeddings")))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.path, report.data_path = str(path), None
    report.file_bytes = path.stat().st_size
    report.initializer_bytes, report.weight_bytes = _initializers(path)
    report.dtype = f"{scheme} (onnxruntime)"
    report.merged_initializers = _shared_initializers(path)
    if verify:
        report.verification = verify_quantized_onnx(path, pruned, tolerance or TOLERANCE[scheme], provider=provider)
    return report


def _initializers(path: Path) -> tuple[int, int]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    total = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer)
    weights = sum(numpy_helper.to_array(t).nbytes for t in m.graph.initializer if np.prod(t.dims) > 1)
    return int(total), int(weights)


def _shared_initializers(path: Path) -> int:
    """Weight initializers read by more than one node (re-used sub-blocks: stored once, read twice)."""
    import onnx

    m = onnx.load(str(path))
    names = {t.name for t in m.graph.initializer if np.prod(t.dims) > 64}
    reads: dict[str, int] = {}
    for node in m.graph.node:
        for i in node.input:
            if i in names:
                reads[i] = reads.get(i, 0) + 1
    return sum(1 for c in reads.values() if c > 1)


def verify_quantized_onnx(path, pruned: PrunedEncoder, tolerance: float, shapes=VERIFY_SHAPES,
                          provider: str = "cpu", seed: int = 1234) -> dict:
    """Relative L2 error of every output against the quantized torch model at unseen shapes; raise past it."""
    session, used = onnx_session(path, provider)
    names = [o.name for o in session.get_outputs()]
    feeds = [i.name for i in session.get_inputs()]
    checks, failures = [], []
    for k, (batch, seq) in enumerate(shapes):
        ids, mask = _example_inputs(pruned, (batch, seq), seed + k)
        feed = {"input_ids": ids.cpu().numpy()}
        if "attention_mask" in feeds:
            feed["attention_mask"] = mask.cpu().numpy()
        got = session.run(None, feed)
        with torch.no_grad():
            ref_out = pruned(ids, attention_mask=mask, return_dict=True)
        for name, value in zip(names, got):
            ref = getattr(ref_out, name).detach().float().cpu().numpy()
            rel = float(np.linalg.norm(value - ref) / max(np.linalg.norm(ref), 1e-12))
            ok = bool(np.isfinite(value).all()) and rel <= tolerance
            checks.append({"output": name, "shape": [batch, seq], "rel_l2_err": rel, "ok": ok})
            if not ok:
                failures.append(f"{name} at {(batch, seq)}: relative error {rel:.3g} > {tolerance:g}")
    if failures:
        raise OnnxVerificationError(f"{path}: onnxruntime ({used}) differs from the quantized torch model: "
                                    + "; ".join(failures))
    return {"provider": used, "tolerance": tolerance, "checks": checks,
            "max_rel_err": max(c["rel_l2_err"] for c in checks), "ok": True}
