"""Failed collectives name themselves.

When a rank exits or stalls, the other ranks' next collective fails (gloo: at once, "connection
closed by peer"; NCCL: when the process group's timeout expires) with the backend's message,
which says nothing of which of the library's collectives it was. ``named_collective`` turns that
failure into a ``CollectiveError`` naming the collective, the rank and the group's timeout, with
the backend's error chained as its cause.

The library's collectives are blocking c10d calls made inside the wrapper, forward and
backward (``collectives._Collective``), so a failure surfaces there, named.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective of sequence-parallel attention failed (its ``__cause__`` is the backend's
    error): a rank exited, crashed or did not reach it within the process group's timeout."""


def group_timeout(group: dist.ProcessGroup) -> datetime.timedelta | None:
    """The timeout of ``group``'s backend, or None where torch does not expose it."""
    for device in getattr(group, "_device_types", ()):
        try:  # private API, absent on some backends and versions: the message then omits it
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:
            continue
    return None


def _describe(group: dist.ProcessGroup) -> tuple[str, str]:
    """``"rank r of W"`` and the timeout clause, from what this process knows locally."""
    try:
        where = f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"
    except Exception:  # the group itself may be gone by now
        where = "this rank"
    timeout = group_timeout(group)
    clause = "the process group's timeout" if timeout is None else f"the process group's timeout, {timeout}"
    return where, clause


@contextlib.contextmanager
def named_collective(what: str, group: dist.ProcessGroup) -> Iterator[None]:
    """Run a collective (and its wait) under a name: a ``RuntimeError`` it raises (torch's
    ``DistBackendError`` is one) becomes a ``CollectiveError`` naming ``what``, chained ``from``
    the original. Nested uses keep the innermost name.

    Example::

        >>> with named_collective("sequence_parallel: the all-to-all of the shards "
        ...                       "(strategy 'all_to_all')", group):
        ...     dist.all_gather(lengths, mine, group=group)
    """
    try:
        yield
    except CollectiveError:
        raise
    except RuntimeError as error:
        where, clause = _describe(group)
        raise CollectiveError(
            f"{what} failed on {where}: {error}; a rank may have exited, crashed or not reached "
            f"this collective within {clause} (every rank of the group must make the same calls)"
        ) from error
