"""Rank, world size and the few collectives distprune needs, with a single-process no-op.

This is the only module that imports torch.distributed. Every reduction elsewhere goes
through a ``Comm``; with one process each call returns its input unchanged, so one code
path serves one process and many.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
from datetime import timedelta
from pathlib import Path

import torch

from distprune.errors import ConfigError


class Comm:
    """Collectives over the default process group (or none, for one process)."""

    def __init__(self, distributed: bool = False) -> None:
        import torch.distributed as tdist

        self._dist = tdist if distributed and tdist.is_available() and tdist.is_initialized() else None
        self.rank = self._dist.get_rank() if self._dist else 0
        self.world_size = self._dist.get_world_size() if self._dist else 1
        self.bytes_communicated = 0  # payload bytes this rank sent into collectives
        self._waiting = None  # on_main's group, made on first use
        self._group = None  # the process group of these collectives (None: the default one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # only rank 0 logs and writes shared files

    def _count(self, t: torch.Tensor) -> None:
        self.bytes_communicated += t.numel() * t.element_size()

    def _on_wire(self, t: torch.Tensor) -> torch.Tensor:
        """NCCL reduces on the GPU; gloo on the CPU."""
        backend = self._dist.get_backend()
        return t.cuda() if backend == "nccl" and not t.is_cuda else t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks, in place."""
        return self._reduce(t, "SUM")

    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """Maximum of a tensor over ranks, in place."""
        return self._reduce(t, "MAX")

    def all_reduce_min(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, "MIN")

    def _reduce(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if self._dist:
            self._count(t)
            wire = self._on_wire(t)
            self._dist.all_reduce(wire, op=getattr(self._dist.ReduceOp, op), group=self._group)
            if wire is not t:
                t.copy_(wire)
        return t

    def reduce_sum_(self, t: torch.Tensor, dst: int) -> torch.Tensor:
        """Sum a tensor over ranks onto rank dst, in place there (a reduce, not an
        all-reduce: only dst needs the sum). Other ranks' ``t`` is left undefined."""
        if self._dist:
            self._count(t)
            wire = self._on_wire(t)
            self._dist.reduce(wire, dst=dst, op=self._dist.ReduceOp.SUM, group=self._group)
            if wire is not t and self.rank == dst:
                t.copy_(wire)
        return t

    def all_gather_ints(self, value: int) -> list[int]:
        """One integer from every rank, in rank order."""
        if not self._dist:
            return [value]
        t = torch.zeros(self.world_size, dtype=torch.int64, device="cpu")
        t[self.rank] = value
        return self.all_reduce_sum(t).tolist()

    def exclusive_prefix(self, value: int) -> int:
        """Sum of ``value`` over the ranks before this one (rank order is layer order)."""
        return sum(self.all_gather_ints(value)[: self.rank])

    def all_gather_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate 1-D tensors of any length over ranks, in rank order (the sort
        selector's scores; evaluation's per-batch sums)."""
        if not self._dist:
            return t
        sizes = self.all_gather_ints(t.numel())
        padded = torch.zeros(max(sizes), dtype=t.dtype, device=t.device)
        padded[: t.numel()] = t
        padded = self._on_wire(padded)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._count(padded)
        self._dist.all_gather(parts, padded, group=self._group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)

    def all_gather_objects(self, obj) -> list:
        """A picklable object from every rank, in rank order (reports, not tensors)."""
        if not self._dist:
            return [obj]
        out = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._group)
        return out

    def broadcast_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Rank src's tensor on every rank, in place."""
        if self._dist:
            if self.rank == src:
                self._count(t)
            wire = self._on_wire(t)
            self._dist.broadcast(wire, src=src, group=self._group)
            if wire is not t:
                t.copy_(wire)
        return t

    def broadcast_bytes_(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Rank src's contiguous tensor on every rank, in place, as raw bytes (any dtype:
        bfloat16 travels as its 2 bytes); not counted in ``bytes_communicated`` (the caller
        counts what it moves: a model's blocks are not the job's statistics)."""
        if self._dist:
            raw = t.reshape(-1).view(torch.uint8)
            wire = self._on_wire(raw)
            self._dist.broadcast(wire, src=src, group=self._group)
            if wire is not raw:
                raw.copy_(wire)
        return t

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank."""
        if not self._dist:
            return value
        t = torch.tensor([value if self.is_main else 0], dtype=torch.int64, device="cpu")
        return int(self.all_reduce_sum(t))

    def barrier(self) -> None:
        if self._dist:
            self._dist.barrier(group=self._group)

    def side(self) -> Comm | None:
        """Collectives over a second process group of the same ranks, which may run in
        another thread at the same time as this one's (a block's transfer beside the
        computation of the block before it); None with one process or on NCCL (two NCCL
        communicators busy at once can wait for each other on the GPU). Every rank calls it
        at the same point."""
        if not self._dist or self._dist.get_backend() != "gloo":
            return None
        other = Comm()
        other._dist, other.rank, other.world_size = self._dist, self.rank, self.world_size
        other._group = self._dist.new_group(backend="gloo")
        return other

    def on_main(self, fn, timeout_s: float = 7 * 24 * 3600.0):
        """fn() on rank 0 only, and its (picklable) result on every rank. The other ranks
        wait for as long as rank 0 takes (up to timeout_s: the default group's timeout is
        for collectives, not for rank 0's evaluation), on a gloo group of their own. If fn
        raises, rank 0 raises it and the other ranks a ConfigError or RuntimeError with
        its message."""
        if not self._dist:
            return fn()
        if self._waiting is None:  # every rank gets here in the same order
            self._waiting = self._dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
        box, error = [None], None
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:
                error, box[0] = e, ("error", (isinstance(e, ConfigError), str(e).splitlines()[0] if str(e) else ""))
        self._dist.broadcast_object_list(box, src=0, group=self._waiting)
        if error is not None:
            raise error
        status, value = box[0]
        if status == "error":
            config, message = value
            raise (ConfigError if config else RuntimeError)(f"rank 0: {message}")
        return value


SINGLE = Comm()  # one process: every collective is the identity


def batch_share(count: int, batch_size: int, comm: Comm = SINGLE) -> slice:
    """This rank's contiguous share of ``count`` items (calibration or evaluation windows)
    in whole batches of ``batch_size``: every batch is the one a single process forms, so
    per-batch results are the same whatever the number of ranks."""
    batches = torch.tensor_split(torch.arange(-(-count // batch_size), device="cpu"), comm.world_size)[comm.rank]
    if batches.numel() == 0:
        return slice(0, 0)
    return slice(int(batches[0]) * batch_size, min((int(batches[-1]) + 1) * batch_size, count))


def check_device(device: str) -> None:
    """Before anything is loaded: the device exists, and a node's ranks have a GPU each
    (one line, instead of a CUDA traceback after the model has loaded)."""
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device not in ("auto", "cpu") and m is None:
        raise ConfigError(f"device={device!r} is not one of auto, cpu, cuda, cuda:N")
    if m is not None and not torch.cuda.is_available():
        raise ConfigError(f"device={device}: this torch ({torch.__version__}) sees no CUDA device; pass device=cpu "
                          "(or auto)")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if m is not None and m.group(1) is not None and int(m.group(1)) >= count:
        raise ConfigError(f"device={device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device != "cpu" and count and ranks > count:
        raise ConfigError(f"{ranks} ranks on this node but {count} GPU(s) (device={device}): launch at most one rank "
                          f"per GPU (torchrun --nproc_per_node {count}), or pass device=cpu")


def init(timeout_s: float = 600.0, device: str = "auto") -> Comm:
    """Join the process group that torchrun / accelerate launch announced in the
    environment (WORLD_SIZE > 1): NCCL when each rank has a GPU (and device is not cpu),
    gloo otherwise. A plain process gets the single-process Comm and needs no process
    group."""
    import torch.distributed as tdist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and device != "cpu" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    comm = Comm(distributed=True)
    _store_set(f"distprune/pid/{comm.rank}", f"{socket.gethostname()} {os.getpid()}")
    return comm


# What the ranks of a job tell each other through the launcher's store (it outlives them), so
# that when a collective fails because a peer is gone, each survivor names that peer in one
# line instead of a transport traceback: the rank that failed and why (``report_failure``),
# or one whose process on this host is gone (killed, out of memory).


def _store():
    import torch.distributed as tdist

    try:
        return tdist.distributed_c10d._get_default_store() if tdist.is_initialized() else None
    except (RuntimeError, ValueError, AttributeError):
        return None


def _store_set(key: str, value: str) -> None:
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):  # a store that is gone: nobody to tell
            store.set(key, value)


def report_failure(comm: Comm, message: str) -> None:
    """Tell the other ranks why this one fails (before it exits)."""
    if comm.world_size > 1:
        _store_set(f"distprune/failed/{comm.rank}", message)


def failed_peer(comm: Comm) -> str | None:
    """Which other rank failed, as far as this one can tell: one that reported why, or one
    whose process on this host is gone; None when neither (this rank's own failure)."""
    store = _store()
    if store is None or comm.world_size == 1:
        return None
    try:
        peers = [r for r in range(comm.world_size) if r != comm.rank]
        for r in peers:
            if store.check([f"distprune/failed/{r}"]):
                return f"rank {r} failed: {store.get(f'distprune/failed/{r}').decode()}"
        for r in peers:
            if store.check([f"distprune/pid/{r}"]):
                host, pid = store.get(f"distprune/pid/{r}").decode().rsplit(" ", 1)
                if host == socket.gethostname() and not _alive(int(pid)):
                    return f"rank {r} died (its process {pid} is gone: killed, or out of memory)"
    except Exception:  # the store went away with the launcher
        return None
    return None


def _alive(pid: int) -> bool:
    """Whether a process of this host runs (a killed rank stays a zombie until torchrun reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def exiting() -> None:
    """This process is on its way out, its cleanup done: a SIGTERM now (torchrun ends every
    rank once one has failed) is ignored, not raised inside an atexit callback as noise."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class Terminated(SystemExit):
    """SIGTERM arrived: exit code 143, and one line (cli.entry), like Ctrl-C."""

    def __init__(self) -> None:
        super().__init__(143)


def exit_on_sigterm() -> None:
    """SIGTERM (torchrun ends the other ranks with it when one fails; kill's default) exits
    through Python, so that every process removes its temporary output on the way out. Only
    the first one raises: a second one, arriving during that cleanup, is ignored, so that
    no finalizer reports an exception it could not raise."""
    def terminated(*_) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated()

    signal.signal(signal.SIGTERM, terminated)


def device_of(comm: Comm, device: str) -> str:
    """This rank's device: cuda:LOCAL_RANK under a launcher, else the configured one."""
    if device == "cuda" and comm.world_size > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def shutdown() -> None:
    """Leave the process group, if this process joined one, all ranks in step: a collective
    completes on one rank while its peers may still be sending, so a rank that tears down
    its connections at once can race them (one CI run saw a rank abort at exit with
    "terminate called without an active exception", not reproduced in 220 launches)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()
        tdist.destroy_process_group()
