"""Rank, world size and the few collectives distprune needs, with a single-process no-op.

This is the only module that imports torch.distributed. Every reduction elsewhere goes
through a ``Comm``; with one process each call returns its input unchanged, so one code
path serves one process and many.
"""

from __future__ import annotations

import torch


class Comm:
    """Collectives over the default process group (or none, for one process)."""

    def __init__(self, distributed: bool = False) -> None:
        import torch.distributed as tdist

        self._dist = tdist if distributed and tdist.is_available() and tdist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world_size = self._dist.get_world_size() if self._dist else 1
        self.bytes_communicated = 0  # payload bytes this rank sent into collectives

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # only rank 0 logs and writes shared files

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_communicated += t.numel() * t.element_size()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks, in place."""
        if self._dist:
            self._count(t)
            self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM)
        return t

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum of a tensor over ranks, in place."""
        if self._dist:
            self._count(t)
            self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return t

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate 1-D tensors of any length over ranks, in rank order (reference only)."""
        if not self._dist:
            return t
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._dist.all_gather(sizes, torch.tensor([t.numel()]))
        width = int(max(sizes))
        padded = torch.zeros(width, dtype=t.dtype)
        padded[: t.numel()] = t
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._count(padded)
        self._dist.all_gather(parts, padded)
        return torch.cat([p[: int(n)] for p, n in zip(parts, sizes, strict=True)])

    def barrier(self) -> None:
        if self._dist:
            self._dist.barrier()


SINGLE = Comm()  # one process: every collective is the identity


def current() -> Comm:
    """The Comm of this process: over the default process group when one is initialized."""
    return Comm(distributed=True)
