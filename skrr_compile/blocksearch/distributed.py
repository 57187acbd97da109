"""Data-parallel scoring on torch.distributed: every rank scores the same candidates on its own shard of
the prompt chunks, and the shares are combined so that every rank takes the same decisions.

Exactness: values are all-gathered (not all-reduced) and folded in the global chunk order, so a
candidate's D is the very float a single process computes, whatever the number of ranks; a partial sum
over the chunks received so far, folded in that order, is never above the full fold (rounding is
monotone), so abandoning on it stays exact. Backend: NCCL on CUDA, gloo on CPU; collectives time out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from datetime import timedelta

import torch

NONE = -2.0  # "this rank had no chunk in this round"


class Solo:
    """The single-process group: every collective is the identity."""

    rank, world = 0, 1

    def gather_batch(self, pairs: list) -> list[list[tuple[float, float]]]:
        """For each entry of `pairs` (a (global chunk, share) or None; the same length on every rank), the
        pairs of every rank in rank order, Nones left out: one collective for all."""
        return [[] if p is None else [p] for p in pairs]

    def gather_objects(self, obj) -> list:
        return [obj]

    def gather_rows(self, row: list[float]) -> list[list[float]]:
        """Every rank's `row` (floats, the same length on every rank), in rank order."""
        return [list(row)]

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    @property
    def is_writer(self) -> bool:
        return True


class TorchGroup(Solo):
    """The default process group of torch.distributed."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")

    def gather_batch(self, pairs):
        rows = self.gather_rows([x for p in pairs for x in (p if p is not None else (NONE, 0.0))])
        return [[(row[2 * j], row[2 * j + 1]) for row in rows if row[2 * j] != NONE] for j in range(len(pairs))]

    def gather_rows(self, row):
        mine = torch.tensor(row, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(out, mine)
        return [t.cpu().tolist() for t in out]

    def gather_objects(self, obj) -> list:
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()

    def broadcast_object(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


_LOCAL: list[bool] = []


@contextlib.contextmanager
def local():
    """Within: `current_group()` is Solo() on every rank (each rank runs alone, e.g. a method that is not
    distributed yet); nothing inside may wait for the other ranks."""
    _LOCAL.append(True)
    try:
        yield
    finally:
        _LOCAL.pop()


def current_group():
    """The torch.distributed group when one is initialised with more than one rank, else Solo()."""
    import torch.distributed as dist

    if _LOCAL:
        return Solo()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchGroup()
    return Solo()


def init_from_env(device: str | torch.device, timeout_s: float = 600.0):
    """Under torchrun (WORLD_SIZE > 1 in the environment): join the process group; NCCL on CUDA, gloo on CPU."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return Solo()
    if not dist.is_initialized():
        device = torch.device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return current_group()


def leave() -> None:
    """Destroy the default process group, if one is initialised: a process that exits with it alive (its gloo
    threads and, on rank 0, the TCPStore server still running) can die in C++ teardown with SIGABRT
    ("terminate called without an active exception") instead of its exit code. Purely local: no collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(n_chunks: int, rank: int, world: int) -> list[int]:
    """The chunks rank `rank` scores: every world-th one (so shards differ in size by at most one)."""
    return list(range(rank, n_chunks, world))


def fold(pairs) -> float:
    """Sum of the values in global chunk order (the null prompt, -1, first), as one process adds them."""
    total = 0.0
    for _, v in sorted(pairs):
        total += v
    return total


class ShardedDiscrepancy:
    """`Discrepancy(dense, calibration, projection, select).evaluate(fn)` with the chunks split across the ranks.

    Each rank holds the projected dense reference of its own chunks only (`shard`); `evaluate` gathers
    every chunk's report parts and folds them in global chunk order, and every rank scores the null prompt
    itself, so every rank returns the very report a single process computes. Token counts are integers
    held in floats, so their sum over the ranks is exact in any order.
    """

    def __init__(self, dense, calibration, projection=None, select=None, group=None):
        from skrr_compile.blocksearch.discrepancy import Discrepancy, last_hidden_state

        self.group = group or current_group()
        self.chunks = shard(len(calibration.chunks), self.group.rank, self.group.world)
        mine = dataclasses.replace(calibration, chunks=[calibration.chunks[i] for i in self.chunks])
        self.disc = Discrepancy(dense, mine, projection, select or last_hidden_state)
        counts = self.group.gather_objects(self.disc.prompt_counts)
        self.disc.prompt_counts = [sum(c[i] for c in counts) for i in range(len(self.disc.prompt_counts))]

    @torch.no_grad()
    def evaluate(self, fn):
        """The report (`DiscrepancyReport`) of `fn(input_ids, attention_mask=...)` over every rank's chunks."""
        cal = self.disc.calibration
        parts = list(zip(self.chunks, self.disc.report_parts(fn(ids, attention_mask=m) for ids, m in cal.chunks)))
        everything = sorted((p for rank_parts in self.group.gather_objects(parts) for p in rank_parts),
                            key=lambda p: p[0])
        return self.disc.report_from_parts([part for _, part in everything], fn(cal.null[0], attention_mask=cal.null[1]))
