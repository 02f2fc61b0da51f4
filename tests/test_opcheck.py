"""``torch.library.opcheck`` on every op: schema, fake kernel, autograd registration, and
AOTAutograd with static and dynamic shapes."""

import pytest
import torch
from torch.library import opcheck

import dilated_compile
from dilated_compile.ops import annotation_op, dilated_attention_backward_op, dilated_attention_op

# (batch, q heads, kv heads, seq_len, head_dim, value dim, segment_lengths, rates, mode, causal, scale)
CASES = [
    (2, 4, 4, 13, 8, 8, [4, 8], [1, 2], "mixture", False, None),
    (1, 4, 2, 31, 8, 4, [8, 16, 64], [1, 2, 4], "mixture", True, 0.5),
    (2, 3, 1, 20, 4, 4, [6, 7], [2, 3], "head_groups", True, None),
    (1, 2, 2, 1, 4, 4, [4], [2], "mixture", False, None),
]
DTYPES = [torch.float32, torch.float64]


def _inputs(case, dtype, requires_grad):
    b, hq, hkv, n, d, dv, *_ = case
    g = torch.Generator().manual_seed(n)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
    return make(b, hq, n, d), make(b, hkv, n, d), make(b, hkv, n, dv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_opcheck_forward(case, dtype):
    q, k, v = _inputs(case, dtype, requires_grad=True)
    *_, lengths, rates, mode, causal, scale = case
    opcheck(dilated_attention_op, (q, k, v, lengths, rates, mode, causal, scale))


@pytest.mark.parametrize("with_grad_lse", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_opcheck_backward(case, with_grad_lse):
    q, k, v = _inputs(case, torch.float64, requires_grad=False)
    *_, lengths, rates, mode, causal, scale = case
    out, lse = dilated_attention_op(q, k, v, lengths, rates, mode, causal, scale)
    grad_lse = torch.randn_like(lse) if with_grad_lse else None
    opcheck(
        dilated_attention_backward_op,
        (torch.randn_like(out), q, k, v, out, lse, grad_lse, lengths, rates, mode, causal, scale),
    )


def test_opcheck_annotation_on_meta_tensors():
    # The annotation's only real kernel raises by design (an unrewritten annotation must never
    # run), so it is checked where its fake kernel serves: on meta tensors.
    x = torch.randn(2, 4, 9, 8, device="meta", requires_grad=True)
    opcheck(annotation_op, (x, dilated_compile.DilatedSpec((4,), (2,)).to_json()))


def test_annotation_kernel_refuses_to_run():
    payload = dilated_compile.DilatedSpec((4,), (2,)).to_json()
    with pytest.raises(RuntimeError, match=r"would compute dense attention(.|\n)*backend='dilated_compile'"):
        annotation_op(torch.randn(1, 1, 4, 4), payload)
