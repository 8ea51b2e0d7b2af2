"""Exact histograms of score bit patterns in C, for the radix passes on CPU.

torch.bincount runs one increment after another into one table (and two extra passes
for its min and max): about 0.65 ns per score on one core of this machine's AMD EPYC,
1.2 ns when most scores fall in a few bins, several times a plain copy of the same
bytes. These loops take the keys straight from the scores' bits (the high half of a
float32, or the low half of those in one high bucket) without temporaries, into two
alternating tables: about 0.33 ns per score, the rate at which a core stores.

The C source below is compiled once per machine with the system's C compiler (``CC``,
else cc) into the distprune cache (``DISTPRUNE_CACHE``, default ~/.cache/distprune) and
loaded with ctypes, which releases the GIL during a call: the threads of a pass run in
parallel. Without a compiler, or with ``DISTPRUNE_KERNELS=0``, ``lib()`` is None and
select.py counts with torch.bincount: the same counts, slower (one warning says so).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path
from typing import TypeVar

import torch

log = logging.getLogger("distprune")
BINS = 1 << 16
_work = threading.local()  # each thread's scratch tables (_scratch)
T = TypeVar("T")

SOURCE = r"""
#include <stdint.h>
#include <string.h>

#define BINS 65536

/* sub (2 * BINS uint32, overwritten) = the counts of the 16-bit keys (as unsigned) of n
   values: a half score's pattern (int16), or the high half of a float32 score (int32 >>
   16; a negative score's lands in the upper half of the bins either way). Two tables take
   alternate values, so that two increments of one bin in a row do not wait for each
   other; each holds at most 2^32 - 1 counts (n < 2^33). */
#define COUNT_KEYS(NAME, T, SHIFT)                                                     \
    void NAME(const T *x, int64_t n, uint32_t *sub) {                                  \
        memset(sub, 0, 2 * (size_t)BINS * sizeof(uint32_t));                           \
        int64_t i = 0;                                                                 \
        for (; i + 2 <= n; i += 2) {                                                   \
            sub[(uint16_t)(x[i] >> SHIFT)]++;                                          \
            sub[BINS + (uint16_t)(x[i + 1] >> SHIFT)]++;                               \
        }                                                                              \
        if (i < n) sub[(uint16_t)(x[i] >> SHIFT)]++;                                   \
    }
COUNT_KEYS(count_i16, int16_t, 0)
COUNT_KEYS(count_high, int32_t, 16)

/* sub (2 * BINS uint32, overwritten) = the counts of x & 0xFFFF over the float32 scores
   (as int32) whose high half is hi, in the first table: a few of them, so each run of 64
   is first tested at once (a loop the compiler vectorizes). */
void count_low(const int32_t *x, int64_t n, int32_t hi, uint32_t *sub) {
    memset(sub, 0, 2 * (size_t)BINS * sizeof(uint32_t));
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        int any = 0;
        for (int j = 0; j < 64; j++) any |= (x[i + j] >> 16) == hi;
        if (any)
            for (int j = 0; j < 64; j++)
                if ((x[i + j] >> 16) == hi) sub[x[i + j] & 0xFFFF]++;
    }
    for (; i < n; i++)
        if ((x[i] >> 16) == hi) sub[x[i] & 0xFFFF]++;
}

/* hist[j] += the counts of bin j in k pairs of tables. */
void merge(const uint32_t *sub, int64_t k, int64_t *hist) {
    for (int64_t t = 0; t < 2 * k; t++)
        for (int j = 0; j < BINS; j++) hist[j] += sub[t * BINS + j];
}

/* The number of scores (bit patterns of scores >= 0) equal to t. */
#define COUNT(NAME, S)                                                                 \
    int64_t NAME(const S *s, int64_t n, S t) {                                         \
        int64_t c = 0;                                                                 \
        for (int64_t i = 0; i < n; i++) c += s[i] == t;                                \
        return c;                                                                      \
    }
COUNT(count_s16, int16_t)
COUNT(count_s32, int32_t)

/* Sets to +0.0 (all bits 0) every weight whose score is below t, or equal to t when ties
   is 1; returns how many. Scores >= 0 compare as their bit patterns. */
#define PRUNE(NAME, W, S)                                                              \
    int64_t NAME(W *w, const S *s, int64_t n, S t, int ties) {                         \
        int64_t pruned = 0;                                                            \
        S limit = ties ? t : t - 1;                                                    \
        for (int64_t i = 0; i < n; i++) {                                              \
            int cut = s[i] <= limit;                                                   \
            pruned += cut;                                                             \
            w[i] = cut ? 0 : w[i];                                                     \
        }                                                                              \
        return pruned;                                                                 \
    }
PRUNE(prune_w16_s16, int16_t, int16_t)
PRUNE(prune_w16_s32, int16_t, int32_t)
PRUNE(prune_w32_s32, int32_t, int32_t)
"""


@cache
def lib() -> ctypes.CDLL | None:
    """The compiled kernels, or None (no C compiler, a failed compile, or DISTPRUNE_KERNELS=0)."""
    if os.environ.get("DISTPRUNE_KERNELS", "1") == "0":
        return None
    try:
        so = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:  # no compiler, a failed compile, a file it cannot load
        why = (getattr(e, "stderr", None) or str(e) or type(e).__name__).strip().splitlines()[0]
        log.warning("C kernels not built (%s): selection passes count with torch's operators, about 2x slower on "
                    "CPU", why)
        return None
    p, n = ctypes.c_void_p, ctypes.c_int64
    for name, args in (("count_i16", [p, n, p]), ("count_high", [p, n, p]), ("count_low", [p, n, ctypes.c_int32, p]),
                       ("merge", [p, n, p])):
        getattr(so, name).argtypes, getattr(so, name).restype = args, None
    for bits, ctype in ((16, ctypes.c_int16), (32, ctypes.c_int32)):
        getattr(so, f"count_s{bits}").argtypes = [ctypes.c_void_p, ctypes.c_int64, ctype]
        getattr(so, f"count_s{bits}").restype = ctypes.c_int64
    for name, ctype in (("prune_w16_s16", ctypes.c_int16), ("prune_w16_s32", ctypes.c_int32),
                        ("prune_w32_s32", ctypes.c_int32)):
        getattr(so, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctype, ctypes.c_int]
        getattr(so, name).restype = ctypes.c_int64
    return so


def _build() -> Path:
    """Compile SOURCE into the cache (once: the file is named by the source's hash), with a
    temporary file and a rename, so that ranks compiling at once never load half a file."""
    from distprune.cache import cache_dir

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("cc not found")
    digest = hashlib.sha256(f"{cc}\n{SOURCE}".encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"hist-{digest}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        src = Path(tmp) / "hist.c"
        src.write_text(SOURCE)
        subprocess.run([cc, "-O3", "-shared", "-fPIC", "-o", str(Path(tmp) / "hist.so"), str(src)],
                       check=True, capture_output=True, text=True)
        os.replace(Path(tmp) / "hist.so", out)
    return out


SPAN = 1 << 18  # fewest scores per thread: below this a thread's start costs more than it saves


@cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="distprune-kernels")


def _spans(n: int) -> list[tuple[int, int]]:
    """[0, n) cut into one span per torch thread, of at least SPAN scores each."""
    k = max(1, min(torch.get_num_threads(), n // SPAN))
    step = max(1, -(-n // k))
    return [(a, min(a + step, n)) for a in range(0, n, step)] or [(0, 0)]


def _split(spans: list[tuple[int, int]], fn: Callable[[int, int, int], T]) -> list[T]:
    """fn(j, a, b) for the spans j = 0, 1, ..., the first in this thread and the others in
    a pool's: ctypes releases the GIL, so they run at once. Results in span order."""
    rest = [_pool(len(spans) - 1).submit(fn, j, a, b) for j, (a, b) in enumerate(spans) if j]
    return [fn(0, *spans[0]), *(f.result() for f in rest)]


def _scratch(k: int) -> torch.Tensor:
    """The calling thread's k pairs of uint32 tables, one pair per span, reused: fresh ones
    would cost their page faults on every call."""
    sub = getattr(_work, "sub", None)
    if sub is None or sub.shape[0] < k:
        sub = _work.sub = torch.empty(k, 2 * BINS, dtype=torch.int32, device="cpu")
    return sub


def _ptr(t: torch.Tensor, offset: int) -> int:
    return t.data_ptr() + offset * t.element_size()


SCORES = (torch.float32, torch.bfloat16, torch.float16)  # what the counting loops read


def _usable(*tensors: torch.Tensor) -> bool:
    """Kernels compiled, and every tensor contiguous on CPU (a C loop reads it flat)."""
    return lib() is not None and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def count_high(s: torch.Tensor) -> torch.Tensor | None:
    """The counts of the top 16 bits (as unsigned) of every score, for contiguous CPU
    scores (float32, or the whole pattern of bfloat16 / float16), as pairs of uint32
    tables (one pair per thread; ``merge`` adds them into a histogram): a negative score
    counts in the upper half of the bins. They are the calling thread's, valid until its
    next call. None where the kernels do not apply (select.py counts then)."""
    if s.dtype not in SCORES or not _usable(s):
        return None
    fn = lib().count_high if s.element_size() == 4 else lib().count_i16
    spans = _spans(s.numel())
    sub = _scratch(len(spans))[:len(spans)]
    _split(spans, lambda j, a, b: fn(_ptr(s, a), b - a, sub[j].data_ptr()))
    return sub


def count_low(s: torch.Tensor, hi: int) -> torch.Tensor | None:
    """As ``count_high``, the counts of the low 16 bits of the float32 scores whose top 16
    bits are ``hi``."""
    if s.dtype != torch.float32 or not _usable(s):
        return None
    spans = _spans(s.numel())
    sub = _scratch(len(spans))[:len(spans)]
    _split(spans, lambda j, a, b: lib().count_low(_ptr(s, a), b - a, hi, sub[j].data_ptr()))
    return sub


def merge(sub: torch.Tensor, hist: torch.Tensor) -> None:
    """hist (65,536 int64 bins) += the counts of ``count_high`` or ``count_low``'s tables."""
    if not (_usable(hist) and hist.dtype == torch.int64 and hist.numel() == BINS):
        raise ValueError(f"merge into a {hist.dtype} histogram of {hist.numel()} bins on {hist.device}: the C loop "
                         "writes 65,536 contiguous int64 bins on the CPU")
    lib().merge(sub.data_ptr(), sub.shape[0], hist.data_ptr())


def fits(w: torch.Tensor | None, s: torch.Tensor) -> bool:
    """Whether ``count_equal`` and ``prune_`` apply: kernels compiled; scores (and the weight,
    no wider than them, one per score) contiguous on CPU, 16 or 32 bits wide."""
    tensors = (s,) if w is None else (w, s)
    return _usable(*tensors) and all(t.element_size() in (2, 4) for t in tensors) \
        and (w is None or (w.numel() == s.numel() and w.element_size() <= s.element_size()))


def count_equal(s: torch.Tensor, t: int) -> int:
    """How many scores have the bit pattern t (an int of the scores' width); ``fits(None, s)``."""
    fn = lib().count_s32 if s.element_size() == 4 else lib().count_s16
    return sum(_split(_spans(s.numel()), lambda _j, a, b: fn(_ptr(s, a), b - a, t)))


def prune_(w: torch.Tensor, s: torch.Tensor, t: int, ties: bool) -> int:
    """Set to +0.0, in place, the weights whose score's bit pattern is below t (or equal to
    it, with ``ties``); returns how many. ``fits(w, s)``."""
    so = lib()
    fn = {(2, 2): so.prune_w16_s16, (2, 4): so.prune_w16_s32, (4, 4): so.prune_w32_s32}[
        (w.element_size(), s.element_size())]
    return sum(_split(_spans(s.numel()), lambda _j, a, b: fn(_ptr(w, a), _ptr(s, a), b - a, t, int(ties))))
