"""Float64 dense reference for dilated and block-sparse attention.

Everything here is written directly from the definitions (dilated attention: LongNet, Ding et
al., 2023; block-sparse attention: ``BlockSparseSpec``) and shares no code with the ops in
``dilated_compile.ops`` beyond the definition of the block-sparse random draws
(``random_key_blocks``): it materialises the full ``[N, N]`` count matrix, so it is meant for
checking results on short sequences (a few hundred positions), not for running models.

Block-sparse attention is the same formula with a 0/1 count matrix: ``c[h, p, t] = 1`` when the
block layout keeps ``(p // bs, t // bs)`` for head ``h`` (see ``block_layout``) and, when causal,
``t <= p``.

Definition. For a config ``(w_i, r_i)`` on a sequence of length ``N``: ``w = min(w_i, N)``; the
segments are ``[s*w, min((s+1)*w, N))`` (the last one may be shorter); the local index of
position ``p`` is ``p mod w``. Query ``p`` attends key ``t`` under the config, for a head whose
offset is ``o``, iff ``p // w == t // w``, ``(p mod w) mod r_i == o``, ``(t mod w) mod r_i == o``
and, when causal, ``t <= p``. Head offsets depend on the spec's mode:

* ``"mixture"``: every head uses every config; head ``h`` uses offset ``h mod r_i``.
* ``"head_groups"``: the heads are split into ``G = len(configs)`` contiguous groups, the first
  ``H mod G`` groups one head larger; group ``g`` uses config ``g`` only, with offset
  ``g mod r_g``.

With ``c[h, p, t]`` the number of configs under which ``p`` attends ``t`` for head ``h`` and
``s_pt = scale * q_p . k_t``::

    out_p = sum_t c[p, t] exp(s_pt) v_t / sum_t c[p, t] exp(s_pt)
    lse_p = log sum_t c[p, t] exp(s_pt)

A row with no key (``c[p, :] == 0``) has ``out_p = 0`` and ``lse_p = -inf``.

Fewer queries than keys (``Nq <= Nk``, the KV-cache convention): the pattern is defined on the
key sequence, ``N = Nk``, and query ``i`` stands at position ``Nk - Nq + i`` (so causal keeps the
keys ``t <= Nk - Nq + i``). A mask ``attn_mask`` (broadcastable to ``[B, Hq, Nq, Nk]``, as in
SDPA) is applied on top of the pattern: a bool mask (True = keep) removes pairs, a float mask is
added to the scores::

    out_p = sum_t c[p,t] keep[p,t] exp(s_pt + m_pt) v_t / sum_t c[p,t] keep[p,t] exp(s_pt + m_pt)

A row left with no key (by the pattern or the mask, a float mask of ``-inf`` included) gives
``out_p = 0``, ``lse_p = -inf`` and zero gradients.
"""

from __future__ import annotations

import math

import torch

from dilated_compile.block_sparse_spec import BlockSparseSpec
from dilated_compile.ops._block_layout import random_key_blocks
from dilated_compile.spec import DilatedSpec

__all__ = ["block_layout", "count_matrix", "dense_reference"]

_SPECS = (DilatedSpec, BlockSparseSpec)


def block_layout(
    spec: BlockSparseSpec, num_heads: int, seq_len: int, *, is_causal: bool = False
) -> torch.Tensor:
    """Which key blocks each query block keeps: ``[H, M, M]`` bool (on the CPU) for the
    ``M = ceil(seq_len / block_size)`` blocks of positions of a sequence.

    Straight from the definition: block ``(i, j)`` is kept when ``|i - j| <= local_blocks``
    (unless None), ``i < global_blocks`` or ``j < global_blocks``, ``j`` is one of row ``i``'s
    ``random_blocks`` draws (``random_key_blocks``: among ``[0, M)``, or ``[0, i]`` when causal),
    or the explicit layout keeps it; when causal, only ``j <= i``.

    Example::

        >>> block_layout(BlockSparseSpec(4, local_blocks=1), 1, 16)[0].int()
        tensor([[1, 1, 0, 0],
                [1, 1, 1, 0],
                [0, 1, 1, 1],
                [0, 0, 1, 1]], dtype=torch.int32)
    """
    if not isinstance(spec, BlockSparseSpec):
        raise ValueError(f"block_layout: spec must be a BlockSparseSpec, got {spec!r}")
    spec.check_num_heads(num_heads)
    spec.check_length(seq_len)
    m = spec.num_blocks(seq_len)
    i = torch.arange(m).view(m, 1)
    j = torch.arange(m).view(1, m)
    kept = torch.zeros(num_heads, m, m, dtype=torch.bool)
    if spec.local_blocks is not None:
        kept |= (i - j).abs() <= spec.local_blocks
    if spec.global_blocks:
        kept |= (i < spec.global_blocks) | (j < spec.global_blocks)
    if spec.random_blocks:
        rows = torch.arange(m)
        choices = torch.clamp(rows + 1, max=m) if is_causal else torch.full((m,), m)
        draws = random_key_blocks(spec.seed, num_heads, rows, choices, spec.random_blocks)
        for h in range(num_heads):
            for row in range(m):
                for block in draws[h, row].tolist():
                    if block >= 0:
                        kept[h, row, block] = True
    if spec.layout is not None:
        kept |= spec.layout[:, :m, :m].cpu()
    if is_causal:
        kept &= j <= i
    return kept


def _head_configs(spec: DilatedSpec, num_heads: int) -> list[list[tuple[int, int, int]]]:
    """For each head, the ``(segment_length, dilation_rate, offset)`` triples it uses."""
    if spec.mode == "mixture":
        return [[(w, r, h % r) for w, r in spec.configs] for h in range(num_heads)]
    # head_groups: G contiguous groups, the first (H mod G) of them one head larger.
    num_groups = spec.num_configs
    base, extra = divmod(num_heads, num_groups)
    heads: list[list[tuple[int, int, int]]] = []
    for g, (w, r) in enumerate(spec.configs):
        group_size = base + (1 if g < extra else 0)
        heads.extend([[(w, r, g % r)] for _ in range(group_size)])
    return heads


def count_matrix(
    spec: DilatedSpec | BlockSparseSpec,
    seq_len: int,
    num_heads: int,
    *,
    is_causal: bool = False,
    query_len: int | None = None,
) -> torch.Tensor:
    """How many configs of ``spec`` let each query attend each key (for a ``BlockSparseSpec``:
    1 where its block layout keeps the pair, else 0).

    Args:
        spec: the pattern, a ``DilatedSpec`` or a ``BlockSparseSpec``.
        seq_len: the sequence length ``N`` (``>= 0``): the number of keys, on whose positions
            the pattern is defined.
        num_heads: the number of query heads ``H`` (``>= 1``; ``mode="head_groups"`` needs
            ``H >= len(spec.configs)``).
        is_causal: when True, a query at position ``P`` only attends keys ``t <= P``.
        query_len: the number of queries ``Nq`` (``0 <= Nq <= N``; default ``N``). Query ``i``
            stands at position ``P_i = N - Nq + i`` (the last ``Nq`` positions, as with a KV
            cache).

    Returns:
        ``torch.LongTensor`` of shape ``[H, Nq, N]`` (on the CPU): ``c[h, i, t]`` is the number
        of configs under which query ``i`` attends key ``t`` for head ``h``.

    Raises:
        ValueError: when ``spec`` is not a ``DilatedSpec``, ``seq_len`` is negative,
            ``query_len`` is outside ``[0, seq_len]``, ``num_heads`` is not positive, or
            ``head_groups`` has fewer heads than configs.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(4,), dilation_rates=(2,))
        >>> count_matrix(spec, 4, num_heads=2)[1]
        tensor([[0, 0, 0, 0],
                [0, 1, 0, 1],
                [0, 0, 0, 0],
                [0, 1, 0, 1]])
        >>> count_matrix(spec, 4, num_heads=2, query_len=1)[1]  # the row of position 3
        tensor([[0, 1, 0, 1]])
    """
    if not isinstance(spec, _SPECS):
        raise ValueError(f"count_matrix: spec must be a DilatedSpec or BlockSparseSpec, got {spec!r}")
    if seq_len < 0:
        raise ValueError(f"count_matrix: seq_len must be >= 0, got {seq_len}")
    if num_heads < 1:
        raise ValueError(f"count_matrix: num_heads must be >= 1, got {num_heads}")
    n = int(seq_len)
    nq = n if query_len is None else int(query_len)
    if not 0 <= nq <= n:
        raise ValueError(
            f"count_matrix: query_len must be in [0, seq_len] = [0, {n}], got {query_len}"
        )
    spec.check_num_heads(num_heads)

    counts = torch.zeros(num_heads, nq, n, dtype=torch.long)
    if n == 0 or nq == 0:
        return counts
    p = torch.arange(n - nq, n).view(nq, 1)  # query positions, down the rows
    t = torch.arange(n).view(1, n)  # key positions, along the columns
    if isinstance(spec, BlockSparseSpec):
        blocks = block_layout(spec, num_heads, n, is_causal=is_causal)  # [H, M, M]
        attends = blocks[:, p // spec.block_size, t // spec.block_size]
        if is_causal:
            attends = attends & (t <= p)
        return attends.long()
    for h, configs in enumerate(_head_configs(spec, num_heads)):
        for segment_length, rate, offset in configs:
            w = min(segment_length, n)
            same_segment = (p // w) == (t // w)
            query_on = ((p % w) % rate) == offset
            key_on = ((t % w) % rate) == offset
            attends = same_segment & query_on & key_on
            if is_causal:
                attends = attends & (t <= p)
            counts[h] += attends.long()
    return counts


def dense_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: DilatedSpec | BlockSparseSpec,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Dilated (or block-sparse) attention computed densely in float64, straight from the
    definition.

    Args:
        q: ``[B, Hq, Nq, D]`` queries; query ``i`` stands at position ``Nk - Nq + i``.
        k: ``[B, Hkv, Nk, D]`` keys (``Nq <= Nk``); the pattern is defined on ``N = Nk``.
        v: ``[B, Hkv, Nk, Dv]`` values.
        spec: the pattern: a ``DilatedSpec``, or a ``BlockSparseSpec`` (0/1 counts from
            ``block_layout``).
        is_causal: when True, the query at position ``P`` only attends keys ``t <= P``
            (bottom-right aligned when ``Nq < Nk``).
        scale: the softmax scale; ``None`` means ``1 / sqrt(D)``.
        enable_gqa: allow ``Hq != Hkv`` (grouped-query attention, as in
            ``torch.nn.functional.scaled_dot_product_attention``): ``Hq`` must be a multiple of
            ``Hkv`` and query head ``h`` uses kv head ``h // (Hq // Hkv)``.
        return_lse: also return the log-sum-exp of each row.
        attn_mask: ``None``, or a mask broadcastable to ``[B, Hq, Nq, Nk]`` applied on top of
            the pattern, as SDPA takes it: bool (True = keep the pair) or floating (added to the
            score, ``-inf`` removes the pair). Computed in float64; it gets no gradient. It may
            be combined with ``is_causal`` here (the ops refuse that combination).

    Returns:
        ``out``: ``[B, Hq, Nq, Dv]`` float64, with
        ``out_p = sum_t c[p,t] keep[p,t] exp(s_pt + m_pt) v_t / sum_t (the same weights)``
        where ``c`` is :func:`count_matrix` (with ``query_len=Nq``), ``s_pt = scale * q_p . k_t``,
        ``keep`` the bool mask (all True otherwise) and ``m`` the float mask (0 otherwise). With
        ``return_lse=True``, the pair ``(out, lse)``, ``lse`` of shape ``[B, Hq, Nq]`` float64,
        ``lse_p = log sum_t c[p,t] keep[p,t] exp(s_pt + m_pt)``. Rows with no key give
        ``out_p = 0`` and ``lse_p = -inf``.

    The result is differentiable with respect to ``q``, ``k`` and ``v`` (also through ``lse``);
    rows with no key contribute exactly zero gradient and never produce NaN.

    Raises:
        ValueError: on mismatched shapes, ``Nq > Nk``, ``Hq != Hkv`` without ``enable_gqa``,
            ``Hq`` not a multiple of ``Hkv``, ``head_groups`` with fewer query heads than
            configs, or a mask that does not broadcast to ``[B, Hq, Nq, Nk]``.
        TypeError: on a mask that is neither bool nor floating.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(4, 8), dilation_rates=(1, 2))
        >>> q = torch.randn(2, 4, 10, 16)
        >>> k, v = torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 32)
        >>> out, lse = dense_reference(q, k, v, spec, enable_gqa=True, return_lse=True)
        >>> out.shape, out.dtype, lse.shape
        (torch.Size([2, 4, 10, 32]), torch.float64, torch.Size([2, 4, 10]))
        >>> padding = torch.tensor([[True] * 10, [True] * 7 + [False] * 3]).view(2, 1, 1, 10)
        >>> last = dense_reference(q[:, :, -1:], k, v, spec, enable_gqa=True, attn_mask=padding)
        >>> last.shape
        torch.Size([2, 4, 1, 32])
    """
    if not isinstance(spec, _SPECS):
        raise ValueError(
            f"dense_reference: spec must be a DilatedSpec or BlockSparseSpec, got {spec!r}"
        )
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(
                f"dense_reference: {name} must have shape [B, H, N, D], got {tuple(x.shape)}"
            )
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, seq_len = k.shape[1], k.shape[2]
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(
            f"dense_reference: k must have shape [{batch}, Hkv, Nk, {head_dim}] to match "
            f"q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if q_len > seq_len:
        raise ValueError(
            f"dense_reference: q has {q_len} positions but k only {seq_len}; the queries are "
            "the last Nq <= Nk positions of the key sequence"
        )
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise ValueError(
            f"dense_reference: v must have shape {tuple(k.shape[:3])} + [Dv] to match k, "
            f"got {tuple(v.shape)}"
        )
    if kv_heads < 1 or q_heads % kv_heads != 0:
        raise ValueError(
            f"dense_reference: the query heads ({q_heads}) must be a multiple of the kv heads "
            f"({kv_heads})"
        )
    if q_heads != kv_heads and not enable_gqa:
        raise ValueError(
            f"dense_reference: q has {q_heads} heads but k/v have {kv_heads}; pass "
            "enable_gqa=True for grouped-query attention"
        )
    spec.check_num_heads(q_heads)
    full_shape = (batch, q_heads, q_len, seq_len)
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(
                f"dense_reference: attn_mask must be bool or floating, got {attn_mask.dtype}"
            )
        if attn_mask.dim() > 4 or any(
            m not in (1, f) for m, f in zip(reversed(attn_mask.shape), reversed(full_shape))
        ):
            raise ValueError(
                f"dense_reference: attn_mask must broadcast to [B, Hq, Nq, Nk] = "
                f"{list(full_shape)}, got {tuple(attn_mask.shape)}"
            )
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)

    f64 = torch.float64
    q64, k64, v64 = q.to(f64), k.to(f64), v.to(f64)
    group = q_heads // kv_heads
    if group > 1:
        # Query head h reads kv head h // group.
        k64 = k64.repeat_interleave(group, dim=1)
        v64 = v64.repeat_interleave(group, dim=1)
    value_dim = v64.shape[-1]

    if q_len == 0 or seq_len == 0:
        # Nothing to attend; keep the (empty) result connected to the inputs for autograd.
        anchor = (q64.sum() + k64.sum() + v64.sum()) * 0.0
        out = anchor + q64.new_zeros(batch, q_heads, q_len, value_dim)
        lse = anchor + q64.new_zeros(batch, q_heads, q_len)
        return (out, lse) if return_lse else out

    counts = count_matrix(spec, seq_len, q_heads, is_causal=is_causal, query_len=q_len)
    attends = (counts > 0).to(q.device)  # [Hq, Nq, Nk], broadcasts over the batch
    log_counts = counts.to(device=q.device, dtype=f64).clamp_min(1).log()
    bias = torch.zeros((), dtype=f64, device=q.device)
    if attn_mask is not None:
        mask = attn_mask.detach().to(q.device)
        if mask.dtype == torch.bool:
            attends = attends & mask  # -> [B, Hq, Nq, Nk] (or a broadcast of it)
        else:
            bias = mask.to(f64)
            attends = attends & (bias > -math.inf)  # -inf removes the pair
    attends = attends.expand(full_shape)

    scores = scale * torch.matmul(q64, k64.transpose(-2, -1))  # [B, Hq, Nq, Nk]
    # log(c) folds the multiplicity into the exponent: c * exp(s) = exp(s + log c).
    # torch.where (not addition of -inf) keeps removed pairs out of the gradient.
    logits = torch.where(attends, scores + log_counts + torch.where(attends, bias, 0.0), -math.inf)

    # Guarded softmax: subtract a finite row maximum (0 for empty rows) so exp never sees
    # -inf - (-inf); empty rows then have all-zero weights and a zero denominator.
    row_max = logits.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe_denom = torch.where(nonempty, denom, torch.ones_like(denom))

    out = torch.matmul(weights, v64) / safe_denom  # empty rows: 0 / 1 = 0
    if not return_lse:
        return out
    lse = torch.where(nonempty, safe_denom.log() + row_max, -math.inf).squeeze(-1)
    return out, lse
