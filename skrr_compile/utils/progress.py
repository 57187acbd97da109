"""Progress bars on stderr: redrawn in place on a terminal, a line every 30 s in logs, none when quiet."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(*, disable: bool = False, **kwargs):
    interactive = sys.stderr.isatty()
    return tqdm(file=sys.stderr, disable=disable, leave=False, mininterval=0.1 if interactive else 30.0,
                dynamic_ncols=interactive, **kwargs)
