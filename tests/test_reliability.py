"""Reliability (issue 14): no silent wrong results, one-line errors on every path, nothing half-written."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


# --- torch.compile backend by name in a fresh interpreter -------------------------------------------------
def test_skrr_backend_by_name_in_a_fresh_interpreter():
    """torch finds "skrr" through the entry point and imports the module itself: no duplicate registration."""
    r = _fresh_python("""
        import sys, torch
        assert "skrr_compile" not in sys.modules
        from torch._dynamo import lookup_backend
        fn = lookup_backend("skrr")
        print(fn.__module__, fn.__name__)
        m = torch.nn.Linear(3, 3)
        f = torch.compile(m, backend="skrr", options={"plan": {"skip": []}, "inner": "eager"})
        x = torch.randn(2, 3)
        assert torch.equal(f(x), m(x))
        print("compiled")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "skrr_compile.deploy.compile_backend skrr_backend" in r.stdout
    assert "compiled" in r.stdout


def test_skrr_backend_registered_by_import_then_by_name():
    r = _fresh_python("""
        import torch
        import skrr_compile.deploy.compile_backend as cb
        from torch._dynamo import list_backends, lookup_backend
        assert "skrr" in list_backends()
        assert lookup_backend("skrr") is cb.skrr_backend
        cb.register()  # idempotent
        print("ok")
    """)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok" in r.stdout
