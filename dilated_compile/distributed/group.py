"""Which process group a sequence-parallel call runs over.

``group`` is a ``torch.distributed.ProcessGroup``, a 1-D ``DeviceMesh`` (its only dimension's
group) or None (the default group: the world). The group must be initialised.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def resolve_group(group: Any = None) -> dist.ProcessGroup:
    """The ``ProcessGroup`` of ``group`` (ProcessGroup, 1-D DeviceMesh or None for the world)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "sequence parallelism needs torch.distributed: call "
            "torch.distributed.init_process_group(...) first (torchrun sets up the environment)"
        )
    if group is None:
        return dist.group.WORLD
    if isinstance(group, dist.ProcessGroup):
        return group
    mesh_type = getattr(getattr(dist, "device_mesh", None), "DeviceMesh", None)
    if mesh_type is not None and isinstance(group, mesh_type):
        if group.ndim != 1:
            raise ValueError(
                f"sequence parallelism takes a 1-D DeviceMesh, got one of {group.ndim} dims "
                f"{tuple(group.shape)}; pass mesh[name] for the dimension that holds the sequence"
            )
        return group.get_group()
    raise TypeError(
        f"group must be a ProcessGroup, a 1-D DeviceMesh or None (the world), got "
        f"{type(group).__name__}"
    )


def rank_and_size(group: dist.ProcessGroup) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size."""
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: dist.ProcessGroup, rank: int) -> int:
    """The world rank of ``group``'s rank ``rank`` (what point-to-point ops address)."""
    return dist.get_global_rank(group, rank)
