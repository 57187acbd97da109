"""The package layout: no import cycles (module-level or inside functions), the public API's verbs."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
from pathlib import Path

import pytest

import skrr_compile as skrr

ROOT = Path(__file__).resolve().parents[1]


def source_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from the source tree."""
    mods = {}
    for base, prefix in ((ROOT / "skrr_compile", "skrr_compile"), (ROOT / "passes", "skrr_compile.passes"),
                         (ROOT / "skrr_kernels", "skrr_compile.kernels")):
        for f in base.rglob("*.py"):
            if prefix == "skrr_compile" and f.relative_to(base).parts[0] in ("passes", "kernels"):
                continue
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = f
    return mods


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports, anywhere in its body (functions included)."""
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                # `from pkg import sub` imports the submodule `pkg.sub` where one exists
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
            for t in targets:
                if t in modules and t != name:
                    edges[name].add(t)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    modules = source_modules()
    assert {"skrr_compile.core.trace", "skrr_compile.blocksearch.run", "skrr_compile.magnitude.prune",
            "skrr_compile.deploy.onnx", "skrr_compile.cli.main", "skrr_compile.passes.partition",
            "skrr_compile.kernels.dispatch", "skrr_compile.utils.files"} <= set(modules)
    edges = import_edges(modules)
    assert "skrr_compile.core.trace" in edges["skrr_compile.core.encoder"]  # the walk sees real edges
    found = cycles(edges)
    assert not found, f"import cycles: {found}"


def test_lower_layers_never_import_higher_ones():
    order = ["passes", "kernels", "utils", "core", "blocksearch", "magnitude", "deploy", "cli"]
    rank = {name: i for i, name in enumerate(order)}
    bad = []
    for mod, deps in import_edges(source_modules()).items():
        layer = mod.split(".")[1] if mod.count(".") else None
        for d in deps:
            dlayer = d.split(".")[1] if d.count(".") else None
            if layer in rank and dlayer in rank and rank[dlayer] > rank[layer]:
                bad.append(f"{mod} -> {d}")
            if layer in rank and d == "skrr_compile":
                bad.append(f"{mod} -> skrr_compile (the public namespace imports everything)")
    assert not bad, bad


def test_every_module_has_a_one_line_docstring():
    for name, path in source_modules().items():
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and doc.splitlines()[0].strip(), f"{name} ({path}) has no docstring"


def test_public_api_lists_the_verbs_first_and_resolves():
    verbs = ["trace", "search", "apply", "save", "load", "magnitude_prune", "export_onnx", "prune_pipeline"]
    assert skrr.__all__[: len(verbs)] == verbs
    for name in skrr.__all__:
        assert getattr(skrr, name) is not None, name
    assert skrr.search is importlib.import_module("skrr_compile.blocksearch.run").search
    assert callable(skrr.search)


@pytest.mark.parametrize("config", [
    skrr.Plan(skip=[1, 3], reuse={3: 5}, method="skrr", order=(3, 1), scores=(0.5, 0.25)),
    skrr.MagnitudeConfig(sparsity=0.475, criterion="wanda"),
    skrr.MagnitudeConfig(pattern="2:4", exclude=("*.mlp.*",), include_conv=True),
])
def test_configs_are_frozen_and_round_trip_through_json(config):
    assert dataclasses.is_dataclass(config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, dataclasses.fields(config)[0].name, None)
    back = type(config).from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config
