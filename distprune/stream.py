"""A model whose decoder blocks stay in the checkpoint until a pass needs them.

Every rank builds the model on the meta device (shapes, no memory) and keeps in memory only
its *resident* tensors: the pruned layers it owns and, when it runs forward passes, the
tensors outside the decoder blocks (embeddings, final norm, head). A pass over the blocks
calls ``load_block(i)`` (read block i's tensors from the safetensors files), runs the block,
and ``release_block(i)`` (back to the meta device, resident tensors excepted): memory per
rank is its shard plus one block, whatever the model size.

Files are read with plain reads into fresh tensors, never memory-mapped: a mapped page the
process touched counts in its resident memory until the kernel drops it, and a pass over a
70B checkpoint would touch all of it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from distprune import moe
from distprune.errors import ConfigError
from distprune.select import all_finite
from distprune.verify import dtype_kind
from distprune.writer import Piece, tie_groups

log = logging.getLogger(__name__)

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


class Reader:
    """The tensors of a safetensors checkpoint (one file, or shards with an index), read one
    at a time."""

    def __init__(self, directory: Path) -> None:
        index = directory / "model.safetensors.index.json"
        files = (sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
                 if index.is_file() else [directory / "model.safetensors"])
        self.where: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, v in header.items():
                if key == "__metadata__":
                    continue
                if v["dtype"] not in DTYPES:
                    raise ConfigError(f"{f}: tensor {key} has dtype {v['dtype']}, which distprune cannot read")
                start, end = v["data_offsets"]
                self.where[key] = (f, DTYPES[v["dtype"]], tuple(v["shape"]), 8 + n + start, 8 + n + end)
        self.bytes_read = 0  # every read, at load and in passes

    def dtype(self, key: str) -> torch.dtype:
        return self.where[key][1]

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """A tensor, or with ``index`` its sub-tensor [index] along the first dimension."""
        f, dtype, shape, start, end = self.where[key]
        if index is not None:
            step = (end - start) // shape[0]
            start, end, shape = start + index * step, start + (index + 1) * step, shape[1:]
        buf = torch.empty(end - start, dtype=torch.uint8, device="cpu")
        view, done = memoryview(buf.numpy()), 0
        with open(f, "rb") as fh:
            fh.seek(start)
            while done < len(view):
                got = fh.readinto(view[done:])
                if not got:
                    raise ConfigError(f"model file {str(f)!r} ends inside tensor {key}")
                done += got
        self.bytes_read += done
        return buf.view(dtype).reshape(shape)


@contextmanager
def params_on_meta():
    """Build modules with their parameters on the meta device and their buffers real:
    buffers that are not in a checkpoint (rotary inverse frequencies) are computed at
    construction and must exist for a forward pass."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:  # a meta one may be a tie: keep it
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=False)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class InMemory:
    """A model loaded in full: blocks are always there."""

    streamed = False

    def load_block(self, i: int, experts: bool = True) -> None:
        pass

    def release_block(self, i: int) -> None:
        pass

    def prefetch(self, i: int) -> None:
        pass

    def read(self, name: str) -> torch.Tensor:
        raise KeyError(name)

    def delivered(self) -> set[str]:
        return set()

    def traffic(self) -> tuple[int, int]:
        return 0, 0


IN_MEMORY = InMemory()


class Streamed:
    """The tensors of ``model`` (built under ``params_on_meta``) that ``reader`` holds, read
    when needed: ``resident`` state-dict names now and until the end, a decoder block's
    for as long as it is loaded."""

    streamed = True

    def __init__(self, model: nn.Module, reader: Reader, blocks: nn.ModuleList, prefix: str,
                 sources: Callable[[str, tuple[int, ...]], str | list[Piece] | None] | None = None) -> None:
        self.model, self.reader = model, reader
        self.slots: dict[str, tuple[nn.Module, str]] = {}
        for name, m in model.named_modules(remove_duplicate=False):
            for attr in [*m._parameters, *m._buffers]:
                self.slots[f"{name}.{attr}" if name else attr] = (m, attr)
        self._name_of: dict[tuple[int, str], str] = {}  # (id(module), attr) -> its first name (read_expert)
        for name, (m, attr) in self.slots.items():
            self._name_of.setdefault((id(m), attr), name)
        self.groups = tie_groups(model)  # tied names share one tensor, stored under one of them
        # where each group is on disk: under one of its names, under another name, or in pieces
        # (``sources``: a checkpoint in a layout that from_pretrained converts, writer.disk_sources)
        self.stored: dict[str, str | list[Piece] | None] = {}
        for g in self.groups:
            found = next((n for n in g if n in reader.where), None)
            if found is None and sources is not None:
                found = sources(g[0], tuple(getattr(*self.slots[g[0]]).shape))
            self.stored[g[0]] = found
        # whether any tensor is stored under another name or in pieces (writer.on_disk reverts that)
        self.converted = any(self.stored[g[0]] not in g for g in self.groups)
        self.block_groups = [[g for g in self.groups if g[0].startswith(f"{prefix}.{i}.")] for i in range(len(blocks))]
        self.resident: set[str] = set()
        self._checked: set[int] = set()
        self.comm = None  # share(): blocks come from the ranks that hold them
        self.source: dict[str, int] = {}  # block group -> the rank that sends it
        self.bytes_received = 0
        self.received: set[str] = set()  # groups kept from another rank's broadcast (keep_from)
        # released blocks' received tensors, by (shape, dtype), for the next block's: a fresh one
        # of a block's size costs its page faults again (0.2 s per Llama-2-7B block received)
        self._spare: dict[tuple, list[torch.Tensor]] = {}
        self._side = None  # share(): a second group of the ranks, for prefetch
        self._next: tuple[int, Callable[[], int]] | None = None  # the block prefetch is moving; waits for it

    def share(self, comm, held: list[set[str]]) -> None:
        """With several ranks, each block's tensors come from one rank by broadcast instead of
        every rank reading them from disk: a tensor some rank keeps (``held[r]``: rank r's
        resident names, the layers it prunes) from that rank, as it is now (the pruned
        weights once pruned), and the rest of block i (norms, biases) from rank i % world
        size, which reads it. A fused experts tensor is still read by every rank that needs
        it (several ranks may hold views of it; ``read_expert`` reads one expert at a time)."""
        self.comm, self.source = comm, {}
        self._side = comm.side()  # prefetch's transfers (every rank is here, at load)
        for i, groups in enumerate(self.block_groups):
            for group in groups:
                if self._is_experts(group[0]):
                    continue
                holders = [r for r, names in enumerate(held) if names.intersection(group)]
                if len(holders) <= 1:
                    self.source[group[0]] = holders[0] if holders else i % comm.world_size

    def traffic(self) -> tuple[int, int]:
        """(bytes read from the checkpoint, bytes of blocks received from other ranks) so far."""
        return self.reader.bytes_read, self.bytes_received

    def delivered(self) -> set[str]:
        """Names of the tensors that block loads bring from the rank that holds them (share)."""
        return {name for group in self.groups if group[0] in self.source for name in group}

    def mismatches(self) -> tuple[list[str], list[str], list[str]]:
        """What keeps the checkpoint from holding exactly this model (verify.py): (model
        tensors it lacks, its tensors that no model tensor comes from, model tensors it
        stores with another shape or kind of dtype), from the headers alone."""
        where, used, missing, wrong = self.reader.where, set(), [], []
        for group in self.groups:
            used.update(n for n in group if n in where)
            src, ref = self.stored[group[0]], getattr(*self.slots[group[0]])
            if src is None:
                missing.append(group[0])
                continue
            keys = [piece.key for piece in src] if isinstance(src, list) else [src]
            used.update(keys)
            if isinstance(src, str) and where[src][2] != tuple(ref.shape):
                wrong.append(f"{src}: {where[src][2]}, the config says {tuple(ref.shape)}")
            elif any(dtype_kind(where[k][1]) != dtype_kind(ref.dtype) for k in keys):
                wrong.append(f"{keys[0]}: {where[keys[0]][1]}, the model holds {ref.dtype}")
        return missing, [k for k in where if k not in used], wrong

    def keep(self, names: set[str]) -> int:
        """Read the groups that any of ``names`` belongs to and keep them in memory until
        the end; returns the bytes read."""
        read = 0
        for group in self.groups:
            if names.intersection(group) and group[0] not in self.resident:
                read += self._materialize(group)
                self.resident.add(group[0])
        return read

    def keep_from(self, comm, names: set[str], src: int) -> None:
        """Keep the groups that any of ``names`` belongs to, read by rank src (which keeps
        them already) and broadcast to the other ranks: the embeddings, final norm and head,
        which every rank that runs forward passes needs and one reads."""
        for group in self.groups:
            if names.intersection(group):
                if self._broadcast(comm, group, src):
                    self.received.add(group[0])
                self.resident.add(group[0])

    def reload(self) -> None:
        """Read the resident tensors again: the dense weights, for the next job of a sweep
        (not those received at load: no job changes them)."""
        for group in self.groups:
            if group[0] in self.resident and group[0] not in self.received:
                self._materialize(group)

    def prefetch(self, i: int) -> None:
        """Start moving block i's tensors between the ranks (``share``) in a thread, over a
        second process group, while the caller runs block i - 1; ``load_block(i)`` waits for
        it. Every rank calls it for the same blocks in the same order. Only on gloo (CPU),
        for a block without fused experts (whose reads from disk would overlap the caller's),
        and one block ahead: memory holds two blocks instead of one."""
        if self._side is None or self._next is not None or not 0 <= i < len(self.block_groups) \
                or any(self._is_experts(group[0]) for group in self.block_groups[i]):
            return
        self._next = (i, _in_thread(self._deliver, i, self._side))

    def _deliver(self, i: int, comm) -> int:
        """Block i's tensors that come from the rank that holds them; the bytes received."""
        return sum(self._broadcast(comm, group, self.source[group[0]])
                   for group in self.block_groups[i] if group[0] in self.source)

    def load_block(self, i: int, experts: bool = True) -> None:
        """Read block i's tensors that are not in memory. ``experts=False`` leaves a fused
        experts tensor that is not resident on disk: ``read_expert`` reads it an expert at a
        time (a Mixtral-8x7B block is 2.7 GiB, one expert of it 0.34 GiB)."""
        delivered = False
        if self._next is not None and self._next[0] == i:
            self.bytes_received += self._next[1]()
            self._next, delivered = None, True
        elif self._next is not None:
            raise RuntimeError(f"block {self._next[0]} was prefetched, block {i} loaded")
        for group in self.block_groups[i]:
            src = self.source.get(group[0])
            if src is not None:
                if not delivered:
                    self.bytes_received += self._broadcast(self.comm, group, src)
            elif getattr(*self.slots[group[0]]).is_meta and (experts or not self._is_experts(group[0])):
                self._materialize(group)
        if i not in self._checked:  # each block once: its non-resident tensors are read again later
            self._checked.add(i)
            for group in self.block_groups[i]:  # what this rank read from disk: the resident tensors were
                # checked at load, a received one by its sender, an expert left on disk as it is read
                from_disk = group[0] not in self.resident and not self._received(group)
                if from_disk and not getattr(*self.slots[group[0]]).is_meta:
                    check_finite(group[0], getattr(*self.slots[group[0]]), lambda g=group: self._read(g))

    def _broadcast(self, comm, group: list[str], src: int) -> int:
        """A group's tensor from rank src (which reads it when it is not in memory) into every
        other rank's model, in the model's dtype, bytes as they are; returns the bytes this
        rank received (0 on src)."""
        ref = getattr(*self.slots[group[0]])
        if comm.rank == src:
            if ref.is_meta:
                self._materialize(group)
            comm.broadcast_bytes_(getattr(*self.slots[group[0]]).data, src)
            return 0
        spare = self._spare.get((tuple(ref.shape), ref.dtype))
        t = spare.pop() if spare else torch.empty(ref.shape, dtype=ref.dtype, device="cpu")
        comm.broadcast_bytes_(t, src)
        self._put(group, t, isinstance(ref, nn.Parameter))
        return t.numel() * t.element_size()

    def _received(self, group: list[str]) -> bool:
        """Whether block loads bring this group from another rank (``share``)."""
        return self.comm is not None and self.source.get(group[0], self.comm.rank) != self.comm.rank

    def _is_experts(self, name: str) -> bool:
        module, attr = self.slots[name]
        return attr in ("gate_up_proj", "down_proj") and moe.is_experts(module)

    def read_expert(self, module: nn.Module, attr: str, e: int) -> torch.Tensor:
        """Expert e of the fused tensor ``module.<attr>`` (gate_up_proj, down_proj), from the
        checkpoint, in the model's dtype: from its per-expert pieces, or a slice of the fused
        tensor on disk."""
        name = self._name_of[(id(module), attr)]
        group = next(g for g in self.groups if name in g)
        ref, src = getattr(module, attr), self.stored[group[0]]
        if isinstance(src, list):
            parts = [piece for piece in src if piece.expert == e]
            t = torch.empty(ref.shape[1:], dtype=self.reader.dtype(parts[0].key), device="cpu")
            for piece in parts:
                t[piece.start:piece.start + piece.rows] = self.reader.read(piece.key)
        else:
            t = self.reader.read(src, e)
        if tuple(t.shape) != tuple(ref.shape[1:]):
            raise ConfigError(f"checkpoint tensor {src if isinstance(src, str) else name}: expert {e} has shape "
                              f"{tuple(t.shape)}, the config says {tuple(ref.shape[1:])}")
        cast = t.to(ref.dtype)
        check_finite(f"{name}[{e}]", cast, lambda: t)
        return cast

    def release_block(self, i: int) -> None:
        for group in self.block_groups[i]:
            if group[0] not in self.resident:
                ref = getattr(*self.slots[group[0]])
                if self._received(group) and ref.device.type == "cpu":  # kept for the next block's
                    self._spare.setdefault((tuple(ref.shape), ref.dtype), []).append(ref.data)
                self._put(group, torch.empty_like(ref, device="meta"), isinstance(ref, nn.Parameter))

    def read(self, name: str) -> torch.Tensor:
        """A tensor as the checkpoint holds it (in the model's dtype), without keeping it:
        checked like every tensor read (the writer copies what no pass read)."""
        group = next(g for g in self.groups if name in g)
        raw = self._read(group)
        t = raw.to(getattr(*self.slots[group[0]]).dtype)
        check_finite(name, t, lambda: raw)
        return t

    def _read(self, group: list[str]) -> torch.Tensor:
        """A group's tensor as the checkpoint holds it: one tensor, or assembled from pieces."""
        ref, src = getattr(*self.slots[group[0]]), self.stored[group[0]]
        if isinstance(src, list):
            t = torch.empty(ref.shape, dtype=self.reader.dtype(src[0].key), device="cpu")
            for piece in src:
                t[piece.expert, piece.start:piece.start + piece.rows] = self.reader.read(piece.key)
            return t
        t = self.reader.read(src)
        if tuple(t.shape) != tuple(ref.shape):
            raise ConfigError(f"{self.reader.where[src][0]}: tensor {src} has shape {tuple(t.shape)}, the config "
                              f"says {tuple(ref.shape)}")
        return t

    def _materialize(self, group: list[str]) -> int:
        ref = getattr(*self.slots[group[0]])
        t = self._read(group).to(ref.dtype)
        self._put(group, t, isinstance(ref, nn.Parameter))
        return t.numel() * t.element_size()

    def _put(self, group: list[str], t: torch.Tensor, parameter: bool) -> None:
        new = nn.Parameter(t, requires_grad=False) if parameter else t
        for name in group:
            m, attr = self.slots[name]
            (m._parameters if attr in m._parameters else m._buffers)[attr] = new


def _in_thread(fn: Callable[..., int], *args) -> Callable[[], int]:
    """Start fn(*args) in a daemon thread (one stuck in a transfer with a rank that died
    does not hold the process at exit); the returned function waits for its result."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # raised in the caller's thread by the waiting function
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> int:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


CHECK_CHUNK = 1 << 24  # elements per finiteness check: its temporaries stay at a few tens of MB

def finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or Inf, checked on bit patterns in chunks: isfinite of a
    whole fused experts tensor (1e9 bf16 weights) would make gigabytes of temporaries."""
    return not t.is_floating_point() or all(all_finite(part) for part in t.reshape(-1).split(CHECK_CHUNK))


def check_finite(name: str, t: torch.Tensor, stored: Callable[[], torch.Tensor | None] | None = None) -> None:
    """Refuse a tensor with NaN or Inf, naming it. ``stored``: the tensor as the checkpoint
    holds it, asked for only on failure, to tell a damaged checkpoint from a cast to a
    narrower dtype (model.dtype=float16 of a bfloat16 checkpoint) that overflowed."""
    if finite(t):
        return
    bad = sum(int((~torch.isfinite(part)).sum()) for part in t.reshape(-1).split(CHECK_CHUNK))
    values = f"{bad} non-finite value{'s' * (bad != 1)} (NaN or Inf)"
    raw = stored() if stored is not None else None
    if raw is not None and raw.dtype != t.dtype and finite(raw):
        raise ConfigError(f"model tensor {name} overflows {str(t.dtype).removeprefix('torch.')}: casting the "
                          f"checkpoint's {str(raw.dtype).removeprefix('torch.')} gives {values}; the checkpoint is "
                          f"fine, the cast is not: pass model.dtype={str(raw.dtype).removeprefix('torch.')}")
    raise ConfigError(f"model tensor {name} holds {values}: the checkpoint is damaged")


def move(model: nn.Module, device, skip: nn.Module | None = None) -> None:
    """Move every parameter and buffer that is in memory (not on the meta device) to device,
    except those inside ``skip`` (the decoder blocks: they go one at a time); tied
    parameters stay tied (one Parameter, its data moved)."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    for m in model.modules():
        if id(m) in skipped:
            continue
        for p in m._parameters.values():
            if p is not None and not p.is_meta:
                p.data = p.data.to(device)
        for k, b in m._buffers.items():
            if b is not None and not b.is_meta:
                m._buffers[k] = b.to(device)
