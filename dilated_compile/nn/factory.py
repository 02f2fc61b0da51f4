"""``create_multihead_dilated_attention``: the factory of earlier dilated-attention packages.

Every kind returns a ``MultiheadDilatedAttention``. The dilated kinds compute the same exact
dilated attention and differ only in how it runs (eager calls of the fused op, or compiled); the
block-sparse kinds build the module with a ``BlockSparseSpec`` and run it as ``run`` says.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..block_sparse_annotation import resolve_block_sparse_spec
from ..block_sparse_spec import BlockSparseSpec
from ._sparse_config import spec_from_sparse_config
from .multihead import MultiheadDilatedAttention

#: The kinds ``create_multihead_dilated_attention`` accepts for dilated attention, which are also
#: the ways any module runs (``run=`` of the block-sparse kinds).
KINDS = ("auto", "eager", "compiled")
#: The kinds that build block-sparse attention: ``"block_sparse"``, and ``"block_sparse_ring"``,
#: the earlier packages' name, which also takes their ``sparse_config``.
BLOCK_SPARSE_KINDS = ("block_sparse", "block_sparse_ring")
# Single-device kinds of earlier packages: both computed dilated attention on one device, which
# is what "auto" picks the best way to run here.
_AUTO_ALIASES = ("standard", "improved")
# Kinds of earlier packages that run attention across processes, not a module kind here.
_NOT_MODULE_KINDS = (
    "ring", "distributed", "improved_distributed", "ring_distributed",
    "block_sparse_ring_distributed",
)
_BLOCK_SPARSE_FIELDS = ("block_size", "local_blocks", "global_blocks", "random_blocks", "seed", "layout")
# The dilated pattern of earlier packages' factories, when none is given.
_DEFAULT_SEGMENT_LENGTHS = (2048, 4096, 8192)
_DEFAULT_DILATION_RATES = (1, 2, 4)
_MODULE_ARGUMENTS = tuple(inspect.signature(MultiheadDilatedAttention.__init__).parameters)[1:]


def _check_kind_type(kind: Any) -> None:
    if not isinstance(kind, str):
        raise TypeError(
            f"kind must be a string, one of {KINDS} or {BLOCK_SPARSE_KINDS}, got {kind!r}; pass the "
            "module's arguments by keyword: create_multihead_dilated_attention('auto', "
            "embed_dim=..., num_heads=..., segment_lengths=..., dilation_rates=...)"
        )


def resolve_kind(kind: str = "auto", device: torch.device | str | None = None) -> str:
    """What ``kind`` means on ``device`` (default: the default device): ``"eager"`` or
    ``"compiled"``. ``"auto"`` is ``"compiled"`` (the Triton kernels, fused by Inductor) on a
    CUDA device with Triton installed, and ``"eager"`` (the fused op called directly, no
    compilation delay) elsewhere. The block-sparse kinds run like ``"auto"`` unless their
    ``run=`` says otherwise."""
    _check_kind_type(kind)
    if kind in _AUTO_ALIASES or kind in BLOCK_SPARSE_KINDS:
        kind = "auto"
    if kind in _NOT_MODULE_KINDS:
        raise ValueError(
            f"kind={kind!r} names a sequence-parallel or distributed variant of another package, "
            "which runs attention across processes; it is not a module kind here. Sequence-parallel "
            "attention is to come as dilated_compile.sequence_parallel; on one device use one of "
            f"{KINDS} (exact dilated attention) or 'block_sparse' (block-sparse attention)."
        )
    if kind not in KINDS:
        raise ValueError(
            f"kind must be one of {KINDS} (or the aliases {_AUTO_ALIASES} for 'auto', or "
            f"{BLOCK_SPARSE_KINDS} for block-sparse attention), got {kind!r}"
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
    segment_lengths: Sequence[int] | None = None,
    dilation_rates: Sequence[int] | None = None,
    *,
    attention_type: str | None = None,
    compile_kwargs: dict[str, Any] | None = None,
    run: str | None = None,
    sparse_config: Any = None,
    **kwargs: Any,
) -> MultiheadDilatedAttention:
    """A ``MultiheadDilatedAttention``, run the way ``kind`` (or ``run``) says.

    Args:
        kind: ``"auto"`` (by device and what is installed, see ``resolve_kind``), ``"eager"``
            (the module as it is: each call runs the fused op) or ``"compiled"`` (the module
            compiled in place with ``backend="dilated_compile"``, its ``state_dict`` keys
            unchanged). ``"standard"`` and ``"improved"``, the single-device kinds of earlier
            packages, mean ``"auto"``. Every kind gives the same exact results.
            ``"block_sparse"`` builds block-sparse attention from the ``BlockSparseSpec`` fields
            in ``kwargs`` (``block_size``, ``local_blocks``, ``global_blocks``,
            ``random_blocks``, ``seed``, ``layout``), from ``spec=BlockSparseSpec(...)``, or from
            an earlier package's ``sparse_config`` (one of the three). ``"block_sparse_ring"``,
            the earlier packages' name, is the same on one device and also accepts (and does not
            use) their ``segment_lengths``/``dilation_rates``; it needs ``sparse_config`` or a
            spec (their default config differed between revisions).
        embed_dim, num_heads: of the module.
        segment_lengths, dilation_rates: the dilated pattern (None: ``(2048, 4096, 8192)`` and
            ``(1, 2, 4)``, the defaults of earlier packages, unless ``spec=`` is given).
        attention_type: the earlier name of ``kind`` (give one of the two).
        compile_kwargs: extra ``torch.compile`` arguments when the module runs compiled
            (``dynamic``, ``mode``, ...).
        run: how a block-sparse kind runs: ``"auto"`` (the default), ``"eager"`` or
            ``"compiled"``, as the dilated kinds of those names. Only for the block-sparse kinds.
        sparse_config: an earlier package's ``SparsePatternConfig`` (or dict), for the
            block-sparse kinds: translated by ``spec_from_sparse_config`` where the translation
            is exact (``"local_window"``, ``"global_local"``), refused with the reason elsewhere.
        **kwargs: any other argument of ``MultiheadDilatedAttention`` (``spec``, ``dropout``,
            ``bias``, ``batch_first``, ``layer_norm``, ``gamma_init``, ``num_kv_heads``,
            ``device``, ``dtype``, ``mode``, ...), and for the block-sparse kinds the
            ``BlockSparseSpec`` fields. An unknown name raises ``TypeError`` (earlier packages
            dropped them silently).

    Example::

        >>> attention = create_multihead_dilated_attention(
        ...     "auto", embed_dim=512, num_heads=8, segment_lengths=(1024, 2048), dilation_rates=(1, 2))
        >>> y, _ = attention(x, x, x, is_causal=True)
        >>> bigbird = create_multihead_dilated_attention(
        ...     "block_sparse", embed_dim=512, num_heads=8, block_size=64, local_blocks=1,
        ...     global_blocks=1, random_blocks=2, seed=0, run="eager")
        >>> drop_in = create_multihead_dilated_attention(                 # an earlier package's call
        ...     "block_sparse_ring", embed_dim=512, num_heads=8, segment_lengths=[2048],
        ...     dilation_rates=[1], sparse_config=SparsePatternConfig(
        ...         pattern_type="local_window", block_size=64, window_size=256))
    """
    kind = _kind_argument(kind, attention_type)
    if compile_kwargs is not None and "backend" in compile_kwargs:
        raise TypeError("compile_kwargs: the backend is always 'dilated_compile'")
    if kind in BLOCK_SPARSE_KINDS:
        spec = _block_sparse_spec(kind, segment_lengths, dilation_rates, sparse_config, kwargs)
        how = _run_argument(run)
        described = f"run {how!r}"
        segment_lengths = dilation_rates = None
    else:
        _refuse_block_sparse_arguments(kind, run, sparse_config)
        spec = kwargs.pop("spec", None)
        if spec is None:
            segment_lengths = _DEFAULT_SEGMENT_LENGTHS if segment_lengths is None else segment_lengths
            dilation_rates = _DEFAULT_DILATION_RATES if dilation_rates is None else dilation_rates
        how, described = kind, f"kind {kind!r}"
    _check_module_arguments(kwargs)
    resolved = resolve_kind(how, kwargs.get("device"))
    module = MultiheadDilatedAttention(
        embed_dim, num_heads, segment_lengths, dilation_rates, spec=spec, **kwargs
    )
    return _run_as(module, resolved, compile_kwargs, described)


def _kind_argument(kind: Any, attention_type: str | None) -> str:
    if attention_type is not None:
        if kind != "auto":
            raise TypeError(
                f"pass kind or attention_type (its earlier name), not both: got kind={kind!r}, "
                f"attention_type={attention_type!r}"
            )
        kind = attention_type
    _check_kind_type(kind)
    return kind


def _run_argument(run: str | None) -> str:
    if run is None:
        return "auto"
    if run not in KINDS:
        raise ValueError(f"run must be one of {KINDS} (how the block-sparse module runs), got {run!r}")
    return run


def _refuse_block_sparse_arguments(kind: str, run: Any, sparse_config: Any) -> None:
    for name, value in (("run", run), ("sparse_config", sparse_config)):
        if value is not None:
            raise TypeError(
                f"{name}={value!r} is an argument of the block-sparse kinds {BLOCK_SPARSE_KINDS}; "
                f"kind={kind!r} builds dilated attention (and itself says how it runs). Pass "
                f"kind='block_sparse' for block-sparse attention, or drop {name}."
            )


def _block_sparse_spec(
    kind: str, segment_lengths: Any, dilation_rates: Any, sparse_config: Any, kwargs: dict[str, Any]
) -> BlockSparseSpec:
    """The spec of a block-sparse kind from exactly one of ``sparse_config``, ``spec`` or the
    ``BlockSparseSpec`` fields (taken out of ``kwargs``)."""
    fields = {name: kwargs.pop(name) for name in _BLOCK_SPARSE_FIELDS if name in kwargs}
    spec = kwargs.pop("spec", None)
    if kind == "block_sparse" and (segment_lengths is not None or dilation_rates is not None):
        raise TypeError(
            f"kind='block_sparse' takes no dilated pattern: got segment_lengths={segment_lengths!r}, "
            f"dilation_rates={dilation_rates!r}. Drop them (kind='block_sparse_ring' accepts and "
            "ignores them, as earlier packages' block-sparse patterns did), or use kind='auto' for "
            "dilated attention."
        )
    if sparse_config is None:
        if kind == "block_sparse_ring" and spec is None and not fields:
            raise TypeError(
                "kind='block_sparse_ring' needs the pattern: sparse_config=SparsePatternConfig(...) "
                "(the earlier packages' default config differed between their revisions), or "
                "spec=BlockSparseSpec(...) or its fields"
            )
        return resolve_block_sparse_spec(spec, fields)
    if spec is not None or fields:
        given = (["spec"] if spec is not None else []) + sorted(fields)
        raise TypeError(
            f"pass the block-sparse pattern one way: sparse_config, spec or the BlockSparseSpec "
            f"fields; got sparse_config and {given}"
        )
    return spec_from_sparse_config(sparse_config)


def _check_module_arguments(kwargs: dict[str, Any]) -> None:
    unknown = sorted(set(kwargs) - set(_MODULE_ARGUMENTS))
    if unknown:
        raise TypeError(
            f"create_multihead_dilated_attention: unknown argument(s) {unknown} for "
            f"MultiheadDilatedAttention, whose arguments are {list(_MODULE_ARGUMENTS)} (and the "
            f"block-sparse kinds' BlockSparseSpec fields {list(_BLOCK_SPARSE_FIELDS)})"
        )


def _run_as(
    module: MultiheadDilatedAttention, resolved: str, compile_kwargs: dict[str, Any] | None, described: str
) -> MultiheadDilatedAttention:
    if resolved == "compiled":
        module.compile(backend="dilated_compile", **(compile_kwargs or {}))
    elif compile_kwargs:
        raise TypeError(
            f"compile_kwargs given, but {described} resolved to 'eager', which compiles nothing"
        )
    return module
