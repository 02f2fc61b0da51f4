"""One SDPA call inside ``sequence_parallel``: check it, pick the strategy, compute it.

``STRATEGIES``: ``"all_gather"``, ``"all_to_all"``, ``"ring"`` and ``"auto"``, which picks:

- dense (plain SDPA): ``"ring"``;
- dilated: ``"all_gather"``;
- block-sparse: causal ``"all_gather"``; non-causal ``"all_to_all"``, or ``"ring"`` with an
  ``attn_mask`` (which all_to_all would move to the ranks of its heads; ring reads it in place).

When ``"auto"``'s first choice cannot serve the call (``"all_to_all"`` with heads not divisible
by the ranks), the next exact strategy serves it (``"ring"`` for non-causal block-sparse, which
``"all_gather"`` cannot compute); else the first's error is raised.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention_family import describe, family_of_spec
from ..ops._checks import check_attention_inputs, check_attn_mask_grad, check_sdpa_mask_and_causal
from .all_gather import all_gather_attention, check_all_gather
from .all_to_all import all_to_all_attention, check_all_to_all
from .group import rank_and_size
from .plan import Plan, connected_zero
from .ring import check_ring, ring_attention
from .signature import check_signature, signature_fields

STRATEGIES = ("auto", "all_gather", "all_to_all", "ring")
_RUN = {"all_gather": all_gather_attention, "all_to_all": all_to_all_attention, "ring": ring_attention}
_DENSE_JSON = '{"kind": "dense"}'


def _check(strategy: str, plan: Plan, q_heads: int) -> None:
    if strategy == "all_gather":
        check_all_gather(plan)
    elif strategy == "all_to_all":
        check_all_to_all(plan, q_heads)
    else:
        check_ring(plan)


def choose_strategy(requested: str, plan: Plan, q_heads: int, has_mask: bool) -> str:
    """The strategy that computes this call (``requested`` unless ``"auto"``); ValueError, naming
    the strategies that can, when it cannot."""
    if requested != "auto":
        _check(requested, plan, q_heads)
        return requested
    if plan.kind == "dense":
        order = ("ring", "all_gather")
    elif plan.kind == "dilated":
        order = ("all_gather", "all_to_all")
    elif plan.is_causal:
        order = ("all_gather", "all_to_all", "ring")
    else:
        # A mask travels with all_to_all (its rows to the ranks of their heads); ring reads it where
        # it is.
        order = ("ring", "all_to_all") if has_mask else ("all_to_all", "ring")
    first_error = None
    for strategy in order:
        try:
            _check(strategy, plan, q_heads)
            return strategy
        except ValueError as error:
            first_error = first_error or error
    raise first_error


def _check_local_mask(attn_mask: torch.Tensor | None, q: torch.Tensor) -> None:
    if attn_mask is None:
        return
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating, got {attn_mask.dtype}")
    expected = (q.shape[0], q.shape[1], q.shape[2])
    if attn_mask.dim() != 4 or any(m not in (1, e) for m, e in zip(attn_mask.shape[:3], expected)):
        raise ValueError(
            "inside sequence_parallel, attn_mask is this rank's query rows against every key of "
            f"the sequence: [B or 1, Hq or 1, local length or 1, N] with [B, Hq, local length] = "
            f"{list(expected)}; got {tuple(attn_mask.shape)}"
        )
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask is on {attn_mask.device}, the query on {q.device}")


def sequence_parallel_attention(spec: Any, arguments: dict[str, Any], context: Any) -> torch.Tensor:
    """The attention of ``spec`` (None: dense) for this rank's shards, inside ``context`` (a
    ``sequence_parallel``). ``arguments``: the SDPA call's arguments by name."""
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    attn_mask, scale = arguments["attn_mask"], arguments["scale"]
    is_causal = bool(arguments["is_causal"])
    group = context.process_group
    rank, world = rank_and_size(group)
    spec_json = _DENSE_JSON if spec is None else spec.to_json()
    try:
        _check_local_call(spec, arguments)
        fields = signature_fields(query, key, value, spec_json, is_causal=is_causal, scale=scale,
                                  strategy=context.strategy, layout=context.layout, attn_mask=attn_mask)
        local_error = None
    except (TypeError, ValueError, NotImplementedError) as error:
        # Still join the signature's all-gather, so the other ranks raise instead of hanging.
        fields, local_error = None, error
    n = check_signature(group, fields, local_error, spec_json if spec is None else spec,
                        device=query.device if isinstance(query, torch.Tensor) else "cpu")
    if spec is not None:
        meta = {"device": "meta", "dtype": query.dtype}
        family_of_spec(spec).check(spec, torch.empty(*query.shape[:2], n, query.shape[3], **meta),
                                   torch.empty(*key.shape[:2], n, key.shape[3], **meta))
    plan = Plan(spec, group, rank, world, context.layout, n, is_causal, scale)
    if n == 0:
        return query.new_zeros(*query.shape[:3], value.shape[-1]) + connected_zero(query, key, value)
    strategy = choose_strategy(context.strategy, plan, query.shape[1], attn_mask is not None)
    return _RUN[strategy](plan, query, key, value, attn_mask)


def _check_local_call(spec: Any, arguments: dict[str, Any]) -> None:
    """What each rank checks of its own call before the ranks compare theirs."""
    query, key, value = arguments["query"], arguments["key"], arguments["value"]
    attn_mask = arguments["attn_mask"]
    if arguments["dropout_p"] != 0.0:
        where = "sequence_parallel" + ("" if spec is None else f" with {describe(spec)}")
        raise NotImplementedError(
            f"dropout_p={arguments['dropout_p']} is not supported inside {where}: pass "
            "dropout_p=0.0 (for modules, call model.eval() or set their attention dropout to 0)"
        )
    check_attention_inputs(query, key, value, enable_gqa=bool(arguments["enable_gqa"]))
    check_sdpa_mask_and_causal(attn_mask, bool(arguments["is_causal"]))
    check_attn_mask_grad(attn_mask)
    _check_local_mask(attn_mask, query)
    if spec is not None:
        family_of_spec(spec)
