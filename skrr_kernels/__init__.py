"""Triton kernels and their torch references (installed as skrr_compile.kernels).

The discrepancy code calls the wrappers below; each validates its inputs and dispatches to Triton on CUDA
tensors and to the torch reference elsewhere (``SKRR_KERNELS=auto|torch|triton`` overrides the choice,
``last_backend()`` tells which path an op took).
"""

from .dispatch import explain_backend, last_backend, select_backend
from .masked_mse import masked_mse_sums
from .projected_mse import ACTIVATIONS, ProjectionSpec, projected_mse_sums

__all__ = [
    "masked_mse_sums",
    "projected_mse_sums",
    "ProjectionSpec",
    "select_backend",
    "explain_backend",
    "last_backend",
    "ACTIVATIONS",
]
