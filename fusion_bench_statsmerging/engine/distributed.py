"""Data parallelism over several processes: the host's ``fabric.devices=N fabric.strategy=ddp``.

Every rank builds the same fit set, the same teacher targets and the same engine (each holds the
whole task-vector buffers), and draws the same global batch stream from the seed. Each rank then
trains on its rows ``rank::world`` of every task's batch, and the coefficient gradients are
averaged across ranks before the optimizer (or SAM) sees them. With equal shards the mean of the
ranks' losses is the full batch's loss, so N processes compute what one process computes on the
global batch, and the coefficients stay identical on every rank without ever being broadcast.

One process (``world_size == 1``) takes every hook here as a no-op, so it trains exactly as before.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor

from ..utils.errors import UserError


def world_size(fabric) -> int:
    """Number of training processes (1 without a fabric or outside a distributed strategy)."""
    return int(getattr(fabric, "world_size", 1) or 1)


def rank(fabric) -> int:
    """This process's global rank (0 without a fabric)."""
    return int(getattr(fabric, "global_rank", 0) or 0)


def is_rank_zero(fabric) -> bool:
    """Rank 0 alone writes files: the ranks hold the same coefficients, so one copy is the result."""
    return rank(fabric) == 0


def check_batch_size(batch_size: int, world: int) -> None:
    """Equal shards, so that the mean of the ranks' mean losses is exactly the global batch's mean loss."""
    if int(batch_size) % int(world):
        raise UserError(f"batch_size ({batch_size}) is the global batch per task and is split evenly over the "
                        f"{world} processes; choose a multiple of {world}.")


def batch_rows(fabric) -> slice:
    """The rows of each global batch this rank trains on (all of them in one process)."""
    return slice(rank(fabric), None, world_size(fabric))


def all_reduce_mean_(tensors: Sequence[Tensor], world: int) -> None:
    """Average ``tensors`` in place across ranks, in one collective (one flat buffer)."""
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    flat /= world
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].view_as(t))
        start += t.numel()


def synced_closure(closure: Callable[[], Tuple[Tensor, Dict[str, Tensor]]], params: List[torch.nn.Parameter],
                   fabric) -> Callable[[], Tuple[Tensor, Dict[str, Tensor]]]:
    """``closure`` with its backward done inside and the gradients averaged across ranks before it returns.

    SAM computes its perturbation from the gradients right after the closure: averaging here means
    every rank perturbs by the global batch's gradient (the same e on every rank). The returned
    losses are averaged too (for the logs) and detached, as after a per-task backward. One process:
    ``closure`` itself, unchanged.
    """
    world = world_size(fabric)
    if world == 1:
        return closure

    def run():
        loss, losses = closure()
        if loss.requires_grad:
            loss.backward()
        for p in params:
            if p.grad is None:  # every rank must send the same buffer
                p.grad = torch.zeros_like(p)
        with torch.no_grad():
            all_reduce_mean_([p.grad for p in params], world)
            logged = torch.stack([loss.detach().float(), *(v.detach().float() for v in losses.values())])
            all_reduce_mean_([logged], world)
        return logged[0], dict(zip(losses, logged[1:]))

    return run


def share_stop(stop, fabric) -> None:
    """A signal that reached any rank stops every rank after the same step (a rank left training
    alone would wait forever in the next all-reduce). ``stop``: the loop's StopFlag, or None."""
    world = world_size(fabric)
    if world == 1 or stop is None:
        return
    signum = torch.tensor([int(stop.signum or 0)], device=fabric.device)
    torch.distributed.all_reduce(signum, op=torch.distributed.ReduceOp.MAX)
    if stop.signum is None and int(signum):
        stop.signum = int(signum)


def gather(obj, fabric) -> List[object]:
    """Every rank's ``obj``, in rank order (a collective: all ranks must call it)."""
    world = world_size(fabric)
    if world == 1:
        return [obj]
    out: List[object] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def rows_by_rank(rows_read: Dict[str, Iterable[int]], fit_indices: Dict[str, List[int]], fabric) -> Dict[str, list]:
    """Per task, the dataset indices behind the fit-set rows each rank read (sorted), gathered from all
    ranks: evidence that the ranks read different shares of the fit set and, together, all of it."""
    mine = {t: sorted(int(fit_indices[t][p]) for p in rows) for t, rows in rows_read.items()}
    everyone = gather(mine, fabric)
    return {t: [r[t] for r in everyone] for t in mine}
