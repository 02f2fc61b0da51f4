"""Relative positions for dilated attention: rotary embeddings and xPos.

Both rotate queries and keys by position-dependent angles so that ``q_p . k_t`` depends on
``p - t`` only; xPos also scales them so that the score decays with distance. They act on the
``[B, H, N, D]`` tensors right before attention, so every position stays a function of the
absolute token index alone — which is what lets incremental decoding reuse cached keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, Su et al. 2021).

    Channel pair ``i`` of a head (channels ``i`` and ``i + D/2``) is rotated by the angle
    ``p * base^(-2i/D)`` at position ``p``, so ``rope(q)_p . rope(k)_t`` depends only on
    ``p - t``.

    Args:
        head_dim: ``D``, even.
        base: the frequency base (10000 in RoFormer).

    ``forward(query, key, positions)``: ``query`` ``[B, Hq, N, D]``, ``key`` ``[B, Hkv, N, D]``,
    ``positions`` an integer tensor ``[N]``; returns the rotated pair, in the input dtype (angles
    are computed in float64, the rotation in float32 or float64). No parameters, no state.

    Example::

        >>> rope = RotaryEmbedding(head_dim=16)
        >>> q = k = torch.randn(2, 4, 10, 16)
        >>> q, k = rope(q, k, torch.arange(10))
    """

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
            raise ValueError(
                f"{type(self).__name__}: head_dim must be a positive even int (channels are "
                f"rotated in pairs), got {head_dim!r}"
            )
        if base <= 1:
            raise ValueError(f"{type(self).__name__}: base must be > 1, got {base!r}")
        self.head_dim = head_dim
        self.base = float(base)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, base={self.base}"

    def _pair_index(self, device: torch.device) -> Tensor:
        """``2i / D`` for each channel pair ``i``, float64."""
        return torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=device) / self.head_dim

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate ``x`` ``[..., N, D]`` at ``positions`` ``[N]``."""
        angles = positions.to(torch.float64).unsqueeze(-1) * self.base ** -self._pair_index(x.device)
        cdtype = _compute_dtype(x.dtype)
        cos, sin = angles.cos().to(cdtype), angles.sin().to(cdtype)
        x1, x2 = x.to(cdtype).chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, query: Tensor, key: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rotate(query, positions), self.rotate(key, positions)


class XPos(RotaryEmbedding):
    """xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer"): rotary angles plus a
    scale that makes scores decay with distance.

    With ``zeta_i = (2i/D + gamma) / (1 + gamma)`` and ``e(p) = (p - a(p)) / scale_base``,
    pair ``i`` of the rotated query at ``p`` is multiplied by ``zeta_i^e(p)`` and of the rotated
    key at ``t`` by ``zeta_i^-e(t)``, so the score carries ``zeta_i^((p - t) / scale_base)``
    whenever ``a(p) = a(t)``.

    The anchor ``a``: xPos centres the exponent on the sequence to keep it small. Dilated
    attention never relates positions of different *blocks* when ``block`` is a multiple of
    every segment length (``LongNetLM`` passes the least common multiple), so here the anchor is
    the centre of the token's block: ``a(p) = floor(p / block) * block + block // 2``. The
    scores are those of xPos, the exponent is bounded by ``block / (2 * scale_base)`` however
    long the sequence, and it does not depend on the sequence length (so cached keys stay valid
    while decoding). ``block=None`` anchors at 0: plain xPos without centring, whose scales
    leave the float32 range after some 35k positions.

    Args:
        head_dim: ``D``, even.
        block: see above; a multiple of every segment length of the attention it serves.
        base: rotary frequency base.
        scale_base: xPos's length scale (512).
        gamma: xPos's ``gamma`` (0.4).

    Example::

        >>> xpos = XPos(head_dim=16, block=64)
        >>> q = k = torch.randn(2, 4, 100, 16)
        >>> q, k = xpos(q, k, torch.arange(100))
    """

    def __init__(
        self,
        head_dim: int,
        block: int | None = None,
        base: float = 10000.0,
        scale_base: float = 512.0,
        gamma: float = 0.4,
    ) -> None:
        super().__init__(head_dim, base)
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"XPos: block must be a positive int or None, got {block!r}")
        if scale_base <= 0:
            raise ValueError(f"XPos: scale_base must be positive, got {scale_base!r}")
        if gamma <= 0:
            raise ValueError(f"XPos: gamma must be positive, got {gamma!r}")
        self.block = block
        self.scale_base = float(scale_base)
        self.gamma = float(gamma)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, block={self.block}, scale_base={self.scale_base}, gamma={self.gamma}"

    def _scale(self, positions: Tensor, device: torch.device) -> Tensor:
        """``zeta^e(p)`` per position and channel: ``[N, D]`` float64."""
        p = positions.to(device=device, dtype=torch.float64)
        if self.block is None:
            anchor = torch.zeros_like(p)
        else:
            anchor = torch.div(p, self.block, rounding_mode="floor") * self.block + self.block // 2
        zeta = (self._pair_index(device) + self.gamma) / (1.0 + self.gamma)
        scale = zeta ** ((p - anchor) / self.scale_base).unsqueeze(-1)
        return torch.cat((scale, scale), dim=-1)

    def forward(self, query: Tensor, key: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        scale = self._scale(positions, query.device)
        q_scale = scale.to(_compute_dtype(query.dtype))
        k_scale = scale.reciprocal().to(_compute_dtype(key.dtype))
        query = (self.rotate(query, positions).to(q_scale.dtype) * q_scale).to(query.dtype)
        key = (self.rotate(key, positions).to(k_scale.dtype) * k_scale).to(key.dtype)
        return query, key
