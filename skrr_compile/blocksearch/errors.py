"""SearchError: search inputs that cannot give a result."""

from __future__ import annotations


class SearchError(ValueError):
    """Search inputs that cannot give a result (unreachable sparsity, mismatched resume state, ...)."""
