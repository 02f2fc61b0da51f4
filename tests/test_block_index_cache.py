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
        assert _block_layout.tracing(fake)
    assert not _block_layout.tracing(torch.empty(0))

    def fn(x):
        return _index(like=x).kv_counts.sum() + x

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(torch.zeros(())), fn(torch.zeros(())))


def test_an_index_built_under_a_functional_trace_is_not_kept():
    """A triton_op's body is traced for Inductor under a functional mode, with Python functional
    tensors that neither ``is_compiling`` nor a proxy mode reveals. An index built there holds
    the trace's tensors: kept, it would reach the next eager call, whose kernel launch cannot
    read a functional tensor's data."""
    from torch._subclasses.functional_tensor import FunctionalTensor, FunctionalTensorMode

    like = torch.empty(0)
    seq = 333  # a key no other test uses
    with FunctionalTensorMode():
        traced = _index(like=FunctionalTensor.to_functional(like), seq=seq)
        assert isinstance(traced.kv_indices, FunctionalTensor)
        assert _block_layout.tracing(like)  # the active mode alone marks the trace
    eager = _index(like=like, seq=seq)
    assert type(eager.kv_indices) is torch.Tensor and _index(like=like, seq=seq) is eager


def test_the_eager_cache_keeps_nothing_built_under_a_dispatch_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    cache = _block_layout.EagerCache(4)
    with Passthrough():
        assert cache.get("key", None, lambda: 1) == 1
    assert len(cache) == 0
    assert cache.get("key", None, lambda: 2) == 2 and cache.get("key", None, lambda: 3) == 2
