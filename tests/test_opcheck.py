"""``torch.library.opcheck`` on every op: schema, fake kernel, autograd registration, and
AOTAutograd with static and dynamic shapes; with masks and fewer queries than keys too."""

import pytest
import torch
from torch.library import opcheck

import dilated_compile
from dilated_compile.ops import annotation_op, dilated_attention_backward_op, dilated_attention_op
from dilated_compile.ops.dilated_attention_pytorch import (
    dilated_attention_backward_pytorch_op,
    dilated_attention_pytorch_op,
)

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


# (batch, q heads, kv heads, q len, kv len, head_dim, value dim, segment_lengths, rates, mode,
#  causal, mask shape or None, mask dtype)
MASKED_CASES = [
    (2, 4, 2, 5, 13, 8, 8, [4, 8], [1, 2], "mixture", False, (2, 1, 1, 13), torch.bool),
    (1, 4, 4, 1, 20, 8, 4, [6, 16], [1, 4], "head_groups", False, (1, 20), "float"),
    (2, 3, 1, 9, 9, 4, 4, [3, 7], [1, 3], "head_groups", False, (2, 3, 9, 9), torch.bool),
    (1, 2, 2, 7, 31, 4, 4, [8, 16], [1, 2], "mixture", True, None, None),
    (2, 2, 1, 1, 17, 4, 4, [4, 64], [1, 8], "mixture", True, None, None),
    (2, 4, 2, 6, 11, 8, 8, [5], [1], "mixture", False, (6, 11), torch.float32),
]


def _masked_inputs(case, dtype, requires_grad):
    b, hq, hkv, nq, nk, d, dv, *_, mask_shape, mask_dtype = case
    g = torch.Generator().manual_seed(nq * 7 + nk)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)
    q, k, v = make(b, hq, nq, d), make(b, hkv, nk, d), make(b, hkv, nk, dv)
    mask = None
    if mask_dtype is torch.bool:
        mask = torch.rand(mask_shape, generator=g) < 0.7
        mask[..., 0, :] = False  # a row with no key
    elif mask_dtype is not None:  # a float mask: the inputs' dtype, or float32
        mask_dtype = dtype if mask_dtype == "float" else mask_dtype
        mask = torch.randn(mask_shape, generator=g, dtype=dtype).to(mask_dtype)
        mask[..., 1] = float("-inf")
    return q, k, v, mask


def _masked_args(case):
    *_, lengths, rates, mode, causal, _, _ = case
    return lengths, rates, mode, causal, None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", MASKED_CASES)
def test_opcheck_forward_with_masks_and_fewer_queries(case, dtype):
    q, k, v, mask = _masked_inputs(case, dtype, requires_grad=True)
    opcheck(dilated_attention_op, (q, k, v, *_masked_args(case), mask))


@pytest.mark.parametrize("case", MASKED_CASES)
def test_opcheck_backward_with_masks_and_fewer_queries(case):
    q, k, v, mask = _masked_inputs(case, torch.float64, requires_grad=False)
    args = _masked_args(case)
    out, lse = dilated_attention_op(q, k, v, *args, mask)
    grad_lse = torch.where(torch.isfinite(lse), torch.randn_like(lse), 0.0)
    opcheck(
        dilated_attention_backward_op,
        (torch.randn_like(out), q, k, v, out, lse, grad_lse, *args, mask),
    )


@pytest.mark.parametrize("case", MASKED_CASES[:2])
def test_opcheck_pytorch_implementation_with_a_mask(case):
    """The opaque implementation ops, called as the public op calls them (a 4-D mask view)."""
    q, k, v, mask = _masked_inputs(case, torch.float64, requires_grad=False)
    mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    args = _masked_args(case)
    opcheck(dilated_attention_pytorch_op, (q, k, v, *args, mask))
    out, lse = dilated_attention_pytorch_op(q, k, v, *args, mask)
    opcheck(
        dilated_attention_backward_pytorch_op,
        (torch.randn_like(out), q, k, v, out, lse, None, *args, mask),
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
