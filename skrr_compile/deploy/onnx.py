"""ONNX export of a pruned encoder (torch.onnx.export, dynamo=True) and its verification with onnxruntime.

    report = skrr.export_onnx(pruned, "encoder.onnx", verify=True)     # or a directory saved by skrr.save

* dynamic `batch_size` / `sequence_length` axes; inputs `input_ids`, `attention_mask`; outputs named as the HF
  output fields (`last_hidden_state`, `pooler_output` / `text_embeds`, `hidden_states.{i}` on request), the
  names optimum gives them;
* weights that re-use shares are one initializer (checked: identical initializers are merged), so the
  file's weight bytes equal the pruned model's unique parameter bytes;
* external-data format (`<file>.data`) above 1.5 GiB of weights, or when asked;
* `fp16=True` re-traces the architecture at float16 (HF's fp16-only code paths included) and exports that
  (T5 at fp16 waits on the core: HF clamps fp16 activations between a layer's residual adds, and the
  partition pass does not follow the hidden state through that clamp yet);
* `verify=True` runs onnxruntime on fresh inputs at two shapes the export never saw and raises
  `OnnxVerificationError` past the tolerance.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from skrr_compile.core.encoder import PrunedEncoder
from skrr_compile.utils.quiet import dependency_warnings_silenced
from skrr_compile.utils.tensors import bind_tensors, named_tensors, retarget_devices

INPUT_NAMES = ("input_ids", "attention_mask")
BATCH_AXIS, SEQUENCE_AXIS = "batch_size", "sequence_length"
EXTERNAL_DATA_THRESHOLD = 1536 * 1024 * 1024  # torch.onnx's own threshold; protobuf's hard limit is 2 GiB
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2)}  # (atol, rtol) against fp32 torch
VERIFY_SHAPES = ((1, 7), (3, 13))  # never the export shape (2, 8)
EXPORT_SHAPE = (2, 8)
PROVIDERS = ("auto", "cpu", "cuda")


class OnnxVerificationError(RuntimeError):
    """onnxruntime's outputs differ from the pruned torch model's past the tolerance."""


class ProviderError(RuntimeError):
    """The requested onnxruntime execution provider cannot be used here."""


@dataclass
class OnnxExportReport:
    path: str
    data_path: str | None  # external-data file, if any
    file_bytes: int  # .onnx plus external data
    initializer_bytes: int  # every initializer
    weight_bytes: int  # floating-point initializers with more than one element (the parameters)
    param_bytes: int  # the pruned model's unique parameter bytes, in the exported dtype
    dtype: str
    inputs: list[str]
    outputs: list[str]
    merged_initializers: int = 0  # duplicates found and stored once
    export_seconds: float = 0.0
    verification: dict | None = None

    @property
    def size_ratio(self) -> float:
        """File size over the unique parameter bytes (1.0 = nothing but the weights)."""
        return self.file_bytes / self.param_bytes if self.param_bytes else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "size_ratio": self.size_ratio}


# ---------------------------------------------------------------------------------------------------
# the module that is exported
# ---------------------------------------------------------------------------------------------------
class _ExportWrapper(nn.Module):
    """input_ids (+ attention_mask) -> a flat tuple of the named outputs."""

    def __init__(self, gm: fx.GraphModule, fields: list[str], hidden_states: bool, with_mask: bool):
        super().__init__()
        self.gm = gm
        self.fields = list(fields)
        self.hidden_states = hidden_states
        self.with_mask = with_mask

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.gm(input_ids, attention_mask=attention_mask.to(input_ids.dtype))
        results = [getattr(out, f) for f in self.fields]
        if self.hidden_states:
            results.extend(out.hidden_states)
        return tuple(results)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    with dependency_warnings_silenced():  # torch's pytree LeafSpec deprecation, on every deepcopy
        new = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # parameters shared, graph copied
    for key in ("_in_spec", "_out_spec"):
        if hasattr(gm, key):
            setattr(new, key, getattr(gm, key))
    return new


def make_contiguous_explicit(gm: fx.GraphModule) -> int:
    """`aten.contiguous` -> `aten.clone(memory_format=contiguous)`, in place; returns how many.

    The ONNX exporter decomposes SDPA into ops whose output is not contiguous, while `contiguous` was
    traced as a no-op on SDPA's contiguous output; the `view` that follows then fails
    (pytorch/pytorch#136543). A clone always yields a contiguous tensor and becomes an ONNX Identity.
    """
    count = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.contiguous.default:
            fmt = node.kwargs.get("memory_format", torch.contiguous_format)
            if len(node.args) > 1:
                fmt = node.args[1]
            with gm.graph.inserting_after(node):
                clone = gm.graph.call_function(torch.ops.aten.clone.default, (node.args[0],), {"memory_format": fmt})
            clone.meta = dict(node.meta)
            node.replace_all_uses_with(clone)
            gm.graph.erase_node(node)
            count += 1
    gm.recompile()
    return count


def graph_for_dtype(pruned: PrunedEncoder, dtype: torch.dtype) -> fx.GraphModule:
    """A copy of the pruned graph at `dtype`: re-traced from the config (HF's dtype branches), tensors cast.

    The pruned model itself is left untouched; tensors shared by re-use stay shared.
    """
    if dtype == pruned.dtype and pruned.dtype == getattr(pruned, "_graph_dtype", pruned.dtype):
        return _copy_graph_module(pruned.graph_module)
    from skrr_compile.core.rebuild import build_graph_module
    from skrr_compile.passes.partition import UnsupportedModelError

    try:
        gm = build_graph_module(pruned.config, pruned.architecture, pruned.plan, dtype=dtype)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(
            f"re-tracing {pruned.architecture} at {str(dtype).removeprefix('torch.')} failed, so it cannot be "
            f"exported in that dtype: {e}"
        ) from e
    cast: dict[int, torch.Tensor] = {}
    tensors = {}
    for name, t in named_tensors(pruned.graph_module).items():
        if id(t) not in cast:
            cast[id(t)] = t.detach().to(dtype) if t.is_floating_point() else t
        tensors[name] = cast[id(t)]
    bind_tensors(gm, tensors)
    retarget_devices(gm, pruned.device)
    return gm


def _example_inputs(pruned: PrunedEncoder, shape, seed: int, padded: bool = True):
    vocab = int(getattr(pruned.config, "vocab_size", 100) or 100)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=gen)
    mask = torch.ones_like(ids)
    if padded and shape[0] > 1:  # rows of different lengths, the first one full
        for row in range(1, shape[0]):
            mask[row, max(1, shape[1] - 2 * row) :] = 0
    return ids.to(pruned.device), mask.to(pruned.device)


def _max_len(pruned) -> int | None:
    return getattr(pruned.config, "max_position_embeddings", None)


def output_fields(pruned: PrunedEncoder) -> tuple[list[str], int]:
    """The HF output field names (in HF's order) and the number of hidden states the model returns."""
    ids, mask = _example_inputs(pruned, (1, 4), 0, padded=False)
    with torch.no_grad():
        out = pruned(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
    fields = [k for k in out.keys() if k not in ("hidden_states", "attentions")]
    n_hidden = len(out.hidden_states) if getattr(out, "hidden_states", None) is not None else 0
    return fields, n_hidden


# ---------------------------------------------------------------------------------------------------
# post-processing of the ONNX IR
# ---------------------------------------------------------------------------------------------------
def _merge_duplicate_initializers(model) -> int:
    """Store identical initializers once (a safety net: constant folding must not duplicate shared weights)."""
    import onnx_ir as ir

    graph = model.graph
    groups: dict[tuple, list] = {}
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.size < 2:
            continue
        groups.setdefault((str(tensor.dtype), tuple(tensor.shape)), []).append(value)
    merged = 0
    for values in groups.values():
        if len(values) < 2:
            continue
        kept: list[tuple[object, np.ndarray]] = []
        for value in values:
            arr = np.asarray(value.const_value.numpy()).reshape(-1)
            twin = next((k for k, a in kept if _same_values(a, arr)), None)
            if twin is None:
                kept.append((value, arr))
                continue
            if value in graph.outputs or twin in graph.outputs:
                continue
            ir.convenience.replace_all_uses_with(value, twin)
            graph.initializers.pop(value.name)
            merged += 1
    return merged


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal flat arrays; a short prefix first, so distinct weights cost almost nothing to tell apart."""
    return np.array_equal(a[:256], b[:256]) and np.array_equal(a, b)


def _strip_node_metadata(model) -> None:
    """Drop the exporter's per-node debug strings (stack traces, FX node text): about 1 % of a small file."""
    for node in model.graph.all_nodes():
        node.metadata_props.clear()
    for function in model.functions.values():
        for node in function:
            node.metadata_props.clear()


def _initializer_bytes(model) -> tuple[int, int]:
    import onnx_ir as ir

    floating = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
    total = weights = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        total += tensor.nbytes
        if tensor.size > 1 and tensor.dtype in floating:
            weights += tensor.nbytes
    return total, weights


# ---------------------------------------------------------------------------------------------------
# onnxruntime
# ---------------------------------------------------------------------------------------------------
def onnx_session(path: str | Path, provider: str = "auto", threads: int | None = None):
    """An onnxruntime InferenceSession on `provider` ("auto": CUDA when usable, else CPU).

    onnxruntime-gpu without a usable CUDA silently falls back to CPU: "auto" warns about it, "cuda" raises
    ProviderError, as it does when this onnxruntime has no CUDA provider at all.
    Returns (session, provider actually used).
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    available = ort.get_available_providers()
    cuda = "CUDAExecutionProvider"
    if provider == "cuda" and cuda not in available:
        raise ProviderError(
            f"the CUDA provider was asked for, but this onnxruntime {ort.__version__} has none (providers: "
            f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime (never both) on a "
            "machine with CUDA, or use provider='cpu'"
        )
    providers = [cuda, "CPUExecutionProvider"] if provider != "cpu" and cuda in available else ["CPUExecutionProvider"]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=providers)
    used = session.get_providers()
    if cuda in providers and cuda not in used:
        msg = (
            "onnxruntime-gpu is installed but could not use CUDA (no GPU, or CUDA/cuDNN libraries not found); "
            "running on the CPU provider"
        )
        if provider == "cuda":
            raise ProviderError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    return session, used[0]


def verify_onnx(
    path: str | Path,
    pruned: PrunedEncoder,
    *,
    with_mask: bool = True,
    fp16: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    shapes=VERIFY_SHAPES,
    provider: str = "auto",
    seed: int = 1234,
) -> dict:
    """Run the ONNX file and the pruned torch model (fp32) on fresh inputs; raise past the tolerance.

    Every output of the file is compared elementwise, |ort - torch| <= atol + rtol * |torch|, at each of
    `shapes` (rows of different lengths; `with_mask=False`: all-ones masks, for input_ids-only files).
    """
    default_atol, default_rtol = TOLERANCES[torch.float16 if fp16 else torch.float32]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    session, used = onnx_session(path, provider)
    names = [o.name for o in session.get_outputs()]
    feed_names = [i.name for i in session.get_inputs()]
    limit = _max_len(pruned)
    checks, failures = [], []
    for k, (batch, seq) in enumerate(shapes):
        seq = min(seq, limit) if limit else seq
        ids, mask = _example_inputs(pruned, (batch, seq), seed + k)
        if not with_mask:
            mask = torch.ones_like(mask)
        feed = {"input_ids": ids.cpu().numpy()}
        if "attention_mask" in feed_names:
            feed["attention_mask"] = mask.cpu().numpy()
        got = session.run(None, feed)
        with torch.no_grad():
            ref_out = pruned(ids, attention_mask=mask, output_hidden_states=True, return_dict=True)
        for name, value in zip(names, got):
            if name.startswith("hidden_states."):
                ref = ref_out.hidden_states[int(name.split(".")[1])]
            else:
                ref = getattr(ref_out, name)
            ref = ref.detach().float().cpu().numpy()
            value = np.asarray(value).astype(np.float32)
            if value.shape != ref.shape:
                failures.append(f"{name} at {(batch, seq)}: shape {value.shape} != torch {ref.shape}")
                continue
            err = np.abs(value - ref)
            bound = atol + rtol * np.abs(ref)
            finite = bool(np.isfinite(value).all())
            ok = finite and bool((err <= bound).all())
            checks.append(
                {"output": name, "shape": [batch, seq], "max_abs_err": float(err.max()) if err.size else 0.0,
                 "max_abs_ref": float(np.abs(ref).max()) if ref.size else 0.0, "ok": ok}
            )
            if not ok:
                worst = float(err.max()) if finite else float("nan")
                failures.append(
                    f"{name} at (batch, seq)={(batch, seq)}: max |onnx - torch| = {worst:.3g} "
                    f"(tolerance {atol:g} + {rtol:g}*|torch|){'' if finite else ', non-finite values'}"
                )
    result = {"provider": used, "atol": atol, "rtol": rtol, "checks": checks,
              "max_abs_err": max((c["max_abs_err"] for c in checks), default=0.0), "ok": not failures}
    if failures:
        raise OnnxVerificationError(
            f"{path}: onnxruntime ({used}) does not match the pruned torch model:\n  " + "\n  ".join(failures)
        )
    return result


# ---------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------
def _as_pruned(model) -> PrunedEncoder:
    if isinstance(model, PrunedEncoder):
        return model
    if isinstance(model, (str, os.PathLike)):
        from skrr_compile.core.storage import load, read_model_meta

        read_model_meta(model)  # NotAPrunedModelError with a clear message
        return load(model)
    raise TypeError(
        f"export_onnx expects a PrunedEncoder (skrr.apply / skrr.load) or a directory saved by skrr.save, got "
        f"{type(model).__name__}; for the dense model use skrr.apply(model, skrr.Plan())"
    )


def export_onnx(
    model,
    path: str | Path,
    *,
    fp16: bool = False,
    verify: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    provider: str = "auto",
    output_hidden_states: bool = False,
    attention_mask: bool = True,
    external_data: bool | None = None,
    opset: int | None = None,
    optimize: bool = True,
    keep_debug_metadata: bool = False,
    overwrite: bool = True,
) -> OnnxExportReport:
    """Export a pruned encoder (or a directory saved by skrr.save) to an ONNX file.

    `attention_mask=False` exports an `input_ids`-only model (the mask is all ones), as Stable Diffusion
    calls CLIP. `external_data=None` picks the external-data format above 1.5 GiB of weights.
    """
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    pruned = _as_pruned(model)
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"the ONNX file name must end in .onnx, got {str(path)!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True")
    dtype = torch.float16 if fp16 else torch.float32
    start = time.perf_counter()

    fields, n_hidden = output_fields(pruned)
    gm = graph_for_dtype(pruned, dtype)
    make_contiguous_explicit(gm)
    wrapper = _ExportWrapper(gm, fields, output_hidden_states, attention_mask).eval()
    limit = _max_len(pruned)
    batch, seq = EXPORT_SHAPE
    seq = min(seq, limit) if limit else seq
    ids, mask = _example_inputs(pruned, (batch, seq), 0, padded=False)
    batch_dim = torch.export.Dim(BATCH_AXIS, min=1, max=65536)
    seq_dim = torch.export.Dim(SEQUENCE_AXIS, min=1, max=limit or 65536)
    axes = {0: batch_dim, 1: seq_dim}
    input_names = list(INPUT_NAMES if attention_mask else INPUT_NAMES[:1])
    args = (ids, mask) if attention_mask else (ids,)
    dynamic_shapes = {"input_ids": axes, "attention_mask": axes} if attention_mask else {"input_ids": axes}
    output_names = list(fields)
    if output_hidden_states:
        output_names += [f"hidden_states.{i}" for i in range(n_hidden)]
    with warnings.catch_warnings(), torch.no_grad(), dependency_warnings_silenced():  # + torchvision log lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            optimize=optimize,
            verbose=False,
        )
    model_ir = program.model
    merged = _merge_duplicate_initializers(model_ir)
    if not keep_debug_metadata:
        _strip_node_metadata(model_ir)
    plan = pruned.plan
    model_ir.metadata_props.update(
        {
            "producer": "skrr-compile",
            "skrr.architecture": pruned.architecture,
            "skrr.plan": json.dumps({"skip": list(plan.skip), "reuse": {str(k): v for k, v in plan.reuse.items()},
                                     "method": plan.method, "fingerprint": plan.fingerprint}),
            "skrr.dtype": str(dtype).removeprefix("torch."),
        }
    )
    init_bytes, weight_bytes = _initializer_bytes(model_ir)
    external = external_data if external_data is not None else init_bytes > EXTERNAL_DATA_THRESHOLD
    data_path = _save_atomically(program, path, external)
    elapsed = time.perf_counter() - start

    elem = torch.tensor([], dtype=dtype).element_size()
    param_bytes = sum(t.numel() * elem for t in _unique_params(pruned))
    report = OnnxExportReport(
        path=str(path),
        data_path=str(data_path) if data_path else None,
        file_bytes=path.stat().st_size + (data_path.stat().st_size if data_path else 0),
        initializer_bytes=init_bytes,
        weight_bytes=weight_bytes,
        param_bytes=param_bytes,
        dtype=str(dtype).removeprefix("torch."),
        inputs=input_names,
        outputs=output_names,
        merged_initializers=merged,
        export_seconds=elapsed,
    )
    if verify:
        report.verification = verify_onnx(
            path, pruned, with_mask=attention_mask, fp16=fp16, atol=atol, rtol=rtol, provider=provider,
        )
    return report


def _unique_params(pruned: PrunedEncoder) -> list[torch.Tensor]:
    from skrr_compile.passes.graph_utils import unique_tensors

    return unique_tensors(pruned.graph_module.parameters())


def _save_atomically(program, path: Path, external: bool) -> Path | None:
    """Save into a temporary directory (so external data references the final name), then move in place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        program.save(tmp / path.name, external_data=external)
        written = sorted(tmp.iterdir())
        data = [p for p in written if p.name != path.name]
        stale = path.with_name(path.name + ".data")
        if not data and stale.exists():
            stale.unlink()
        for p in data:
            os.replace(p, path.with_name(p.name))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path.with_name(data[0].name) if data else None
