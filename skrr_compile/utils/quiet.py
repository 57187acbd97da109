"""Silence dependency warnings the user cannot act on, exactly where they arise (never globally)."""

from __future__ import annotations

import contextlib
import logging
import warnings

# (category, message regex) of warnings our own calls trigger inside torch / transformers
DEPENDENCY_WARNINGS = (
    # torch 2.13's pytree: deep-copying or re-exporting a graph touches the deprecated LeafSpec class
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
)
# loggers that report optional extras the user does not need (torchvision ops for the ONNX registry)
DEPENDENCY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


@contextlib.contextmanager
def dependency_warnings_silenced():
    """Hide the DEPENDENCY_WARNINGS and the DEPENDENCY_LOGGERS' warnings for the duration of the block."""
    loggers = [logging.getLogger(name) for name in DEPENDENCY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        for category, message in DEPENDENCY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.ERROR))
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class _DropRecords(logging.Filter):
    def __init__(self, starts: str, contains: str):
        super().__init__()
        self.starts, self.contains = starts, contains

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - never break the caller's logging
            return True
        return not (msg.startswith(self.starts) and self.contains in msg)


def drop_log_records(logger: str, starts: str, contains: str) -> None:
    """Drop one dependency logger's records that start with `starts` and mention `contains` (idempotent).

    Narrow by construction: other records of that logger, and every other logger, are untouched.
    """
    lg = logging.getLogger(logger)
    if not any(isinstance(f, _DropRecords) and (f.starts, f.contains) == (starts, contains) for f in lg.filters):
        lg.addFilter(_DropRecords(starts, contains))


def import_torchao_quietly() -> None:
    """Hide torchao's import-time noise wherever it is imported (transformers imports it on its own when it
    loads a config): on CPU it logs "Failed to load ..._C_mxfp8 / _C_cutlass_90a" (CUDA-only extensions), and
    its Enum register_constant calls make torch's pytree log a deprecation. Narrow record filters, kept."""
    drop_log_records("torch.utils._pytree", "<enum ", "register_constant() on Enum subclasses is deprecated")
    for name in ("torchao", "torchao.utils", ""):
        drop_log_records(name, "Failed to load", "torchao/_C")
