"""``sequence_parallel(...)``: SDPA calls inside compute the attention of the whole sharded
sequence.

Two routes reach ``sequence_parallel_attention``, one per nesting order:

- ``sequence_parallel`` is a torch-function mode: a plain SDPA call inside it (no pattern region
  inside the context) reaches its ``__torch_function__``, which uses the pattern of the innermost
  ``dilated``/``block_sparse`` region *enclosing* the context, if any, else dense attention;
- inside a pattern region opened within the context, the region handles the call and hands it
  over through the annotation's call hook (``annotation.SDPA_CALL_HOOKS``), which this module
  registers while a context is open.

In eager mode either route calls ``sequence_parallel_attention`` at once. Under ``torch.compile``
(and ``torch.export``) Dynamo traces the context, entered outside the compiled function or inside
it, and the call is captured like any annotated SDPA call: the plain SDPA node and an
``annotation`` node whose payload is a ``SequenceParallelCall`` (the pattern, layout, strategy
and the group's name; ``call.py``). The ``"dilated_compile"`` backend's rewrite pass turns the
pair into ``torch.ops.dilated_compile.sequence_parallel_attention``, an opaque op whose body is
``sequence_parallel_attention`` (``ops/sequence_parallel_attention.py`` says why it is opaque,
and that its backward recomputes the forward): no graph break, the same numbers as eager mode.
Another backend leaves the annotation unrewritten, and it raises when the graph runs, as
``dilated(...)``'s does. The context registers the family (``"sequence_parallel"``) with the
rewrite pass.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .. import annotation
from ..annotation import AttentionRegion, bind_sdpa_arguments, capture_annotated_sdpa
from ..attention_family import AttentionFamily, family_of_spec, register_family
from ..ops import sequence_parallel_attention_op
from .attention import STRATEGIES, _check_local_call, sequence_parallel_attention
from .call import KIND, SequenceParallelCall
from .group import resolve_group
from .layout import check_layout

_F = TypeVar("_F", bound=Callable[..., Any])

# The open contexts of this process, innermost last (a plain list: Dynamo reads it cheaply).
_OPEN: list[sequence_parallel] = []


def sequence_parallel_is_open() -> bool:
    """Whether a ``sequence_parallel`` context is open in this process."""
    return bool(_OPEN)


def refuse_inside_sequence_parallel(what: str) -> None:
    """NotImplementedError when a context is open: ``what`` calls an op on the tensors it is
    given, which inside ``sequence_parallel`` are one rank's shards (it would silently attend
    within the shard). Raised before any collective, so every rank raises it alike."""
    if _OPEN:
        raise NotImplementedError(
            f"{what} inside sequence_parallel(...) would attend within this rank's shard only; "
            "call F.scaled_dot_product_attention inside the pattern's region (dilated(spec) or "
            "block_sparse(spec)) instead, with attn_mask as this rank's rows against every key "
            "(docs/sequence_parallel.md)"
        )


def _attend(spec: Any, arguments: dict[str, Any], context: sequence_parallel) -> torch.Tensor:
    """One SDPA call (``arguments``, by name) of ``spec``'s pattern (None: dense) inside
    ``context``: computed at once in eager mode, captured annotated under Dynamo."""
    if not torch.compiler.is_compiling():
        return sequence_parallel_attention(spec, arguments, context)
    # What each rank checks of its own call, at capture: the errors eager mode gives, raised
    # while tracing on the ranks whose call is invalid. The checks that need the other ranks
    # (they compare the calls and learn N) run in the op, where every rank raises alike.
    _check_local_call(spec, arguments)
    # resolve_group, not the process_group property: Dynamo cannot read properties of a mode.
    call = SequenceParallelCall(spec, context.layout, context.strategy,
                                resolve_group(context.group).group_name)
    return capture_annotated_sdpa(arguments, call.to_json(), call.pattern_tensor(),
                                  mask_on_annotation=True)


def _region_hook(spec: Any, arguments: dict[str, Any]) -> torch.Tensor | None:
    """The annotation's call hook: a region's SDPA call inside an open context."""
    if not _OPEN:
        return None
    return _attend(spec, arguments, _OPEN[-1])


def _enclosing_spec() -> Any:
    """The spec of the innermost pattern region on the torch-function mode stack (the handling
    mode itself is off the stack while it runs), or None."""
    for mode in reversed(torch.overrides._get_current_function_mode_stack()):
        if isinstance(mode, AttentionRegion):
            return mode.spec
    return None


class sequence_parallel(TorchFunctionMode):
    """Sequence-parallel attention: inside, q/k/v are this rank's shard of the sequence and every
    ``F.scaled_dot_product_attention`` call computes the attention of the whole sequence.

    A context manager and a decorator. Composes with ``dilated(...)``/``block_sparse(...)``
    (either nesting order: the innermost pattern region wins) and with plain SDPA (dense).

    Args:
        group: a ProcessGroup, a 1-D DeviceMesh or None (the world), resolved at each call (so
            the decorator may be applied before ``init_process_group``).
        layout: which positions each rank holds: ``"contiguous"`` (rank ``r``: chunk ``r`` of
            ``ceil(N / W)``) or ``"zigzag"`` (chunks ``r`` and ``2W-1-r`` of ``ceil(N / 2W)``);
            see ``shard_sequence``. Any ``N`` works (the last ranks may hold fewer positions).
        strategy: ``"all_gather"``, ``"all_to_all"``, ``"ring"`` (not dilated) or ``"auto"``
            (dense -> ring, dilated -> all_gather, block-sparse causal -> all_gather and
            non-causal -> all_to_all, or ring with a mask); see docs/sequence_parallel.md.

    Inside, SDPA takes this rank's shards q ``[B, Hq, n_r, D]``, k/v ``[B, Hkv, n_r, D/Dv]``
    (``enable_gqa=True`` for GQA), ``is_causal``, ``scale`` and ``attn_mask`` — this rank's
    query rows against *every* key, ``[B or 1, Hq or 1, n_r or 1, N]`` — and returns this
    rank's rows ``[B, Hq, n_r, Dv]``, equal (outputs and gradients) to the rows of the
    single-device attention of the gathered sequence. Every rank must make the same call; each
    call checks that (one small all-gather) and raises the same
    ValueError on every rank, naming the field that differs. Calls that cannot be computed
    exactly raise ValueError naming the strategy that can. Under
    ``torch.compile(backend="dilated_compile")`` a call is one op of the graph,
    ``torch.ops.dilated_compile.sequence_parallel_attention``, with no graph break, whether the
    context is entered outside the compiled function or inside it.

    Example (``torchrun --nproc-per-node 2 script.py``)::

        >>> dist.init_process_group("gloo")
        >>> q, k, v = (shard_sequence(x, layout="zigzag") for x in (q_full, k_full, v_full))
        >>> with sequence_parallel(layout="zigzag"), dilated(spec):
        ...     out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        >>> full = gather_sequence(out, layout="zigzag")   # == the single-device result
    """

    def __init__(self, group: Any = None, *, layout: str = "contiguous", strategy: str = "auto") -> None:
        super().__init__()
        self.group = group
        self.layout = check_layout(layout)
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.strategy = strategy

    @property
    def process_group(self):
        """The ProcessGroup, resolved at the call (a decorator may be applied before
        ``init_process_group``)."""
        return resolve_group(self.group)

    def __repr__(self) -> str:
        return f"sequence_parallel(layout={self.layout!r}, strategy={self.strategy!r})"

    def __enter__(self):
        if not _OPEN:
            annotation.SDPA_CALL_HOOKS.append(_region_hook)
        _OPEN.append(self)
        try:
            return super().__enter__()
        except BaseException:
            self._close()
            raise

    def __exit__(self, *exc_info):
        try:
            return super().__exit__(*exc_info)
        finally:
            self._close()

    def _close(self) -> None:
        _OPEN.remove(self)
        if not _OPEN and _region_hook in annotation.SDPA_CALL_HOOKS:
            annotation.SDPA_CALL_HOOKS.remove(_region_hook)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _attend(_enclosing_spec(), bind_sdpa_arguments(args, kwargs), self)
        return func(*args, **kwargs)

    def __call__(self, fn: _F) -> _F:
        if not callable(fn):
            raise TypeError(f"sequence_parallel(...) decorates a function, got {type(fn).__name__}")
        group, layout, strategy = self.group, self.layout, self.strategy

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            # A fresh mode per call: a mode instance cannot be on the stack twice.
            with sequence_parallel(group, layout=layout, strategy=strategy):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def _call_region(call: SequenceParallelCall) -> Iterator[None]:
    """The regions that make SDPA compute ``call``: the context and the pattern's region."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(sequence_parallel(call.process_group, layout=call.layout,
                                              strategy=call.strategy))
        if call.pattern is not None:
            stack.enter_context(family_of_spec(call.pattern).region(call.pattern))
        yield


register_family(AttentionFamily(
    kind=KIND,
    region_name="sequence_parallel",
    spec_type=SequenceParallelCall,
    op=sequence_parallel_attention_op,
    op_name="dilated_compile.sequence_parallel_attention",
    pattern_args=SequenceParallelCall.op_args,
    spec_tensor=SequenceParallelCall.pattern_tensor,
    from_json=SequenceParallelCall.from_json,
    # The shapes a pattern can serve depend on N, which only the op learns (from every rank).
    check=lambda call, query, key: None,
    region=_call_region,
    returns_lse=False,
    user_spec=False,
))
