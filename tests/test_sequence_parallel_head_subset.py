"""all_to_all's dilated attention of a rank's heads (distributed/head_subset.py): every kv group of
heads computed alone, with the offsets of its heads' indices in the whole, equals those heads of
the float64 dense reference, outputs and gradients (no process group needed)."""

from __future__ import annotations

import itertools

import pytest
import torch

from dilated_compile import DilatedSpec
from dilated_compile.distributed.head_subset import dilated_head_subset_attention
from dilated_compile.testing import dense_reference

SPECS = [
    DilatedSpec((4, 8), (1, 2)),
    DilatedSpec((5, 6, 32), (1, 2, 2)),  # a segment longer than N
    DilatedSpec((3, 6, 12), (1, 3, 4)),  # rates that do not divide the segments
    DilatedSpec((4, 8), (1, 2), "head_groups"),
    DilatedSpec((3, 6, 12), (1, 2, 4), "head_groups"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.segment_lengths}-{s.dilation_rates}-{s.mode}")
@pytest.mark.parametrize("causal", [False, True])
def test_each_kv_group_alone_equals_its_heads_of_the_whole(spec, causal):
    torch.manual_seed(0)
    for n, (hq, hkv) in itertools.product((1, 7, 30), ((3, 3), (6, 3), (8, 2))):
        q = torch.randn(2, hq, n, 5, dtype=torch.float64, requires_grad=True)
        k = torch.randn(2, hkv, n, 5, dtype=torch.float64, requires_grad=True)
        v = torch.randn(2, hkv, n, 3, dtype=torch.float64, requires_grad=True)
        ref = dense_reference(q, k, v, spec, is_causal=causal, enable_gqa=hq != hkv)
        grad = torch.randn_like(ref)
        expected = torch.autograd.grad(ref, (q, k, v), grad)
        group = hq // hkv
        out = torch.cat([
            dilated_head_subset_attention(spec, q[:, lo:lo + group], k[:, lo // group:lo // group + 1],
                                          v[:, lo // group:lo // group + 1], lo, hq, causal, None)
            for lo in range(0, hq, group)
        ], dim=1)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
        # Connected to the inputs even where no part meets a row (N = 1, offsets past it).
        got = torch.autograd.grad(out, (q, k, v), grad)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=0)
