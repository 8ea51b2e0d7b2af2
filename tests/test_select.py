"""Selectors against a brute-force reference: stable sort of the concatenated scores.
Every count and mask is checked twice: with the C kernels (kernels.py) and with torch's
operators alone (what runs without a C compiler)."""

import shutil
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distprune import kernels
from distprune.select import (
    NonFiniteScoreError,
    ScoreStream,
    TieBudget,
    row_mask,
    rows_mask,
    select,
    select_search,
    target_count,
)

COUNTING = ("kernels", "torch")


@contextmanager
def counting(how: str):
    """Radix histograms and in-place pruning by the C kernels, or by torch alone."""
    if how == "torch":
        with mock.patch.object(kernels, "lib", lambda: None):
            yield
        return
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler here: the kernels cannot be built (torch's path is tested)")
    assert kernels.lib() is not None, "a C compiler is here but the kernels did not build"
    yield


def reference_masks(layers: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The k smallest scores, ties by (layer order, flat index): a stable argsort."""
    flat = torch.cat([s.reshape(-1).float() for s in layers]).numpy()
    chosen = np.zeros(flat.size, dtype=bool)
    chosen[np.argsort(flat, kind="stable")[:k]] = True
    out, start = [], 0
    for s in layers:
        out.append(torch.from_numpy(chosen[start:start + s.numel()].reshape(s.shape)))
        start += s.numel()
    return out


def masks_of(selector: str, layers: list[torch.Tensor], k: int, workers: int = 1, piece: int | None = None):
    """The masks a selector's selection gives, by TieBudget.mask; with ``piece``, the scores
    stream row by row in pieces of about that many scores, and the masks are what
    TieBudget.prune_layer_ zeroes."""
    n = sum(s.numel() for s in layers)
    if piece is None:
        sel = select(selector, ScoreStream.of(layers, workers), k, n)
        budget = TieBudget(sel)
        return [budget.mask(s) for s in layers], sel.passes
    stream = ScoreStream.of(layers)
    stream = ScoreStream(stream.names, stream.score, rows=lambda i, a, b: layers[i][a:b],
                         shapes=[s.shape for s in layers], piece=piece)
    sel = select(selector, stream, k, n)
    budget, weights = TieBudget(sel), [torch.ones_like(s) for s in layers]
    pruned = [budget.prune_layer_(w, stream, i) for i, w in enumerate(weights)]
    masks = [w == 0 for w in weights]
    assert pruned == [int(m.sum()) for m in masks]
    return masks, sel.passes


def make_scores(kind: str, shapes, dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        if kind == "normal":
            s = torch.randn(shape, generator=g).abs()
        elif kind == "lognormal":
            s = torch.randn(shape, generator=g).mul(3).exp()
        elif kind == "ties":  # few distinct values, like quantized weights
            s = torch.randint(0, 4, shape, generator=g).float() / 8
        elif kind == "equal":
            s = torch.full(shape, 0.25)
        elif kind == "zeros":
            s = torch.zeros(shape)
        elif kind == "tiny":  # subnormals and exact zeros mixed in
            s = torch.randn(shape, generator=g).abs() * 1e-39
            s[torch.rand(shape, generator=g) < 0.3] = 0.0
        else:
            raise AssertionError(kind)
        out.append(s.clamp(max=torch.finfo(dtype).max).to(dtype))  # finite: inf is an error (own test)
    return out


KINDS = ["normal", "lognormal", "ties", "equal", "zeros", "tiny"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from(DTYPES),
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 40)), min_size=1, max_size=5),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_radix_and_sort_match_reference(kind, dtype, shapes, frac, seed):
    layers = make_scores(kind, shapes, dtype, seed)
    n = sum(s.numel() for s in layers)
    k = min(int(frac * (n + 1)), n)  # every k in [0, n]
    ref = reference_masks(layers, k)
    for how in COUNTING:
        with counting(how):
            for selector, workers, piece in (("radix", 1, None), ("radix", 3, None), ("sort", 2, None),
                                             ("radix", 1, 25)):
                got, _ = masks_of(selector, layers, k, workers, piece)
                for r, m in zip(ref, got, strict=True):
                    assert torch.equal(r, m), (how, selector, workers, piece, kind, dtype, k)
    assert sum(int(m.sum()) for m in got) == k


@pytest.mark.parametrize("how", COUNTING)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k_of", [lambda n: 0, lambda n: 1, lambda n: n // 2, lambda n: n - 1, lambda n: n])
def test_edge_k(kind, k_of, how):
    layers = make_scores(kind, [(7, 13), (1, 1), (5, 3)], torch.float32, 3)
    n = sum(s.numel() for s in layers)
    k = k_of(n)
    ref = reference_masks(layers, k)
    for selector, piece in (("radix", None), ("sort", None), ("radix", 20)):
        with counting(how):
            got, _ = masks_of(selector, layers, k, piece=piece)
        assert all(torch.equal(r, m) for r, m in zip(ref, got, strict=True))


def test_radix_passes_by_dtype():
    for dtype, passes in [(torch.float32, 2), (torch.bfloat16, 1), (torch.float16, 1)]:
        layers = make_scores("normal", [(64, 64)] * 3, dtype, 0)
        _, p = masks_of("radix", layers, 5000)
        assert p == passes


@pytest.mark.parametrize("kind", ["normal", "lognormal"])
def test_search_is_close_and_converges(kind):
    layers = make_scores(kind, [(200, 300)] * 4, torch.float32, 1)
    n = sum(s.numel() for s in layers)
    k = target_count(0.5, n)
    sel = select_search(ScoreStream.of(layers, workers=2), k, n, tol=1e-3, max_iter=60)
    pruned = sum(int((s <= sel.threshold).sum()) for s in layers)
    assert abs(pruned - k) <= 1e-3 * n
    assert not sel.exact
    # one pass for the moments, then counting passes until within tol: well before the cap
    assert 2 <= sel.passes < 61


def test_search_stops_at_max_iter():
    """tol 0 is never met on continuous scores: exactly one moments pass plus max_iter
    counting passes, and the threshold it stops at is still close."""
    layers = make_scores("normal", [(200, 300)] * 4, torch.float32, 1)
    n = sum(s.numel() for s in layers)
    k = target_count(0.5, n)
    for max_iter in (0, 3, 7):
        sel = select_search(ScoreStream.of(layers), k, n, tol=0.0, max_iter=max_iter)
        assert sel.passes == 1 + max_iter


@pytest.mark.parametrize("how", COUNTING)
@pytest.mark.parametrize("selector", ["radix", "sort", "search"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_names_layer(selector, bad, dtype, how):
    layers = make_scores("normal", [(4, 4)] * 3, dtype, 0)
    layers[1][2, 3] = bad
    with counting(how), pytest.raises(NonFiniteScoreError, match="layer1"):
        masks_of(selector, layers, 10)


@pytest.mark.parametrize("how", COUNTING)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("piece", [None, 8])
def test_negative_scores_name_layer(dtype, how, piece):
    layers = make_scores("normal", [(4, 4)] * 3, dtype, 0)
    layers[2][1, 1] = -0.5
    with counting(how), pytest.raises(ValueError, match="negative importance scores in layer layer2"):
        masks_of("radix", layers, 10, piece=piece)


@settings(max_examples=100, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    rows=st.integers(1, 8),
    cols=st.integers(1, 50),
    sparsity=st.floats(0.0, 0.999),
    seed=st.integers(0, 2**16),
)
def test_row_mask_matches_stable_sort(kind, rows, cols, sparsity, seed):
    (s,) = make_scores(kind, [(rows, cols)], torch.float32, seed)
    k = target_count(sparsity, cols)
    expect = torch.zeros(rows, cols, dtype=torch.bool)
    order = torch.from_numpy(np.argsort(s.numpy(), axis=1, kind="stable"))
    expect.scatter_(1, order[:, :k], True)
    assert torch.equal(row_mask(s, k), expect)


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 30), seed=st.integers(0, 2**16), data=st.data())
def test_rows_mask_spreads_a_layer_total_over_rows(rows, cols, seed, data):
    (s,) = make_scores("ties", [(rows, cols)], torch.float32, seed)
    k = data.draw(st.integers(0, rows * cols))
    mask = rows_mask(s, k)
    per_row = mask.sum(1)
    assert int(per_row.sum()) == k  # exact in all
    q, r = divmod(k, rows)
    more = per_row == q + 1
    assert int(more.sum()) == r and bool(((per_row == q) | more).all())
    # the extra weights are the cheapest: the r rows with the lowest (q+1)-th score, ties by row
    if r:
        nxt = torch.sort(s, dim=1, stable=True).values[:, q]
        expect = torch.from_numpy(np.argsort(nxt.numpy(), kind="stable")[:r])
        assert sorted(more.nonzero().squeeze(1).tolist()) == sorted(expect.tolist())
    for i in range(rows):
        assert torch.equal(mask[i], row_mask(s[i:i + 1], int(per_row[i]))[0])


@pytest.mark.parametrize("how", COUNTING)
@pytest.mark.parametrize("quota", [0, 5, 10**6])
@pytest.mark.parametrize(("score_dtype", "weight_dtype"), [
    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float32, torch.float32)])
def test_prune_in_place_equals_the_mask(quota, score_dtype, weight_dtype, how):
    """TieBudget.prune_ (bit arithmetic) zeroes exactly what mask + masked_fill_ zero, with
    +0.0, layer after layer while the tie quota runs out (one layer splits its ties), on
    contiguous and transposed (Conv1D) weights."""
    from distprune.select import Selection, TieBudget

    g = torch.Generator().manual_seed(quota)
    w = torch.randn(64, 96, generator=g).round(decimals=1).to(weight_dtype)  # rounded: many ties
    norms = (torch.rand(96, generator=g) * 4).round()  # zero channels: zero scores of nonzero weights
    s = (w.abs() if score_dtype == weight_dtype else w.float().abs() * norms).to(score_dtype).contiguous()
    t = s.flatten().kthvalue(3000).values
    ints = torch.int32 if weight_dtype == torch.float32 else torch.int16
    for transposed in (False, True):
        by_mask, in_place = TieBudget(Selection(3000, s.numel(), t, quota, 1, "radix", 0)), \
            TieBudget(Selection(3000, s.numel(), t, quota, 1, "radix", 0))
        for _ in range(3):
            mask = by_mask.mask(s)
            ref = w.clone().masked_fill_(mask, 0.0)
            got = w.t().contiguous().t() if transposed else w.clone()
            with counting(how):
                assert in_place.prune_(got, s) == int(mask.sum())
            assert torch.equal(got.contiguous().view(ints), ref.view(ints))  # bit patterns: +0.0
            assert in_place.remaining == by_mask.remaining


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria"])
def test_a_zero_weight_scores_zero(method):
    """masks._prune_global counts a zero weight as pruned when the threshold is > 0."""
    from distprune.config import PruneConfig
    from distprune.methods import METHODS
    from distprune.stats import LayerStats

    w = torch.randn(8, 16).to(torch.bfloat16)
    w[2, 3] = 0.0
    w[:, 5] = 0.0  # an all-zero column (ria's column sum)
    st = LayerStats.from_norms(torch.rand(16) + 0.5)
    s = METHODS[method].score(w, st, PruneConfig(method=method))
    assert bool((s[w == 0] == 0).all()) and bool((s[w != 0] > 0).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernels_split_over_threads(dtype, monkeypatch):
    """A piece cut into one span per torch thread (3 here, spans of uneven length) counts and
    prunes what one loop over it does: the histograms, ties and pruned weights."""
    with counting("kernels"):
        monkeypatch.setattr(kernels, "SPAN", 1000)
        before = torch.get_num_threads()
        torch.set_num_threads(3)
        try:
            s = make_scores("ties", [(37, 301)], dtype, 5)[0] if dtype != torch.float32 else \
                make_scores("lognormal", [(37, 301)], dtype, 5)[0]
            assert len(kernels._spans(s.numel())) == 3
            bits = s.reshape(-1).view(torch.int32 if dtype == torch.float32 else torch.int16)
            high = bits >> 16 if dtype == torch.float32 else bits
            hist = torch.zeros(1 << 16, dtype=torch.int64)
            kernels.merge(kernels.count_high(s), hist)
            assert torch.equal(hist, torch.bincount(high.long(), minlength=1 << 16))
            t = int(bits.kthvalue(bits.numel() // 2).values)
            assert kernels.count_equal(s, t) == int((bits == t).sum())
            if dtype == torch.float32:
                hi = t >> 16
                inside = bits[(bits >> 16) == hi] & 0xFFFF
                hist.zero_()
                kernels.merge(kernels.count_low(s, hi), hist)
                assert torch.equal(hist, torch.bincount(inside.long(), minlength=1 << 16))
            for ties in (False, True):
                w = torch.ones_like(s)
                assert kernels.prune_(w, s, t, ties) == int((bits < t).sum() + ties * (bits == t).sum())
                assert torch.equal((w == 0).reshape(-1), (bits < t) | (ties & (bits == t)))
        finally:
            torch.set_num_threads(before)


def test_without_a_compiler_the_kernels_are_off_with_a_warning(monkeypatch, tmp_path, caplog):
    """No C compiler: one warning, and torch's operators count (the tests above, "torch")."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("DISTPRUNE_CACHE", str(tmp_path))
    kernels.lib.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="distprune"):
            assert kernels.lib() is None
        assert "C kernels not built" in caplog.text and "no-such-cc" in caplog.text
    finally:
        monkeypatch.undo()
        kernels.lib.cache_clear()
