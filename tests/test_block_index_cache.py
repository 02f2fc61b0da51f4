"""The eager cache of block indices: hits for the same call, a new index for anything that
changes the pattern (an explicit layout changed in place included), never under tracing."""

from __future__ import annotations

import torch

from dilated_compile.ops import _block_layout
from dilated_compile.ops._block_layout import build_block_index, cached_block_index


def _index(layout=None, seq=300, causal=False, like=None):
    like = torch.empty(0) if like is None else like
    return cached_block_index(like, 16, 1, 1, 2, 7, layout, 2, seq, seq, causal)


def _same(a, b) -> bool:
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(vars(a).values(), vars(b).values()))


def test_the_same_call_is_served_from_the_cache():
    first = _index()
    assert _index() is first
    assert _same(first, build_block_index(16, 1, 1, 2, 7, None, 2, 300, 300, False, "cpu"))
    assert _index(seq=301) is not first and _index(causal=True) is not first


def test_a_layout_changed_in_place_builds_a_new_index():
    layout = torch.zeros(1, 19, 19, dtype=torch.bool)
    before = _index(layout)
    assert _index(layout) is before
    layout[0, 5, 11] = True
    after = _index(layout)
    assert after is not before
    assert _same(after, build_block_index(16, 1, 1, 2, 7, layout, 2, 300, 300, False, "cpu"))
    # An equal layout in another tensor is another key (layouts are held by identity).
    assert _index(layout.clone()) is not after


def test_the_cache_stays_bounded():
    for seq in range(100, 100 + 2 * _block_layout._INDEX_CACHE_SIZE):
        _index(seq=seq)
    assert len(_block_layout._INDEX_CACHE) <= _block_layout._INDEX_CACHE_SIZE


def test_traced_calls_build_the_index_as_graph_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = mode.from_tensor(torch.empty(0))
        assert _block_layout._tracing(fake)
    assert not _block_layout._tracing(torch.empty(0))

    def fn(x):
        return _index(like=x).kv_counts.sum() + x

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(torch.zeros(())), fn(torch.zeros(())))
