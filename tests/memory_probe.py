"""``LargestAllocation``: the largest storage an implementation creates, for the tests that check
that no ``N x N`` tensor is ever built."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LargestAllocation(TorchDispatchMode):
    """Records ``elements``: the largest storage (in elements) created while the mode is active;
    the storages of ``inputs`` (and views of them) do not count. Call the implementations below
    their custom op (``op._init_fn``), or the op's body runs outside the mode's sight."""

    def __init__(self, *inputs: torch.Tensor) -> None:
        super().__init__()
        self.known = {t.untyped_storage().data_ptr() for t in inputs}
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.known:
                self.elements = max(self.elements, t.untyped_storage().nbytes() // t.element_size())
        return out
