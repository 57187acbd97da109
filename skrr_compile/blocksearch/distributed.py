"""Scoring on torch.distributed, two ways (`SearchConfig.distribute`):

- "candidates" (default): every rank holds every prompt chunk and scores its own share of the candidates
  in full; ranks exchange the scores they finish (`Exchange`, never waiting for each other while there is
  work), so each abandons on the best scores any rank knows. A candidate's D is computed on one rank with
  the ops of one process: the very float.
- "chunks": every rank scores the same candidates on its own shard of the prompt chunks (each holds 1/world
  of the states and the reference); values are all-gathered (not all-reduced) and folded in the global
  chunk order, so D is again the float one process computes; a partial sum over the chunks received so far,
  folded in that order, is never above the full fold (rounding is monotone), so abandoning on it stays exact.

Backend: NCCL on CUDA, gloo on CPU; collectives time out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
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
        return self.start_gather(row)()

    def start_gather(self, row):
        """Begin gathering every rank's `row` without waiting; returns `finish(block=True)`, which gives the
        rows in rank order, or None when `block` is False and they have not all arrived yet."""
        mine = torch.tensor(row, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        work = self.dist.all_gather(out, mine, async_op=True)

        def finish(block: bool = True):
            if not block and not work.is_completed():
                return None
            work.wait()  # raises what the collective met (a rank that stopped, a timeout)
            return [t.cpu().tolist() for t in out]

        return finish

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
    """Destroy the default process group, if one is initialised. Purely local: no collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def in_group() -> bool:
    """Whether this process has joined a process group of several ranks."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def exit_rank(code: int):
    """End this process with `code` if it joined a process group of several ranks (else return).

    Why not a normal exit: gloo's worker threads free each finished collective's tensors on their own
    thread, and a tensor Python created drops its Python object there, which takes the GIL. If that happens
    while the interpreter finalizes, taking the GIL ends the thread inside a noexcept destructor:
    std::terminate, SIGABRT ("terminate called without an active exception"; core dump: the gloo runLoop
    thread in ~AsyncAllgatherWork -> decref_pyobject -> take_gil -> pthread_exit, the main thread in
    Py_FinalizeEx). destroy_process_group does not join those threads. So: leave the group, run the atexit
    handlers (logging's flush among them), flush stdout/stderr, and exit without finalizing the interpreter.
    Every output is already written and closed (atomically) by then."""
    import atexit

    if not in_group():
        return
    leave()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


class Exchange:
    """What ranks that split candidates tell each other while each goes on scoring its own.

    One all-gather is always in flight; `poll` (after each piece of work) takes it when it has arrived and
    posts the next. A post carries the scores this rank finished since its last (SLOTS (position, score)
    pairs; more wait for the next) and whether it is idle (no candidate left and nothing left to send).
    The exchange is over at the first gather in which every rank is idle: every rank ends at that same
    gather knowing every score.
    """

    SLOTS = 8

    def __init__(self, group: TorchGroup):
        self.group, self.outbox, self.over = group, [], False
        self._post(False)

    def _post(self, idle: bool) -> None:
        sent, self.outbox = self.outbox[:self.SLOTS], self.outbox[self.SLOTS:]
        scores = [x for pair in sent for x in pair] + [NONE, 0.0] * (self.SLOTS - len(sent))
        self._pending = self.group.start_gather([float(idle and not self.outbox), float(len(sent))] + scores)

    def send(self, position: int, score: float) -> None:
        self.outbox.append((float(position), score))

    def poll(self, idle: bool = False, block: bool = False) -> list[tuple[int, float]]:
        """The scores other ranks finished that arrived with the gather in flight; [] when it has not
        arrived (`block`: wait for it) or the exchange is over. `idle`: this rank has nothing to score."""
        rows = None if self.over else self._pending(block=block)
        if rows is None:
            return []
        scores, me = [], self.group.rank
        for rank, row in enumerate(rows):
            if rank != me:
                scores += [(int(row[2 + 2 * j]), row[3 + 2 * j]) for j in range(int(row[1]))]
        if all(row[0] == 1.0 for row in rows):
            self.over = True
        else:
            self._post(idle)
        return scores


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
