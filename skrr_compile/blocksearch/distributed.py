"""Data-parallel scoring on torch.distributed: every rank scores the same candidates on its own shard of
the prompt chunks, and the shares are combined so that every rank takes the same decisions.

Exactness: values are all-gathered (not all-reduced) and folded in the global chunk order, so a
candidate's D is the very float a single process computes, whatever the number of ranks; a partial sum
over the chunks received so far, folded in that order, is never above the full fold (rounding is
monotone), so abandoning on it stays exact. Backend: NCCL on CUDA, gloo on CPU; collectives time out.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

NONE = -2.0  # "this rank had no chunk in this round"


class Solo:
    """The single-process group: every collective is the identity."""

    rank, world = 0, 1

    def gather_pairs(self, pair: tuple[float, float] | None) -> list[tuple[float, float]]:
        return [] if pair is None else [pair]

    def gather_objects(self, obj) -> list:
        return [obj]

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

    def gather_pairs(self, pair):
        mine = torch.tensor(pair if pair is not None else (NONE, 0.0), dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        self.dist.all_gather(out, mine)
        pairs = [tuple(float(x) for x in t.cpu().tolist()) for t in out]
        return [p for p in pairs if p[0] != NONE]

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


def current_group():
    """The torch.distributed group when one is initialised with more than one rank, else Solo()."""
    import torch.distributed as dist

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


def shard(n_chunks: int, rank: int, world: int) -> list[int]:
    """The chunks rank `rank` scores: every world-th one (so shards differ in size by at most one)."""
    return list(range(rank, n_chunks, world))


def fold(pairs) -> float:
    """Sum of the values in global chunk order (the null prompt, -1, first), as one process adds them."""
    total = 0.0
    for _, v in sorted(pairs):
        total += v
    return total
