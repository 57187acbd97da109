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
