"""Worker side of tests/test_sequence_parallel_failures.py: a rank exits (``os._exit``) before a
collective; the rank left must raise, within the process group's timeout, a ``CollectiveError``
naming the collective (instead of hanging or a bare backend error).

Three ranks, two groups with a short timeout: ``[0, 1]``, where rank 1 exits inside the attention
call, after the signature check, just before the all-gather of keys and values; and ``[0, 2]``,
where rank 2 exits before the call, so rank 0 is alone in the signature check.
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dilated_compile import gather_sequence, sequence_parallel, sequence_positions
from dilated_compile.distributed import CollectiveError, collectives

TIMEOUT_S = 5.0


def _exit(*args, **kwargs):
    os._exit(0)


def _failure(fn) -> dict:
    """What ``fn`` raised: its type, message, cause and how long it took."""
    start = time.monotonic()
    try:
        fn()
    except Exception as error:  # noqa: BLE001 (reported, the test checks the type)
        return {"type": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start,
                "cause": type(error.__cause__).__name__, "collective": isinstance(error, CollectiveError)}
    return {"type": "no error"}


def rank_exits(rank, world):
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    pair_1, pair_2 = dist.new_group([0, 1], timeout=timeout), dist.new_group([0, 2], timeout=timeout)
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)

    def attend(group):
        with sequence_parallel(group, layout="zigzag", strategy="all_gather"):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    if rank == 2:
        os._exit(0)  # before any call: rank 0 is alone in the signature check of [0, 2]
    if rank == 1:
        # Joins the signature check, exits at the all-gather of keys and values.
        collectives._ALL_GATHER = _exit
        attend(pair_1)
    results = {"all_gather": _failure(lambda: attend(pair_1)),
               "signature": _failure(lambda: attend(pair_2)),
               # The group [0, 1] is broken now: the other collectives name themselves too.
               "gather_sequence": _failure(lambda: gather_sequence(q, pair_1)),
               "sequence_positions": _failure(lambda: sequence_positions(6, pair_1))}
    return results


def rank_exits_before_backward(rank, world):
    """Both ranks finish the forward; rank 1 exits before the backward, whose reduce-scatter (the
    all-gather's gradient) must fail on rank 0 naming itself."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=TIMEOUT_S))
    q = torch.randn(1, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    with sequence_parallel(group, layout="zigzag", strategy="all_gather"):
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    dist.barrier(group)  # the forward is done on both ranks
    if rank == 1:
        os._exit(0)
    return {"backward": _failure(lambda: out.sum().backward())}
