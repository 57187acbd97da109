"""Progress on stderr: a bar redrawn in place on a terminal (or a notebook widget); off a terminal (`make demo >
log`, a pipe, CI) plain lines, at most one every LOG_INTERVAL seconds while a step runs and none for a shorter
step, as pip and huggingface_hub do (the search steps print their own one-line summaries on stdout); none when
quiet."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between two progress lines in a log
_NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)  # tqdm.auto's pick in Jupyter


class LogProgress:
    """tqdm's update / set_postfix / close for a log: whole lines (no carriage returns), at most one per
    `interval` seconds, the first only once a step has run that long."""

    def __init__(self, *, total: int | None = None, desc: str = "", unit: str = "it", disable: bool = False,
                 interval: float | None = None, file=None, **_):
        self.total, self.desc, self.unit, self.disable, self.n = total, desc, unit, disable, 0
        self.interval = LOG_INTERVAL if interval is None else interval
        self.file = file if file is not None else sys.stderr
        self.postfix: dict = {}
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= self.interval:
            self.last = now
            total = f"/{self.total}" if self.total is not None else ""
            post = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.n}{total} {self.unit}s, {now - self.start:.0f} s{post}", file=self.file,
                  flush=True)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(*, disable: bool = False, **kwargs):
    """A tqdm bar on a terminal or in a notebook, else a LogProgress (plain lines; see the module docstring)."""
    interactive = sys.stderr.isatty()
    if not interactive and not _NOTEBOOK:
        return LogProgress(disable=disable, **kwargs)
    return tqdm(file=sys.stderr, disable=disable, leave=False, mininterval=0.1, dynamic_ncols=interactive, **kwargs)
