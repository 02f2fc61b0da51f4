"""The PyTorch implementation never builds an N x N tensor: scores are cut into chunks of at most
``_MAX_SCORE_ELEMENTS``, by segments and, when one segment is larger, by query rows."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dilated_compile import DilatedSpec
from dilated_compile.ops import dilated_attention_pytorch as op_module
from dilated_compile.testing import dense_reference


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


def _run_implementations(q, k, v, spec, is_causal):
    """The forward and backward implementations themselves (below the op's dispatch, so that
    the mode sees every tensor they make)."""
    args = (list(spec.segment_lengths), list(spec.dilation_rates), spec.mode, is_causal, None)
    out, lse = op_module.dilated_attention_pytorch._init_fn(q, k, v, *args)
    grads = op_module.dilated_attention_backward_pytorch._init_fn(
        torch.ones_like(out), q, k, v, out, lse, None, *args
    )
    return out, grads


@pytest.mark.parametrize("is_causal", [False, True])
def test_no_n_by_n_tensor_when_one_segment_covers_the_sequence(monkeypatch, is_causal):
    monkeypatch.setattr(op_module, "_MAX_SCORE_ELEMENTS", 1 << 12)
    n = 512
    spec = DilatedSpec((4096, 64), (1, 2))  # w >= N: one dense segment of all 512 positions
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64) for _ in range(3))

    with LargestTensor() as largest:
        out, grads = _run_implementations(q, k, v, spec, is_causal)

    assert largest.numel <= 2 * n * 4  # the [B, H, N, D] inputs and buffers, never N x N
    leaves = [t.requires_grad_() for t in (q, k, v)]
    ref = dense_reference(*leaves, spec, is_causal=is_causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("budget", [1, 7, 100])
def test_tiny_chunks_give_the_same_result(monkeypatch, budget):
    spec = DilatedSpec((5, 12, 33), (1, 3, 4))
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 50, 8, generator=g, dtype=torch.float64) for _ in range(3))
    expected = _run_implementations(q, k, v, spec, True)
    monkeypatch.setattr(op_module, "_MAX_SCORE_ELEMENTS", budget)
    got = _run_implementations(q, k, v, spec, True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
