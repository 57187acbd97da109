"""Errors of the graph core that several of its modules raise."""


class NotAPrunedModelError(ValueError):
    """A directory that does not hold a model saved by skrr-compile."""
