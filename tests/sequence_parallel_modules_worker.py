"""Worker side of tests/test_sequence_parallel_modules.py: the library's modules (position
embeddings included) inside ``sequence_parallel`` on spawned gloo ranks, against the same module
run by one process on the whole sequence.

Every case builds the module and the full input with one seed on every rank, runs this rank's
shard inside the context, and compares (float64) its output rows, the gradient of its input shard
and the parameter gradients summed over the ranks (each rank's are its rows' share) with the
single-process module's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from sequence_parallel_worker import _raised
from sequence_parallel_worker import _sweep as sweep

from dilated_compile import (
    BlockSparseSpec, DilatedSpec, dilated_attention, sequence_parallel, sequence_positions, shard_sequence,
)
from dilated_compile.nn.attention import attend
from dilated_compile.nn.masked import masked_dilated_attention
from dilated_compile.testing import dense_reference
from dilated_compile.nn import LongNet, LongNetLM, MultiheadDilatedAttention
from dilated_compile.nn.positions import RotaryEmbedding, XPos

TOL = {"atol": 1e-9, "rtol": 1e-7}
DILATED = DilatedSpec((4, 8), (1, 2))
BLOCK_SPARSE = BlockSparseSpec(2, local_blocks=1, global_blocks=1, random_blocks=1, seed=3)


def _model(kind: str, spec, heads: int, kv_heads: int, positions: str):
    common = dict(spec=spec, num_kv_heads=kv_heads, dtype=torch.float64)
    if kind == "attention":
        embedding = RotaryEmbedding(4) if positions == "rotary" else XPos(4, block=8)
        return MultiheadDilatedAttention(4 * heads, heads, position_embedding=embedding, **common)
    if kind == "lm":
        return LongNetLM(11, d_model=4 * heads, nhead=heads, num_layers=2, dim_feedforward=16,
                         positions=positions, **common)
    return LongNet(d_model=4 * heads, nhead=heads, num_encoder_layers=1, num_decoder_layers=1,
                   dim_feedforward=16, positions=positions, **common)


def _inputs(kind: str, n: int, width: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "lm":
        return torch.randint(0, 11, (2, n), generator=generator)
    return torch.randn(2, n, width, generator=generator, dtype=torch.float64)


def _run(model, kind: str, x: torch.Tensor, causal: bool) -> torch.Tensor:
    if kind == "attention":
        return model(x, x, x, is_causal=causal)[0]
    if kind == "lm":
        return model(x, is_causal=causal)
    return model(x, is_causal=causal)


def module_case(rank, world, *, kind, spec, causal, n, layout, positions="rotary", heads=4,
                kv_heads=None, strategy="auto", seed=0) -> str:
    """One case: the module inside ``sequence_parallel`` equals it on the whole sequence."""
    spec = {"dilated": DILATED, "block_sparse": BLOCK_SPARSE}[spec]
    torch.manual_seed(seed)
    model = _model(kind, spec, heads, kv_heads, positions)
    generator = torch.Generator().manual_seed(seed + 1)
    x = _inputs(kind, n, 4 * heads, generator)
    reference_x = x.clone().requires_grad_() if x.is_floating_point() else x
    reference = _run(model, kind, reference_x, causal)
    weights = torch.randn(reference.shape, generator=generator, dtype=torch.float64)
    (reference * weights).sum().backward()
    expected_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    local = shard_sequence(x, layout=layout, dim=1)
    if local.is_floating_point():
        local = local.clone().requires_grad_()
    with sequence_parallel(layout=layout, strategy=strategy):
        out = _run(model, kind, local, causal)
    torch.testing.assert_close(out, shard_sequence(reference, layout=layout, dim=1), **TOL)
    (out * shard_sequence(weights, layout=layout, dim=1)).sum().backward()
    if local.is_floating_point():
        torch.testing.assert_close(local.grad, shard_sequence(reference_x.grad, layout=layout, dim=1), **TOL)
    for name, p in model.named_parameters():
        # A parameter a rank's rows never reach (an empty shard) has no gradient there: 0.
        grad = torch.zeros_like(p) if p.grad is None else p.grad
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, expected_grads[name], **TOL, msg=lambda m, name=name: f"{name}: {m}")
    return "ok"


def _sweep(rank, world, cases) -> dict:
    return sweep(rank, world, cases, module_case)


def modules_w2(rank, world):
    """``MultiheadDilatedAttention`` with rotary and xPos positions (GQA, causal and not, both
    layouts, lengths that are multiples of nothing, dilated and block-sparse), the language model
    (token embedding, every layer's positions) and the encoder-decoder (its cross-attention
    rotates the memory's shard as well)."""
    return _sweep(rank, world, [
        dict(kind="attention", spec="dilated", causal=True, n=13, layout="zigzag", kv_heads=2),
        dict(kind="attention", spec="dilated", causal=False, n=13, layout="contiguous",
             positions="xpos"),
        dict(kind="attention", spec="dilated", causal=True, n=11, layout="zigzag", positions="xpos",
             strategy="all_to_all"),
        dict(kind="attention", spec="block_sparse", causal=True, n=11, layout="contiguous", kv_heads=1),
        dict(kind="attention", spec="block_sparse", causal=False, n=9, layout="zigzag"),
        dict(kind="lm", spec="dilated", causal=True, n=13, layout="zigzag", positions="xpos"),
        dict(kind="lm", spec="block_sparse", causal=True, n=10, layout="contiguous", kv_heads=2),
        dict(kind="encoder_decoder", spec="dilated", causal=False, n=9, layout="contiguous"),
        dict(kind="encoder_decoder", spec="dilated", causal=True, n=9, layout="zigzag"),
    ])


def modules_w3(rank, world):
    """Three ranks (contiguous N=4 leaves rank 2 with no position at all), ``sequence_positions``
    and what the modules refuse inside the context."""
    results = _sweep(rank, world, [
        dict(kind="attention", spec="dilated", causal=True, n=4, layout="contiguous", heads=3,
             kv_heads=1),
        dict(kind="lm", spec="dilated", causal=True, n=16, layout="zigzag", positions="xpos"),
        dict(kind="lm", spec="dilated", causal=True, n=4, layout="contiguous"),
    ])
    results.update(_positions_and_refusals(rank, world))
    return results


def _positions_and_refusals(rank, world) -> dict:
    """``sequence_positions`` itself, and what the modules refuse inside the context (before
    any collective: every rank raises the same error, no hang)."""
    zigzag_10 = [2, 4, 4][rank]  # chunks of 2: rank 0 holds chunks 0 and 5 (empty)
    results = {
        "zigzag 12": sequence_positions(4, layout="zigzag").tolist(),
        "zigzag 10": sequence_positions(zigzag_10, layout="zigzag").tolist(),
        "contiguous 7": sequence_positions([3, 3, 1][rank], layout="contiguous").tolist(),
        "given n": sequence_positions(zigzag_10, layout="zigzag", n=10).tolist(),
        # Shards that are not a layout's sharding of their sum: the same ValueError everywhere.
        "mismatch": _raised(lambda: sequence_positions(3 + rank, layout="contiguous")),
    }
    attention = MultiheadDilatedAttention(8, 2, spec=DILATED, position_embedding=RotaryEmbedding(4))
    x = torch.randn(1, 3, 8)
    with sequence_parallel():
        padding = torch.zeros(1, 3, dtype=torch.bool)
        results["mask"] = _raised(lambda: attention(x, x, x, key_padding_mask=padding))
        results["cache"] = _raised(lambda: attention.forward_cached(x, attention.new_cache()))
        lm = LongNetLM(11, d_model=8, nhead=2, num_layers=1, dim_feedforward=8, spec=DILATED)
        results["decode"] = _raised(lambda: lm.decode(torch.zeros(1, 3, dtype=torch.long), lm.new_cache()))
        results["start"] = _raised(lambda: attention.project(x, x, x, start=4))
    # The functional API on shards: the whole sequence's rows, or a refusal (never the shard's
    # local attention).
    torch.manual_seed(5)
    full = [torch.randn(1, 2, 10, 4, dtype=torch.float64) for _ in range(3)]
    shards = [shard_sequence(t, layout="zigzag") for t in full]
    with sequence_parallel(layout="zigzag"):
        out = dilated_attention(*shards, DILATED, is_causal=True)
    reference = shard_sequence(dense_reference(*full, DILATED, is_causal=True), layout="zigzag")
    results["functional"] = bool(torch.allclose(out, reference, atol=1e-9, rtol=0))
    with sequence_parallel(layout="zigzag"):
        results["masked"] = _raised(lambda: masked_dilated_attention(*shards, DILATED))
        keep = torch.ones(1, 1, shards[0].shape[2], 10, dtype=torch.bool)
        results["attend"] = _raised(lambda: attend(DILATED, *shards, is_causal=True, attn_mask=keep))
    # Nothing was left half-done: a matching call still works.
    y = shard_sequence(torch.randn(1, 5, 8), layout="zigzag", dim=1)  # 1, 2 and 2 positions
    with sequence_parallel(layout="zigzag"):
        out, _ = attention(y, y, y, is_causal=True)
    results["after"] = list(out.shape)
    return results
