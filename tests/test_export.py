"""ONNX export: onnxruntime against the pruned torch model at shapes the export never saw, file size
against the unique parameter bytes (computed here from the dense model and the block table), names,
fp16, external data, verification failures, providers and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
pytest.importorskip("sentencepiece")

from pipeline_factories import clip_encoder, t5_encoder  # noqa: E402

import skrr_compile as skrr  # noqa: E402
from skrr_compile import cli  # noqa: E402
from skrr_compile.core.storage import NotAPrunedModelError  # noqa: E402
from skrr_compile.deploy.onnx import (  # noqa: E402
    EXPORT_SHAPE,
    OnnxVerificationError,
    ProviderError,
    export_onnx,
    onnx_session,
    verify_onnx,
)

T5_PLAN = skrr.Plan(skip=[2, 3, 4], reuse={2: 0, 3: 1})  # 3 layers: attn 1 and FFN 1 re-use layer 0's, attn 2 skipped


def _fetch_attr(gm, name):
    obj = gm
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _inputs(vocab, batch, seq, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, seq - row :] = 0
    return ids, mask


@pytest.fixture(scope="module")
def t5_export(tmp_path_factory):
    """A T5 big enough that weights dominate the file (d_model 256), pruned with skips and re-use."""
    model = t5_encoder(d_model=256, layers=3, seed=5)
    graph = skrr.trace(model)
    pruned = skrr.apply(graph, T5_PLAN)
    path = tmp_path_factory.mktemp("onnx") / "t5.onnx"
    report = export_onnx(pruned, path, verify=True)
    return model, graph, pruned, path, report


def _unique_bytes_expected(graph, plan) -> int:
    """Dense unique parameter bytes minus the bytes every removed sub-block owns (re-use adds nothing)."""
    gm = graph.graph_module
    seen, dense = set(), 0
    for p in gm.parameters():
        if p.untyped_storage().data_ptr() not in seen:
            seen.add(p.untyped_storage().data_ptr())
            dense += p.numel() * p.element_size()
    removed = sum(
        _fetch_attr(gm, name).numel() * _fetch_attr(gm, name).element_size()
        for i in plan.skip for name in graph.blocks[i].params
    )
    return dense - removed


def test_onnxruntime_matches_torch_at_new_shapes(t5_export):
    model, _, pruned, path, report = t5_export
    v = report.verification
    assert v["ok"] and v["provider"] == "CPUExecutionProvider" and v["max_abs_err"] < 1e-4
    assert {tuple(c["shape"]) for c in v["checks"]} == {(1, 7), (3, 13)}
    # and independently, at two more shapes, with padding
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for k, (batch, seq) in enumerate([(2, 21), (5, 3)]):
        assert (batch, seq) != EXPORT_SHAPE
        ids, mask = _inputs(model.config.vocab_size, batch, seq, seed=100 + k)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = pruned(ids, attention_mask=mask).last_hidden_state.numpy()
            dense = model(ids, attention_mask=mask).last_hidden_state.numpy()
        assert got.shape == (batch, seq, 256)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        assert np.abs(ref - dense).max() > 1e-2  # the plan changes the output: the check is not vacuous


def test_file_holds_each_weight_once(t5_export):
    _, graph, pruned, path, report = t5_export
    expected = _unique_bytes_expected(graph, T5_PLAN)
    assert pruned.num_bytes == expected
    model = onnx.load(str(path))
    weights = [
        onnx.numpy_helper.to_array(t) for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1
    ]
    assert sum(w.nbytes for w in weights) == expected == report.weight_bytes == report.param_bytes
    for i, a in enumerate(weights):  # no weight twice (constant folding of a shared weight is merged back)
        assert not any(a.shape == b.shape and np.array_equal(a, b) for b in weights[i + 1 :])
    size = path.stat().st_size
    assert abs(size - expected) / expected < 0.02, f"file {size} B vs unique params {expected} B"
    assert report.file_bytes == size and report.data_path is None
    # the re-used layer-0 weights exist once (as stored or transposed by constant folding) though two layers read them
    for name in ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wo.weight"):
        w0 = _fetch_attr(graph.graph_module, name).detach().numpy()
        copies = sum(1 for w in weights for v in (w0, w0.T) if w.shape == v.shape and np.array_equal(w, v))
        assert copies == 1, name


def test_names_and_dynamic_axes(t5_export):
    *_, path, report = t5_export
    model = onnx.load(str(path))
    inputs = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert inputs == {"input_ids": ["batch_size", "sequence_length"], "attention_mask": ["batch_size", "sequence_length"]}
    assert outputs == {"last_hidden_state": ["batch_size", "sequence_length", 256]}
    assert report.inputs == ["input_ids", "attention_mask"] and report.outputs == ["last_hidden_state"]
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["skrr.architecture"] == "T5EncoderModel" and '"skip": [2, 3, 4]' in meta["skrr.plan"]


def test_verification_fails_loudly(t5_export):
    _, _, pruned, path, _ = t5_export
    with pytest.raises(OnnxVerificationError, match="last_hidden_state"):
        verify_onnx(path, pruned, atol=0.0, rtol=0.0)  # float rounding alone exceeds a zero tolerance
    weight = next(p for n, p in pruned.graph_module.named_parameters() if "DenseReluDense.wo" in n)
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.5)  # the torch model drifts away from the exported file
        with pytest.raises(OnnxVerificationError, match=r"max \|onnx - torch\|"):
            verify_onnx(path, pruned)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert verify_onnx(path, pruned)["ok"]


def test_clip_fp16_hidden_states(tmp_path):
    model = clip_encoder(32, layers=3, projection=16, seed=3)
    pruned = skrr.apply(model, skrr.Plan(skip=[1, 4], reuse={4: 2}))
    path = tmp_path / "clip16.onnx"
    path.with_name("clip16.onnx.data").write_bytes(b"stale weights of an earlier external-data export")
    report = export_onnx(pruned, path, fp16=True, verify=True, output_hidden_states=True)
    assert report.data_path is None and not path.with_name("clip16.onnx.data").exists(), "stale external data left"
    assert report.outputs == ["text_embeds", "last_hidden_state"] + [f"hidden_states.{i}" for i in range(4)]
    assert report.dtype == "float16" and report.weight_bytes == report.param_bytes == pruned.num_bytes // 2
    assert pruned.dtype == torch.float32  # the model itself was not converted
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = _inputs(model.config.vocab_size, 2, 9, seed=7)
    got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    with torch.no_grad():
        ref = pruned(ids, attention_mask=mask, output_hidden_states=True)
    assert got[0].dtype == np.float16
    np.testing.assert_allclose(got[0].astype(np.float32), ref.text_embeds.numpy(), atol=1e-2, rtol=1e-2)
    np.testing.assert_allclose(got[5].astype(np.float32), ref.hidden_states[3].numpy(), atol=1e-2, rtol=1e-2)
    assert report.verification["max_abs_err"] < 1e-2


def test_cli_input_ids_only_external_data(tmp_path, capsys):
    model = clip_encoder(32, layers=2, seed=4)
    pruned = skrr.apply(model, skrr.Plan(skip=[1]))
    skrr.save(pruned, tmp_path / "pruned")
    out = tmp_path / "out" / "enc.onnx"
    code = cli.main(["export-onnx", str(tmp_path / "pruned"), str(out), "--verify", "--external-data",
                     "--no-attention-mask"])
    assert code == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "verified with onnxruntime" in text and "enc.onnx.data" in text
    assert "['input_ids']" in text and "['last_hidden_state', 'pooler_output']" in text
    data = out.with_name("enc.onnx.data")
    assert data.is_file() and out.stat().st_size < 0.5 * pruned.num_bytes  # the weights moved out
    assert data.stat().st_size + out.stat().st_size >= pruned.num_bytes  # (tiny ones may stay inline)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    ids, _ = _inputs(model.config.vocab_size, 3, 77, seed=9)
    got = session.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        ref = pruned(ids)  # no mask: all ones, as Stable Diffusion calls CLIP
    np.testing.assert_allclose(got[0], ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)


def test_bad_input(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(NotAPrunedModelError, match="skrr_model.json"):
        export_onnx(tmp_path / "hf", tmp_path / "x.onnx")
    assert cli.main(["export-onnx", str(tmp_path / "hf"), str(tmp_path / "x.onnx")]) == 2
    assert "not a pruned model" in capsys.readouterr().err
    assert cli.main(["export-onnx", str(tmp_path / "missing"), str(tmp_path / "x.onnx")]) == 2
    with pytest.raises(TypeError, match="skrr.apply"):
        export_onnx(t5_encoder(32, layers=1), tmp_path / "x.onnx")
    pruned = skrr.apply(t5_encoder(32, layers=1), skrr.Plan(skip=[1]))
    with pytest.raises(ValueError, match=".onnx"):
        export_onnx(pruned, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="provider"):
        export_onnx(pruned, tmp_path / "x.onnx", provider="tpu")
    assert not (tmp_path / "x.onnx").exists()


def test_providers(t5_export, monkeypatch):
    _, _, pruned, path, _ = t5_export
    if "CUDAExecutionProvider" in ort.get_available_providers():  # pragma: no cover - GPU machines
        session, used = onnx_session(path, "cuda")
        assert used == "CUDAExecutionProvider"
        return
    with pytest.raises(ProviderError, match="onnxruntime-gpu"):
        onnx_session(path, "cuda")
    with pytest.raises(ProviderError, match="CUDA"):
        verify_onnx(path, pruned, provider="cuda")
    # onnxruntime-gpu without usable CUDA: it lists the provider but the session falls back to CPU
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    ort.set_default_logger_severity(4)
    try:
        with pytest.warns(RuntimeWarning, match="could not use CUDA"):
            session, used = onnx_session(path, "auto")
        assert used == "CPUExecutionProvider"
        with pytest.raises(ProviderError, match="could not use CUDA"):
            onnx_session(path, "cuda")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert verify_onnx(path, pruned, provider="auto")["ok"]
    finally:
        ort.set_default_logger_severity(2)
    session, used = onnx_session(path, "cpu")
    assert used == "CPUExecutionProvider"


def test_t5_fp16_export(tmp_path):
    """HF T5 clamps fp16 activations between the residual adds of a layer: the partition follows the clamp."""
    pruned = skrr.apply(t5_encoder(32, layers=1, seed=8), skrr.Plan(skip=[1]))
    report = export_onnx(pruned, tmp_path / "t5_16.onnx", fp16=True, verify=True)
    assert report.dtype == "float16" and report.verification["ok"]


@pytest.mark.parametrize("fp16, external", [(True, False), (False, True), (True, True)])
def test_file_holds_each_weight_once_fp16_and_external_data(t5_export, tmp_path, fp16, external):
    """The dedup check of test_file_holds_each_weight_once, for fp16 and external-data exports (issue 14)."""
    _, graph, pruned, _, _ = t5_export
    path = tmp_path / "t5.onnx"
    report = export_onnx(pruned, path, fp16=fp16, external_data=external)
    assert (report.data_path is not None) == external
    dtype, np_dtype = (onnx.TensorProto.FLOAT16, np.float16) if fp16 else (onnx.TensorProto.FLOAT, np.float32)
    expected = _unique_bytes_expected(graph, T5_PLAN) // (2 if fp16 else 1)
    model = onnx.load(str(path))  # reads the external data too
    weights = [onnx.numpy_helper.to_array(t) for t in model.graph.initializer
               if t.data_type == dtype and np.prod(t.dims) > 1]
    assert sum(w.nbytes for w in weights) == expected == report.weight_bytes
    for i, a in enumerate(weights):
        assert not any(a.shape == b.shape and np.array_equal(a, b) for b in weights[i + 1 :])
    if external:
        data = Path(report.data_path)
        assert abs(data.stat().st_size - expected) / expected < 0.02  # the weights are in the .data file once
    for name in ("encoder.block.0.layer.0.SelfAttention.q.weight", "encoder.block.0.layer.1.DenseReluDense.wo.weight"):
        w0 = _fetch_attr(graph.graph_module, name).detach().numpy().astype(np_dtype)
        copies = sum(1 for w in weights for v in (w0, w0.T) if w.shape == v.shape and np.array_equal(w, v))
        assert copies == 1, name
