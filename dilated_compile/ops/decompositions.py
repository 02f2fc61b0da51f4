"""Decompositions of the dilated-attention ops into standard aten ops.

For back-ends that cannot run the ``torch.ops.dilated_compile.*`` ops (ONNX, Torch-TensorRT, an
AOTInductor package that must load without this library), each op is rewritten into plain aten
ops that compute the same numbers (within dtype tolerance), gradients included:

    program = exported_program.run_decompositions(dilated_attention_decompositions())
    table = torch.export.default_decompositions()                 # or: core ATen and our ops
    table.update(dilated_attention_decompositions())
    program = exported_program.run_decompositions(table)

How it computes. For config ``(w, r)`` the sequence is padded to whole segments of ``w``
positions and viewed as ``[..., segments, rows, r, D]``, so the local indices ``o, o + r, ...`` of a
head's offset ``o`` are one index of the ``r`` axis (the segment is padded to ``rows * r``
positions first when ``r`` does not divide ``w``). Heads are grouped so that one slice per offset
picks every head's own rows at once (mixture: heads ``h = a * r + o``; head_groups: one offset per
group). Attention then runs densely inside each segment on those rows, with padded keys (and
future keys, when causal) masked, and configs are merged by log-sum-exp. Every tensor is
``O(N * w / r)`` per head (the largest are the scores, ``N * w / r^2``): no ``N x N`` tensor.

Only the number of segments depends on the sequence length, so one graph serves every length:
the decomposition works with a symbolic ``N`` (dynamic shapes in ``torch.export``, AOTInductor,
ONNX) and needs no guard on it. When ``N`` is a concrete int, segments are ``min(w, N)`` long, as
in the definition. When ``N`` is symbolic they are ``w`` long: for ``N < w`` the one segment
``[0, N)`` is padded to ``w`` positions, which gives the same pattern (every position lies in
segment 0 at local index ``p`` either way) at the cost of one full segment.
Traced from an example no longer than a segment, a config also carries one spare, fully padded
segment, so that the number of segments is never 1 in the example (see ``_spare_segments``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.fx.experimental._config
from torch import Tensor

from ._checks import check_pattern
from .dilated_attention import dilated_attention_backward_op, dilated_attention_op

__all__ = [
    "dilated_attention_backward_decomposition",
    "dilated_attention_decomposition",
    "dilated_attention_decompositions",
]

_NEG_INF = float("-inf")


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    # Only when needed: a same-dtype .to() is an alias node in exported graphs.
    return x if x.dtype == dtype else x.to(dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # The ops' convention (docs/usage.md): float32 accumulation and lse, float64 for float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class _HeadBlock:
    """Query heads ``start + a * group + i`` (``a < repeats``, ``i < group``) attend under config
    ``(segment_length, rate)`` with offset ``first_offset + i``: one slice of the ``r`` axis per
    ``i`` picks the rows of all ``repeats`` heads that share that offset."""

    start: int
    repeats: int
    group: int
    first_offset: int
    segment_length: int
    rate: int

    @property
    def num_heads(self) -> int:
        return self.repeats * self.group


def _head_blocks(
    segment_lengths: Sequence[int], dilation_rates: Sequence[int], mode: str, num_heads: int
) -> list[list[_HeadBlock]]:
    """The head blocks of each config, in head order (together they cover the config's heads)."""
    configs = list(zip(segment_lengths, dilation_rates))
    if mode == "mixture":
        # Head h has offset h mod r: the first (H // r) * r heads are r-periodic, the rest (fewer
        # than r heads) have offsets 0, 1, ... in order.
        blocks = []
        for w, r in configs:
            periodic = num_heads // r * r
            config_blocks = []
            if periodic:
                config_blocks.append(_HeadBlock(0, num_heads // r, r, 0, w, r))
            if num_heads - periodic:
                config_blocks.append(_HeadBlock(periodic, 1, num_heads - periodic, 0, w, r))
            blocks.append(config_blocks)
        return blocks
    # head_groups: G contiguous groups, the first H mod G one head larger; group g uses config g
    # with offset g mod r_g.
    base, larger = divmod(num_heads, len(configs))
    blocks, start = [], 0
    for g, (w, r) in enumerate(configs):
        size = base + (1 if g < larger else 0)
        blocks.append([_HeadBlock(start, size, 1, g % r, w, r)])
        start += size
    return blocks


def _spare_segments(seq_len, w: int) -> int:
    """1 when ``seq_len`` is symbolic and its example value (the hint) fits in one segment of
    ``w``, else 0: the number of extra, fully padded segments the layout carries.

    Compilers read sizes from the example input. With one segment there, the number of segments
    S has example value 1, and torch 2.11's Inductor, matching ``[S * w] -> [S, w]`` reshapes by
    example sizes, proves ``S * w == w`` by guarding S == 1. An AOTInductor package checks no
    such guard at run time, so it would be wrong (or read out of bounds) for longer sequences.
    A spare segment keeps S >= 2 for every length, so no size is ever 1; it costs one segment of
    padded work per config, paid only by graphs traced from an example that short."""
    if isinstance(seq_len, int):
        return 0
    hint = getattr(seq_len.node, "hint", None)
    return 1 if hint is None or hint <= w else 0


class _Layout:
    """Moves ``[B, H, N, F]`` tensors of one head block to its dilated rows
    ``[B, repeats, group, segments, rows, F]`` and back.

    Written so that a symbolic ``N`` needs no guard: no tensor's size is the number of segments
    alone (which may be 1), and no slice of a padded axis is reshaped (whether that is a view
    depends on the padding); ``index_select`` takes the rows that are kept instead."""

    def __init__(self, block: _HeadBlock, seq_len, device: torch.device):
        self.block = block
        self.seq_len = seq_len
        self.device = device
        # min(w, N) when N is known; with a symbolic N, w gives the same pattern (see module doc)
        # and keeps every shape but the number of segments static.
        w = block.segment_length
        self.w = min(w, seq_len) if isinstance(seq_len, int) else w
        self.r = block.rate
        self.rows = -(-self.w // self.r)  # ceil(w / r)
        self.spare = _spare_segments(seq_len, self.w)
        # ceil(N / w) + spare, as (N + (w - 1 + spare * w)) // w: no symbolic subtraction in
        # the graph.
        self.segments = (seq_len + (self.w - 1 + self.spare * self.w)) // self.w
        # Whether each row is a real position: [group, S, rows]. Row j of offset o in segment s
        # is position s * w + j * r + o; rows past w pad the segment to rows * r. Computed
        # directly, with no reshape of a symbolic size.
        first, group = block.first_offset, block.group
        local = torch.arange(self.rows, device=device) * self.r + (
            torch.arange(group, device=device) + first
        ).unsqueeze(-1)  # [group, rows], static
        starts = torch.arange(self.segments, device=device) * self.w  # [S]
        position = starts.unsqueeze(-1) + local.unsqueeze(1)  # [group, S, rows]
        self.valid = (local < self.w).unsqueeze(1) & (position < seq_len)

    def _rows(self, x: Tensor, lead: tuple) -> Tensor:
        """[*lead, S * w, F] -> [*lead[:-1], group, S, rows, F] (``lead`` ends with ``group``,
        the group axis being chosen per offset)."""
        features = x.shape[-1]
        x = x.reshape(*lead, self.segments, self.w, features)
        if self.rows * self.r != self.w:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.rows * self.r - self.w))
        x = x.reshape(*lead, self.segments, self.rows, self.r, features)
        first, group = self.block.first_offset, self.block.group
        # One slice of the r axis per offset, stacked: a contiguous copy of N / r rows per head.
        picked = [x.select(len(lead) - 1, i)[..., first + i, :] for i in range(group)]
        return torch.stack(picked, dim=len(lead) - 1)

    def gather(self, x: Tensor) -> Tensor:
        """``x[:, block heads]`` ([B, H, N, F]) at the block's rows: [B, repeats, group, S, rows, F]."""
        b = self.block
        if b.num_heads != x.shape[1]:  # (a slice of every head would be an alias node)
            x = x[:, b.start : b.start + b.num_heads]
        if isinstance(self.seq_len, int):  # zeros up to whole segments
            x = torch.nn.functional.pad(x, (0, 0, 0, self.segments * self.w - self.seq_len))
        else:
            # A static pad, then the first S * w rows by index_select: a slice there would make
            # later shapes depend on min(N + w - 1, S * w), and a pad by S * w - N would put a
            # subtraction of symbolic sizes in the graph (Torch-TensorRT converts none).
            x = torch.nn.functional.pad(x, (0, 0, 0, (1 + self.spare) * self.w - 1))
            x = x.index_select(2, torch.arange(self.segments * self.w, device=x.device))
        lead = (x.shape[0], b.repeats, b.group)
        return self._rows(x.reshape(*lead, self.segments * self.w, x.shape[-1]), lead)

    def scatter(self, y: Tensor, fill: float) -> Tensor:
        """Inverse of ``gather``: [B, repeats, group, S, rows, F] -> [B, block heads, N, F], with
        ``fill`` at the positions that are not the block's rows."""
        b = self.block
        batch, features = y.shape[0], y.shape[-1]
        mine = torch.arange(self.r, device=y.device) == (
            torch.arange(b.group, device=y.device) + b.first_offset
        ).unsqueeze(-1)  # [group, r]: the slot of the r axis that holds each row
        y = torch.where(mine.view(b.group, 1, 1, self.r, 1), y.unsqueeze(-2), fill)
        y = y.reshape(batch, b.num_heads, self.segments, self.rows * self.r, features)
        if self.rows * self.r != self.w:
            y = y.index_select(3, torch.arange(self.w, device=y.device))
        y = y.reshape(batch, b.num_heads, self.segments * self.w, features)
        if isinstance(self.seq_len, int):
            return y[:, :, : self.seq_len]
        return y.index_select(2, torch.arange(self.seq_len, device=y.device))

    def mask(self, is_causal: bool) -> Tensor:
        """Which key rows each query row sees: [group, S, rows, rows] (broadcasts over B, repeats)."""
        keys = self.valid.unsqueeze(-2)
        if not is_causal:
            return keys
        rows = torch.arange(self.rows, device=self.device)
        # Rows of one offset keep position order, so causal is row order within the segment.
        return keys & (rows.unsqueeze(-1) >= rows)


def _expand_kv(x: Tensor, q_heads: int) -> Tensor:
    """[B, Hkv, N, F] -> [B, Hq, N, F], query head h reading kv head h // (Hq // Hkv)."""
    batch, kv_heads, seq_len, features = x.shape
    if kv_heads == q_heads:
        return x
    group = q_heads // kv_heads
    return x.unsqueeze(2).expand(batch, kv_heads, group, seq_len, features).reshape(
        batch, q_heads, seq_len, features
    )


def _reduce_kv(x: Tensor, kv_heads: int) -> Tensor:
    """Adjoint of ``_expand_kv``: sum the query heads that share a kv head."""
    batch, q_heads, seq_len, features = x.shape
    if kv_heads == q_heads:
        return x
    return x.reshape(batch, kv_heads, q_heads // kv_heads, seq_len, features).sum(2)


def _scale(scale: Optional[float], head_dim) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def _check(q: Tensor, k: Tensor, segment_lengths, dilation_rates, mode) -> None:
    check_pattern(segment_lengths, dilation_rates, mode).check_num_heads(q.shape[1])
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"the number of query heads ({q.shape[1]}) must be a multiple of the number of "
            f"key/value heads ({k.shape[1]})"
        )


def _rows_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for ``[..., S, rows, F]`` operands, each made contiguous first.

    matmul flattens the leading dims, a view. Inductor views a non-contiguous operand by
    reasoning on its sizes, and when the number of segments S is 1 in the example input it
    guards that S stays 1; an AOTInductor package checks no guard at run time, so it would
    silently give wrong results for longer sequences. Callers put the transposes on the small
    ``[rows, F]`` operands so that no ``[rows, rows]`` tensor is copied."""
    return torch.matmul(a.contiguous(), b.contiguous())


def _block_attention(
    layout: _Layout, q: Tensor, k: Tensor, v: Tensor, scale: float, is_causal: bool
) -> tuple[Tensor, Tensor]:
    """One head block under one config: out [B, h, N, Dv] and lse [B, h, N] (-inf off its rows)."""
    qr, kr, vr = layout.gather(q), layout.gather(k), layout.gather(v)
    scores = _rows_matmul(qr, kr.transpose(-1, -2)) * scale
    scores = torch.where(layout.mask(is_causal), scores, _NEG_INF)
    # Guarded softmax: a row without keys (only padding rows) has a zero denominator, out 0 and
    # lse -inf, never NaN, in the forward and the backward.
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(row_max == _NEG_INF, 0.0, row_max)
    weights = torch.exp(scores - row_max)
    denominator = weights.sum(dim=-1, keepdim=True)
    nonempty = denominator > 0
    denominator = torch.where(nonempty, denominator, 1.0)
    out = _rows_matmul(weights, vr) / denominator
    lse = torch.where(nonempty, torch.log(denominator) + row_max, _NEG_INF)
    return layout.scatter(out, 0.0), layout.scatter(lse, _NEG_INF).squeeze(-1)


def size_oblivious() -> contextlib.AbstractContextManager:
    """Trace or lower with a symbolic N without specialising on the number of segments being 1.

    With a symbolic N the number of segments S = ceil(N / w) is symbolic too and may be 1, and
    reshapes and contiguity checks would otherwise specialise the graph to S >= 2 (or S == 1)
    from the example input. Every operation here is correct for S == 1 as well (S is never
    broadcast against a size-1 dimension), so it can be traced size-obliviously, as
    torch.onnx does for all of its decompositions. ``aot_compile`` lowers under it too: Inductor
    reads sizes from the example input, and a package checks no guard at run time, so an
    example with one segment would otherwise give code that is wrong for longer sequences."""
    config = torch.fx.experimental._config
    if hasattr(config, "backed_size_oblivious"):
        return config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _sum(tensors: list[Tensor]) -> Tensor:
    return functools.reduce(operator.add, tensors)


def _merge(outs: list[Tensor], lses: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Log-sum-exp merge of per-config results (LongNet eq. 10); rows empty in every config
    give out 0 and lse -inf."""
    if len(outs) == 1:
        return outs[0], lses[0]
    lse = torch.stack(lses)
    top = lse.amax(dim=0)
    top = torch.where(top == _NEG_INF, 0.0, top)
    weights = torch.exp(lse - top)  # [C, B, H, N]
    total = weights.sum(dim=0)
    nonempty = total > 0
    total = torch.where(nonempty, total, 1.0)
    out = _sum([o * (w / total).unsqueeze(-1) for o, w in zip(outs, weights.unbind(0))])
    return out, torch.where(nonempty, torch.log(total) + top, _NEG_INF)


def dilated_attention_decomposition(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
) -> tuple[Tensor, Tensor]:
    """``torch.ops.dilated_compile.dilated_attention`` in aten ops (same arguments, same results).

    Args:
        q: ``[B, Hq, N, D]``; k: ``[B, Hkv, N, D]``; v: ``[B, Hkv, N, Dv]`` (``Hq % Hkv == 0``).
        segment_lengths, dilation_rates, mode, is_causal, scale: as for the op.

    Returns:
        ``(out, lse)``: ``[B, Hq, N, Dv]`` in ``q.dtype`` and ``[B, Hq, N]`` in float32 (float64
        for float64 inputs). Computed in that float precision, like the op.

    Cost: ``O(N * w / r)`` time and memory per head and config; ``N`` may be symbolic.

    Example::

        >>> q = k = v = torch.randn(1, 4, 100, 16)
        >>> out, lse = dilated_attention_decomposition(q, k, v, [32, 64], [1, 2], "mixture", True, None)
    """
    with size_oblivious():
        return _forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale)


def _forward(q, k, v, segment_lengths, dilation_rates, mode, is_causal, scale):
    _check(q, k, segment_lengths, dilation_rates, mode)
    batch, q_heads, seq_len, head_dim = q.shape
    cdtype = _accumulation_dtype(q.dtype)
    scale = _scale(scale, head_dim)
    if isinstance(seq_len, int) and seq_len == 0:
        out = q.new_zeros(batch, q_heads, 0, v.shape[-1])
        return out, q.new_zeros(batch, q_heads, 0, dtype=cdtype)
    qc = _cast(q, cdtype)
    kc = _expand_kv(_cast(k, cdtype), q_heads)
    vc = _expand_kv(_cast(v, cdtype), q_heads)
    config_outs, config_lses = [], []
    for blocks in _head_blocks(segment_lengths, dilation_rates, mode, q_heads):
        outs, lses = [], []
        for block in blocks:
            layout = _Layout(block, seq_len, q.device)
            out, lse = _block_attention(layout, qc, kc, vc, scale, is_causal)
            outs.append(out)
            lses.append(lse)
        config_outs.append(outs[0] if len(outs) == 1 else torch.cat(outs, dim=1))
        config_lses.append(lses[0] if len(lses) == 1 else torch.cat(lses, dim=1))
    if mode == "head_groups":  # configs hold disjoint heads, in order
        out, lse = torch.cat(config_outs, dim=1), torch.cat(config_lses, dim=1)
    else:
        out, lse = _merge(config_outs, config_lses)
    return _cast(out, q.dtype), lse


def dilated_attention_backward_decomposition(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
    segment_lengths: Sequence[int],
    dilation_rates: Sequence[int],
    mode: str,
    is_causal: bool,
    scale: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.dilated_compile.dilated_attention_backward`` in aten ops: ``(dq, dk, dv)``.

    FlashAttention-2 style, like the op: with the final ``lse`` and ``delta = rowsum(dO * O) -
    dL/dlse``, each config's probabilities ``P = exp(S - lse)`` are recomputed on its rows and
    ``dV += P^T dO``, ``dS = P * (dO V^T - delta) * scale``, ``dQ += dS K``, ``dK += dS^T Q``.
    Same cost bound as the forward decomposition.

    Example::

        >>> args = ([32, 64], [1, 2], "mixture", True, None)
        >>> out, lse = dilated_attention_decomposition(q, k, v, *args)
        >>> dq, dk, dv = dilated_attention_backward_decomposition(
        ...     torch.ones_like(out), q, k, v, out, lse, None, *args)
    """
    with size_oblivious():
        return _backward(
            grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode,
            is_causal, scale,
        )


def _backward(
    grad_out, q, k, v, out, lse, grad_lse, segment_lengths, dilation_rates, mode, is_causal, scale
):
    _check(q, k, segment_lengths, dilation_rates, mode)
    batch, q_heads, seq_len, head_dim = q.shape
    kv_heads = k.shape[1]
    cdtype = _accumulation_dtype(q.dtype)
    scale = _scale(scale, head_dim)
    if isinstance(seq_len, int) and seq_len == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qc, doc = _cast(q, cdtype), _cast(grad_out, cdtype)
    kc = _expand_kv(_cast(k, cdtype), q_heads)
    vc = _expand_kv(_cast(v, cdtype), q_heads)
    delta = (doc * _cast(out, cdtype)).sum(-1)
    if grad_lse is not None:
        delta = delta - _cast(grad_lse, cdtype)
    # Every real row of a block attends at least itself, so its lse is finite; rows that attend
    # nothing are never gathered. 0 keeps padding rows finite (their dO is 0).
    lse = _cast(lse, cdtype)
    lse = torch.where(lse == _NEG_INF, 0.0, lse).unsqueeze(-1)
    delta = delta.unsqueeze(-1)
    dq_parts, dk_parts, dv_parts = [], [], []
    for blocks in _head_blocks(segment_lengths, dilation_rates, mode, q_heads):
        dqs, dks, dvs = [], [], []
        for block in blocks:
            layout = _Layout(block, seq_len, q.device)
            qr, kr, vr = layout.gather(qc), layout.gather(kc), layout.gather(vc)
            dor = layout.gather(doc)
            scores = _rows_matmul(qr, kr.transpose(-1, -2)) * scale
            scores = torch.where(layout.mask(is_causal), scores, _NEG_INF)
            p = torch.exp(scores - layout.gather(lse))
            dp = _rows_matmul(dor, vr.transpose(-1, -2))
            ds = p * (dp - layout.gather(delta)) * scale
            dqs.append(layout.scatter(_rows_matmul(ds, kr), 0.0))
            # dK = dS^T Q and dV = P^T dO, as (Q^T dS)^T and (dO^T P)^T: see _rows_matmul.
            dks.append(layout.scatter(_rows_matmul(qr.transpose(-1, -2), ds).transpose(-1, -2), 0.0))
            dvs.append(layout.scatter(_rows_matmul(dor.transpose(-1, -2), p).transpose(-1, -2), 0.0))
        for parts, pieces in ((dq_parts, dqs), (dk_parts, dks), (dv_parts, dvs)):
            parts.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    if mode == "head_groups":  # configs hold disjoint heads, in order
        dq, dk, dv = (torch.cat(parts, dim=1) for parts in (dq_parts, dk_parts, dv_parts))
    else:
        dq, dk, dv = (_sum(parts) for parts in (dq_parts, dk_parts, dv_parts))
    dk, dv = _reduce_kv(dk, kv_heads), _reduce_kv(dv, kv_heads)
    return _cast(dq, q.dtype), _cast(dk, k.dtype), _cast(dv, v.dtype)


def dilated_attention_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """A decomposition table for the ``torch.ops.dilated_compile.*`` ops.

    Use it with ``ExportedProgram.run_decompositions`` (only our ops are decomposed), merged into
    ``torch.export.default_decompositions()`` (core ATen and our ops), or with ``make_fx``.

    Example::

        >>> program = dilated_compile.export(model, (x,))
        >>> plain = program.run_decompositions(dilated_attention_decompositions())
        >>> table = torch.export.default_decompositions()
        >>> table.update(dilated_attention_decompositions())
        >>> core_aten = program.run_decompositions(table)
    """
    return {
        dilated_attention_op: dilated_attention_decomposition,
        dilated_attention_backward_op: dilated_attention_backward_decomposition,
    }
