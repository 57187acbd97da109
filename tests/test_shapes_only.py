"""What needs shapes only allocates no weights (issue 23): `inspect` and `--dry-run` trace the encoder on the meta
device whether given a config.json, a directory (with or without weights) or a .gguf file; T5-family configs
saved with is_encoder_decoder=False resolve to the encoder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers as tf

import skrr_compile as skrr
from skrr_compile.cli.main import main

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu")  # T5-v1.1-XXL: 4,762,310,656 encoder params (README)
TINY_T5 = dict(vocab_size=99, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    cfg = tf.T5Config(**TINY_T5, feed_forward_proj="gated-gelu")
    cfg.save_pretrained(root / "config_dir")
    torch.manual_seed(0)
    tf.T5EncoderModel(cfg).save_pretrained(root / "weights_dir")
    out = {"config_file": root / "config_dir" / "config.json", "config_dir": root / "config_dir",
           "weights_dir": root / "weights_dir"}
    if all(__import__("importlib").util.find_spec(m) for m in ("gguf", "accelerate")):
        from factories import write_tiny_llama_gguf

        write_tiny_llama_gguf(root / "tiny-llama.Q8_0.gguf")
        out["gguf"] = root / "tiny-llama.Q8_0.gguf"
    (root / "p.txt").write_text("\n".join(f"a photo of cat number {i}" for i in range(6)))
    out["prompts"] = root / "p.txt"
    return out


@pytest.fixture
def traced(monkeypatch):
    """Every model the CLI traces, spied on at the trace call of inspect and of the dry run."""
    seen = []

    def spy(model):
        seen.append(model)
        return skrr.trace(model)

    monkeypatch.setattr("skrr_compile.cli.core.trace", spy)
    monkeypatch.setattr("skrr_compile.cli.search.trace", spy)
    return seen


def _dry_run(command, src, prompts):
    return main([command, str(src), "--prompts", str(prompts), "--sparsity", "0.3", "--max-length", "8",
                 "--device", "cpu", "--dry-run"])


@pytest.mark.parametrize("kind", ["config_file", "config_dir", "weights_dir", "gguf"])
def test_inspect_and_dry_run_trace_on_the_meta_device(sources, traced, kind, capsys):
    if kind not in sources:
        pytest.skip("gguf / accelerate not installed")
    src = sources[kind]
    assert main(["inspect", str(src), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert _dry_run("prune", src, sources["prompts"]) == 0  # search --dry-run takes the same path
    assert "estimated peak device memory:" in capsys.readouterr().out
    assert len(traced) == 2
    for model in traced:
        tensors = [*model.named_parameters(), *model.named_buffers()]
        assert tensors and {t.device.type for _, t in tensors} == {"meta"}, [n for n, t in tensors if not t.is_meta]
    if kind == "gguf":
        assert any(True for _ in traced[0].buffers())  # the rotary inv_freq buffer too
    if kind not in ("weights_dir", "gguf"):
        return
    # the table from shapes alone is the one of the loaded model (same fingerprint: names, shapes, counts)
    from skrr_compile.core.checkpoints import load_encoder

    real = skrr.trace(load_encoder(src))
    assert {t.device.type for t in real.graph_module.parameters()} == {"cpu"}
    assert (table["architecture"], table["total_params"], table["fingerprint"]) == (
        real.architecture, real.total_params, real.fingerprint)


def test_inspect_of_a_t5_xxl_config_dir_fits_a_3_gib_data_limit(tmp_path):
    """19 GB of fp32 weights used to be built at random; now the process never maps more than a few hundred MB.
    RLIMIT_DATA (private writable mappings: heap and anonymous mmap, where tensors live) is the measure:
    RLIMIT_AS also counts address space reserved but never written (thread stacks, malloc arenas, 0.6 GB for a
    bare `import torch`), which grows with the core count. The control asks for 4 GiB under the same limit."""
    tf.T5Config(**T5_XXL).save_pretrained(tmp_path / "t5xxl")
    code = ("import resource, sys; lim = 3 << 30; resource.setrlimit(resource.RLIMIT_DATA, (lim, lim)); "
            "from skrr_compile.cli import main; rc = main(sys.argv[1:]); import torch\n"
            "try:\n    torch.empty(1 << 30)\nexcept RuntimeError:\n    print('control: 4 GiB refused')\n"
            "sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, "inspect", str(tmp_path / "t5xxl")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first = out.stdout.splitlines()[0]
    assert first == "T5EncoderModel: 48 sub-blocks, 4,762,310,656 params (layers at encoder.block)"
    assert "control: 4 GiB refused" in out.stdout  # the limit does bite an allocation the size of the weights


@pytest.mark.parametrize("config_cls, want", [(tf.T5Config, "T5EncoderModel"), (tf.UMT5Config, "UMT5EncoderModel")])
def test_an_is_encoder_decoder_false_config_is_the_encoder(tmp_path, sources, capsys, config_cls, want):
    cfg = config_cls(**TINY_T5, is_encoder_decoder=False)
    cfg.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["is_encoder_decoder"] is False and not saved.get("architectures")
    assert main(["inspect", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.startswith(f"{want}: 4 sub-blocks")
    assert _dry_run("prune", tmp_path / "m", sources["prompts"]) == 0
    assert "estimated peak device memory:" in capsys.readouterr().out


def test_encoder_architecture_ignores_is_encoder_decoder_false():
    from skrr_compile.core.checkpoints import encoder_architecture

    for cfg, want in [(tf.T5Config(is_encoder_decoder=False), "T5EncoderModel"),
                      (tf.UMT5Config(is_encoder_decoder=False), "UMT5EncoderModel"),
                      (tf.MT5Config(is_encoder_decoder=False), "MT5EncoderModel"),
                      (tf.MT5Config(), "MT5EncoderModel"),
                      (tf.BertConfig(is_encoder_decoder=False), "BertModel")]:
        assert encoder_architecture(cfg) == want, cfg
