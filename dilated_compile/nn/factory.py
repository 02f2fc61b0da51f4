"""``create_multihead_dilated_attention``: the factory of earlier dilated-attention packages.

Every kind returns a ``MultiheadDilatedAttention`` computing the same exact dilated attention;
kinds differ only in how it runs (eager calls of the fused op, or compiled).
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from .multihead import MultiheadDilatedAttention

#: The kinds ``create_multihead_dilated_attention`` accepts (besides the aliases below).
KINDS = ("auto", "eager", "compiled")
# Single-device kinds of earlier packages: both computed dilated attention on one device, which
# is what "auto" picks the best way to run here.
_AUTO_ALIASES = ("standard", "improved")
# Kinds of earlier packages that change the algorithm or the parallelism, not the way it runs.
_NOT_MODULE_KINDS = (
    "ring", "distributed", "improved_distributed", "ring_distributed", "block_sparse_ring",
    "block_sparse_ring_distributed",
)
_MODULE_ARGUMENTS = tuple(inspect.signature(MultiheadDilatedAttention.__init__).parameters)[1:]


def resolve_kind(kind: str = "auto", device: torch.device | str | None = None) -> str:
    """What ``kind`` means on ``device`` (default: the default device): ``"eager"`` or
    ``"compiled"``. ``"auto"`` is ``"compiled"`` (the Triton kernels, fused by Inductor) on a
    CUDA device with Triton installed, and ``"eager"`` (the fused op called directly, no
    compilation delay) elsewhere."""
    if not isinstance(kind, str):
        raise TypeError(
            f"kind must be a string, one of {KINDS}, got {kind!r}; pass the module's arguments by "
            "keyword: create_multihead_dilated_attention('auto', embed_dim=..., num_heads=..., "
            "segment_lengths=..., dilation_rates=...)"
        )
    if kind in _AUTO_ALIASES:
        kind = "auto"
    if kind in _NOT_MODULE_KINDS:
        raise ValueError(
            f"kind={kind!r} names a sequence-parallel or block-sparse variant of another package, "
            "which computes something else or across processes; it is not a module kind here. Use "
            f"one of {KINDS}: each computes exact dilated attention on one device."
        )
    if kind not in KINDS:
        raise ValueError(
            f"kind must be one of {KINDS} (or the aliases {_AUTO_ALIASES} for 'auto'), got {kind!r}"
        )
    if kind != "auto":
        return kind
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "compiled"
    return "eager"


def create_multihead_dilated_attention(
    kind: str = "auto",
    embed_dim: int = 768,
    num_heads: int = 12,
    segment_lengths: Sequence[int] = (2048, 4096, 8192),
    dilation_rates: Sequence[int] = (1, 2, 4),
    *,
    attention_type: str | None = None,
    compile_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> MultiheadDilatedAttention:
    """A ``MultiheadDilatedAttention``, run the way ``kind`` says.

    Args:
        kind: ``"auto"`` (by device and what is installed, see ``resolve_kind``), ``"eager"``
            (the module as it is: each call runs the fused op) or ``"compiled"`` (the module
            compiled in place with ``backend="dilated_compile"``, its ``state_dict`` keys
            unchanged). ``"standard"`` and ``"improved"``, the single-device kinds of earlier
            packages, mean ``"auto"``. Every kind gives the same exact results.
        embed_dim, num_heads, segment_lengths, dilation_rates: of the module (the defaults of
            earlier packages).
        attention_type: the earlier name of ``kind`` (give one of the two).
        compile_kwargs: extra ``torch.compile`` arguments for ``"compiled"`` (``dynamic``,
            ``mode``, ...).
        **kwargs: any other argument of ``MultiheadDilatedAttention`` (``dropout``, ``bias``,
            ``batch_first``, ``layer_norm``, ``gamma_init``, ``num_kv_heads``, ``device``,
            ``dtype``, ``mode``, ...). An unknown name raises ``TypeError`` (earlier packages
            dropped them silently).

    Example::

        >>> attention = create_multihead_dilated_attention(
        ...     "auto", embed_dim=512, num_heads=8, segment_lengths=(1024, 2048), dilation_rates=(1, 2))
        >>> y, _ = attention(x, x, x, is_causal=True)
    """
    if attention_type is not None:
        if kind != "auto":
            raise TypeError(
                f"pass kind or attention_type (its earlier name), not both: got kind={kind!r}, "
                f"attention_type={attention_type!r}"
            )
        kind = attention_type
    unknown = sorted(set(kwargs) - set(_MODULE_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"create_multihead_dilated_attention: unknown argument(s) {unknown} for "
            f"MultiheadDilatedAttention, whose arguments are {list(_MODULE_ARGUMENTS)}"
        )
    if compile_kwargs is not None and "backend" in compile_kwargs:
        raise TypeError("compile_kwargs: the backend is always 'dilated_compile'")
    resolved = resolve_kind(kind, kwargs.get("device"))
    module = MultiheadDilatedAttention(embed_dim, num_heads, segment_lengths, dilation_rates, **kwargs)
    if resolved == "compiled":
        module.compile(backend="dilated_compile", **(compile_kwargs or {}))
    elif compile_kwargs:
        raise TypeError(
            f"compile_kwargs given, but kind {kind!r} resolved to 'eager', which compiles nothing"
        )
    return module
