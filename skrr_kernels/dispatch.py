"""Backend selection for the discrepancy kernels: Triton on CUDA tensors, the torch reference elsewhere.

``SKRR_KERNELS`` (``auto`` | ``torch`` | ``triton``) overrides the automatic choice; an explicit
``backend=`` argument to a kernel wrapper overrides both. Triton kernels can run on CPU tensors only under
the Triton interpreter (``TRITON_INTERPRET=1`` set before ``skrr_compile.kernels`` is imported).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is an optional dependency; the torch reference always works.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "explain_backend",
    "interpreter_enabled",
    "last_backend",
    "record_backend",
    "resolve_backend",
    "select_backend",
    "triton_available",
]

ENV_VAR = "SKRR_KERNELS"
BACKENDS = ("torch", "triton")
_ENV_CHOICES = ("auto", *BACKENDS)

# op name -> backend that op used last (read by reports: "which path did the search take?").
_last_backend: dict[str, str] = {}


def triton_available() -> bool:
    return triton is not None


def interpreter_enabled() -> bool:
    """True when Triton kernels decorated from now on run under the interpreter (CPU tensors allowed)."""
    if triton is None:
        return False
    return bool(triton.knobs.runtime.interpret)


def _env_choice() -> str:
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in _ENV_CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(_ENV_CHOICES)}")
    return value


def _select(device: torch.device | str, requested: str) -> tuple[str, str]:
    """(backend, reason) for tensors on ``device`` when ``requested`` is auto|torch|triton."""
    device = torch.device(device)
    if requested == "torch":
        return "torch", "torch requested"
    if requested == "triton":
        if triton is None:
            raise RuntimeError(
                "the triton backend was requested but triton is not installed (pip install triton)"
            )
        if device.type != "cuda" and not interpreter_enabled():
            raise RuntimeError(
                f"the triton backend was requested for tensors on {device.type}; Triton runs on CPU tensors "
                "only under its interpreter: set TRITON_INTERPRET=1 before importing skrr_compile.kernels, "
                f"or use {ENV_VAR}=torch"
            )
        return "triton", "triton requested" + ("" if device.type == "cuda" else " (interpreter)")
    if device.type != "cuda":
        return "torch", f"auto: tensors on {device.type}"
    if triton is None:
        return "torch", "auto: triton not installed"
    return "triton", "auto: CUDA tensors"


def select_backend(device: torch.device | str) -> str:
    """Backend ("torch" or "triton") for tensors on ``device``, honouring ``SKRR_KERNELS``."""
    return _select(device, _env_choice())[0]


def explain_backend(device: torch.device | str, backend: str | None = None) -> str:
    """Human-readable choice, e.g. ``"torch (auto: tensors on cpu)"``."""
    chosen, reason = _select(device, _requested(backend))
    source = f", {ENV_VAR}={os.environ[ENV_VAR]}" if backend is None and ENV_VAR in os.environ else ""
    return f"{chosen} ({reason}{source})"


def _requested(backend: str | None) -> str:
    if backend is None:
        return _env_choice()
    if backend not in _ENV_CHOICES:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(_ENV_CHOICES)}")
    return backend


def resolve_backend(backend: str | None, device: torch.device, op: str) -> str:
    """Backend an op uses: the explicit argument, else ``SKRR_KERNELS``, else auto. Records it for ``last_backend``."""
    chosen = _select(device, _requested(backend))[0]
    _last_backend[op] = chosen
    return chosen


def record_backend(op: str, backend: str) -> None:
    _last_backend[op] = backend


def last_backend(op: str | None = None) -> str | dict[str, str] | None:
    """Backend the op used last (``"masked_mse_sums"``, ``"projected_mse_sums"``); all ops when ``op`` is None."""
    if op is None:
        return dict(_last_backend)
    return _last_backend.get(op)


def check_kernel_runnable(kernel, device: torch.device) -> None:
    """Clear error when a kernel compiled for the GPU is launched on CPU tensors (interpreter switched on late)."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    if device.type != "cuda" and not interpreted:
        raise RuntimeError(
            "Triton kernels were defined without the interpreter, so they cannot take CPU tensors: set "
            "TRITON_INTERPRET=1 before skrr_compile.kernels is first imported"
        )
