"""CLI: quantize (a pruned directory or a dense model -> a quantized saved model, optionally its ONNX file)."""

from __future__ import annotations

from pathlib import Path

from skrr_compile.cli.main import CLIError, check_out_dir, print_json
from skrr_compile.core.quantize import SCHEMES, QuantConfig, QuantizationError, check_runnable, deployed_bytes


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a pruned model directory (or a dense model) and save it")
    p.add_argument("model", help="a directory saved by prune/apply, a HF encoder directory, a .gguf file or 'builtin'")
    add_quant_args(p, flag="--scheme", default="int8")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--onnx", help="also export ONNX Runtime's quantized model to this .onnx file (verified)")
    p.add_argument("--json", action="store_true", help="print the byte accounting as JSON")
    p.set_defaults(func=cmd_quantize)


def add_quant_args(p, flag: str = "--quantize", default=None, aware: str | None = None) -> None:
    """The quantization options; `aware` (search / prune): the help of --quantize-aware, which is added."""
    g = p.add_argument_group("quantization (torchao; pip install 'skrr-compile[quant]')")
    g.add_argument(flag, dest="quantize", default=default,
                   help=f"scheme: {', '.join(SCHEMES)} (int4: 4-bit in the file and in ONNX Runtime's MatMulNBits)")
    if aware:
        g.add_argument("--quantize-aware", action="store_true", help=aware)
    g.add_argument("--group-size", type=int, default=32, help="int4: values per scale")
    g.add_argument("--quantize-embeddings", action="store_true", help="quantize the embedding tables too")
    g.add_argument("--keep", action="append", default=[],
                   help="module paths kept in full precision (glob over the path, or re:REGEX); repeatable")


def quant_config(args) -> QuantConfig | None:
    if not args.quantize:
        return None
    try:
        cfg = QuantConfig(args.quantize, group_size=args.group_size, embeddings=args.quantize_embeddings,
                          keep=tuple(args.keep))
        check_runnable(cfg)
    except QuantizationError as e:
        raise CLIError(str(e)) from e
    return cfg


def cmd_quantize(args) -> int:
    from skrr_compile.core.checkpoints import is_gguf, load_encoder, load_tokenizer, resolve_model_path
    from skrr_compile.core.quantize import quantize
    from skrr_compile.core.storage import MODEL_FILE, load, save

    cfg = quant_config(args)
    out = check_out_dir(args.out, may_exist_nonempty=args.overwrite)
    path = resolve_model_path(args.model)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        model = load(path)
    else:
        model = load_encoder(args.model)
    if is_gguf(path):
        print("note: the GGUF weights were quantized once and dequantized on load; quantizing again stacks the two "
              "quantization errors")
    try:
        q = quantize(model, cfg)
    except QuantizationError as e:
        raise CLIError(str(e)) from e
    save(q, out, tokenizer=load_tokenizer(path), overwrite=args.overwrite)
    disk = (Path(out) / "model.safetensors").stat().st_size
    acc = {"scheme": cfg.scheme, "bytes_ram": q.num_bytes, "bytes_full_precision": model.num_bytes
           if hasattr(model, "num_bytes") else None, "bytes_disk": disk,
           "bytes_ideal_file": deployed_bytes(q.graph_module, None, packed=True)["total"],
           "quantized_tensors": len(q.info["quantization"]["modules"]), "kept": q.info["quantization"]["kept"]}
    if args.onnx:
        from skrr_compile.deploy.onnx_quant import export_quantized_onnx

        try:
            report = export_quantized_onnx(q, args.onnx, verify=True)
        except (QuantizationError, RuntimeError) as e:  # + OnnxVerificationError: one line
            raise CLIError(str(e)) from e
        acc.update(bytes_onnx=report.file_bytes, onnx_max_rel_err=report.verification["max_rel_err"])
    if args.json:
        print_json(acc)
    else:
        print(f"quantized ({cfg.scheme}) -> {out}: {acc['quantized_tensors']} tensors, "
              f"{acc['bytes_ram']:,} bytes in memory, {disk:,} on disk"
              + (f", {acc['bytes_onnx']:,} in ONNX ({args.onnx})" if args.onnx else ""))
    return 0


def _gb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e9:.2f} GB)"


def deployed_table(gm, group_size: int = 32) -> dict[str, int]:
    """Exact deployed bytes of `gm` per scheme (weights + scales + zero points; int4 packed as saved), keyed
    "none", "<scheme>" (embeddings full precision) and "<scheme>+embeddings". Works on a meta graph."""
    from skrr_compile.core.quantize import scheme_table

    return {"none" if r["scheme"] == "none" else r["scheme"] + ("+embeddings" if r["embeddings"] else ""): r["total"]
            for r in scheme_table(gm, group_size=group_size)}


def deployed_lines(table: dict[str, int]) -> list[str]:
    """The lines inspect and the report print for a `deployed_table`."""
    lines = [f"deployed size (exact): full precision {_gb(table['none'])}"]
    for scheme in SCHEMES:
        lines.append(f"deployed size {scheme} (exact): {_gb(table[scheme])}; embeddings quantized too: "
                     f"{_gb(table[scheme + '+embeddings'])}")
    return lines


def estimated_lines(graph, sparsity: float, config: QuantConfig | None, group_size: int = 32) -> list[str]:
    """The dry run's deployed size of the pruned model at `sparsity` for each scheme (or `config`'s only):
    exact bytes of the dense model minus the target's removed parameters at the sub-blocks' mean bytes per
    parameter under the scheme (which sub-blocks go is the search's call; `inspect` of the pruned directory
    gives the figure to the byte)."""
    import math

    from skrr_compile.core.quantize import scheme_bytes, select_tensors
    from skrr_compile.utils.tensors import named_tensors

    gm = graph.graph_module
    tensors = named_tensors(gm)
    owned = {n for b in graph.blocks for n in b.params}
    removed = math.ceil(sparsity * graph.total_params)
    if config is None:
        configs = [None] + [QuantConfig(s, group_size=group_size, embeddings=e) for s in SCHEMES for e in (False, True)]
    else:  # the scheme asked for, with both embedding choices
        import dataclasses

        configs = [config, dataclasses.replace(config, embeddings=not config.embeddings)]
    lines = [f"deployed size at sparsity {sparsity} (about: {removed:,} parameters removed at the sub-blocks' mean "
             "bytes per parameter):"]
    for cfg in configs:
        dense = deployed_bytes(gm, cfg, packed=True)["total"]
        sel = select_tensors(gm, cfg) if cfg is not None else None
        seen, nbytes, params = set(), 0, 0
        for name in sorted(owned):
            t = tensors[name]
            if id(t) in seen:
                continue
            seen.add(id(t))
            params += t.numel()
            if sel is not None and name in sel.quantize:
                nbytes += scheme_bytes(t.shape, t.dtype, cfg, sel.quantize[name], packed=True)
            else:
                nbytes += t.numel() * t.element_size()
        est = round(dense - removed * nbytes / max(params, 1))
        label = "full precision" if cfg is None else cfg.scheme + (" (embeddings quantized too)" if cfg.embeddings
                                                                   else " (embeddings full precision)")
        lines.append(f"  {label}: about {est / 1e9:.2f} GB ({est:,} bytes; dense {dense:,})")
    return lines
