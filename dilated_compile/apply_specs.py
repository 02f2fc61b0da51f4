"""``apply``: make an existing model's SDPA calls use a spec, with no change to its code.

``apply(model, spec)`` runs the forward of the selected modules inside the spec's region
(``dilated(spec)`` for a ``DilatedSpec``), so every ``F.scaled_dot_product_attention`` call they
make computes dilated attention — eagerly, under ``torch.compile(backend="dilated_compile")`` and
through ``dilated_compile.export``, exactly as if the model's code had been written with the
region. The mechanism is an instance attribute ``forward`` on each selected module that opens the
region around the module's own forward: no hooks, nothing held open across calls, and
``.remove()`` deletes the attributes again.

Hugging Face transformers models are switched to an attention implementation of this library
for the time of the handle (see ``dilated_compile.integrations.transformers``): transformers' own
SDPA wrapper repeats or packs grouped-query heads, which would move queries off their positions.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .attention_family import family_of_spec, spec_type_names

__all__ = ["AppliedSpecs", "apply", "register_region"]

Selector = Union[str, type]

# Spec types taught to apply by register_region (the library's families are known through their
# AttentionFamily): spec type -> function(spec) -> a fresh region (a context manager).
_REGIONS: dict[type, Callable[[Any], contextlib.AbstractContextManager]] = {}

_NO_FORWARD = object()  # marks a module that had no instance attribute `forward` before apply
_WILDCARDS = set("*?[")


def register_region(spec_type: type, region: Callable[[Any], contextlib.AbstractContextManager]) -> None:
    """Teach ``apply`` a spec family of your own: ``region(spec)`` returns a fresh region for
    one call.

    The library's families (``DilatedSpec``, ``BlockSparseSpec``) are known already. A spec type
    that is not registered may instead define ``spec.region()`` returning such a context
    manager.

    Example::

        >>> register_region(MySpec, my_region)   # my_region(spec) -> context manager
    """
    if not isinstance(spec_type, type):
        raise TypeError(f"register_region: spec_type must be a class, got {spec_type!r}")
    if not callable(region):
        raise TypeError(f"register_region: region must be callable, got {region!r}")
    _REGIONS[spec_type] = region


def region_factory(spec: Any, where: str = "spec") -> Callable[[], contextlib.AbstractContextManager]:
    """A zero-argument function that opens ``spec``'s region (a fresh one per call: a mode
    instance cannot be on the stack twice, e.g. in recursive modules)."""
    for cls in type(spec).__mro__:
        if cls in _REGIONS:
            return functools.partial(_REGIONS[cls], spec)
    try:
        return functools.partial(family_of_spec(spec).region, spec)
    except TypeError:
        pass
    if callable(getattr(spec, "region", None)):
        return spec.region
    known = ", ".join(sorted({cls.__name__ for cls in _REGIONS} | set(spec_type_names())))
    raise TypeError(
        f"apply: {where} must be a spec ({known}, or an object with a region() method), got "
        f"{type(spec).__name__}: {spec!r}"
    )


# ----------------------------------------------------------------------------------------------
# Selecting modules


def _describe(selector: Selector) -> str:
    return selector.__qualname__ if isinstance(selector, type) else repr(selector)


def _some_names(named: dict[str, nn.Module], limit: int = 8) -> str:
    names = [name for name in named if name][:limit]
    more = ", ..." if len(named) - 1 > limit else ""
    return ", ".join(names) + more if names else "(the model has no submodules)"


def _some_types(named: dict[str, nn.Module], limit: int = 8) -> str:
    types: list[str] = []
    for module in named.values():
        name = type(module).__qualname__
        if name not in types:
            types.append(name)
    more = ", ..." if len(types) > limit else ""
    return ", ".join(types[:limit]) + more


def _matches(selector: Selector, name: str, module: nn.Module) -> bool:
    if isinstance(selector, type):
        return isinstance(module, selector)
    return fnmatch.fnmatchcase(name, selector)


def _is_inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def innermost_spec(specs: dict[str, Any], name: str) -> Any:
    """The spec of the innermost region around module ``name`` (None: no region)."""
    around = [selected for selected in specs if selected == name or _is_inside(name, selected)]
    return specs[max(around, key=len)] if around else None


def _select(named: dict[str, nn.Module], selector: Selector) -> list[str]:
    """The outermost modules ``selector`` matches (a matched module's matched descendants are
    inside its region already). Raises ValueError when it matches none."""
    if not isinstance(selector, (str, type)):
        raise TypeError(
            "apply: a module selector is a qualified-name glob (str) or a module type, got "
            f"{type(selector).__name__}: {selector!r}"
        )
    chosen: list[str] = []
    for name, module in named.items():  # parents come before their children
        if _matches(selector, name, module) and not any(_is_inside(name, c) for c in chosen):
            chosen.append(name)
    if not chosen:
        if isinstance(selector, type):
            raise ValueError(
                f"apply: no module of the model is a {_describe(selector)}; module types in the "
                f"model: {_some_types(named)}"
            )
        raise ValueError(
            f"apply: the glob {selector!r} matches no module name; names look like: "
            f"{_some_names(named)} (globs use fnmatch: '*' also matches dots, '' is the model)"
        )
    return chosen


def _specificity(selector: Selector) -> tuple[int, int]:
    """How specific a selector is: an exact name beats a type, a type beats a glob with
    wildcards; among globs, more literal characters win."""
    if isinstance(selector, type):
        return (1, 0)
    if not _WILDCARDS & set(selector):
        return (2, len(selector))
    return (0, sum(ch not in _WILDCARDS for ch in selector))


def _resolve(model: nn.Module, spec_or_mapping: Any, modules: Any) -> dict[str, Any]:
    """Qualified module name -> spec, for every module whose forward gets a region."""
    named = dict(model.named_modules(remove_duplicate=True))
    if isinstance(spec_or_mapping, Mapping):
        if modules is not None:
            raise TypeError(
                "apply: pass either a {glob: spec} mapping or a spec with modules=..., not both "
                f"(got a mapping and modules={modules!r})"
            )
        if not spec_or_mapping:
            raise ValueError("apply: the {glob: spec} mapping is empty")
        entries = list(spec_or_mapping.items())
    else:
        if modules is None:
            entries = [("", spec_or_mapping)]
        else:
            selectors = [modules] if isinstance(modules, (str, type)) else modules
            if not isinstance(selectors, Sequence) or not selectors:
                raise TypeError(
                    "apply: modules must be a glob, a module type, or a non-empty sequence of "
                    f"those, got {modules!r}"
                )
            entries = [(selector, spec_or_mapping) for selector in selectors]

    claims: dict[str, list[tuple[Selector, Any]]] = {}
    for selector, spec in entries:
        region_factory(spec, f"the spec for {_describe(selector)}")  # validate early
        for name in _select(named, selector):
            claims.setdefault(name, []).append((selector, spec))

    resolved: dict[str, Any] = {}
    for name, candidates in claims.items():
        best = max(_specificity(s) for s, _ in candidates)
        top = [(s, spec) for s, spec in candidates if _specificity(s) == best]
        if any(spec != top[0][1] for _, spec in top):
            raise ValueError(
                f"apply: module {name or '(the model)'!r} is selected by "
                f"{', '.join(_describe(s) for s, _ in top)} with different specs and none of them "
                "is more specific; use an exact module name for the spec it should get"
            )
        resolved[name] = top[0][1]
    return resolved


# ----------------------------------------------------------------------------------------------
# Checking that the regions were reached


class _Probe:
    """What the first eager forward saw."""

    def __init__(self) -> None:
        self.pending = True  # until the first eager forward of the model returns
        self.reached = False  # an SDPA call ran inside one of the regions


class _SdpaProbe(TorchFunctionMode):
    """Innermost mode during the first eager forward: notes SDPA calls, changes nothing.

    A region opened further in (e.g. by transformers' attention function) handles the SDPA call
    before this mode sees it; the library op that region then calls is seen instead.
    """

    def __init__(self, probe: _Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention or (
            isinstance(func, torch._ops.OpOverload) and func.namespace == "dilated_compile"
        ):
            self.probe.reached = True
        return func(*args, **(kwargs or {}))


def _no_sdpa_error(model: nn.Module, resolved: dict[str, Any]) -> RuntimeError:
    tried = ", ".join(
        f"{name or '(the model)'} ({type(dict(model.named_modules())[name]).__qualname__})"
        for name in list(resolved)[:8]
    )
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    hint = f" (this model's attn_implementation is {implementation!r})" if implementation else ""
    return RuntimeError(
        "apply: the model's first forward made no F.scaled_dot_product_attention call inside the "
        f"selected modules [{tried}], so nothing would be dilated{hint}. Likely causes: the "
        "attention does not call SDPA (nn.MultiheadAttention, a hand-written softmax(QK^T)V, "
        "Hugging Face attn_implementation='eager' or 'flash_attention_2'), or the selected "
        "modules hold no attention. Select the modules that call SDPA, or load the model with "
        "attn_implementation='sdpa'. The handle was removed."
    )


# ----------------------------------------------------------------------------------------------
# The handle


class AppliedSpecs:
    """What ``apply`` returns: which modules got which spec, and ``remove()``.

    Attributes:
        model: the model.
        specs: ``{qualified module name: spec}`` (``""`` is the model itself).

    ``remove()`` restores the model exactly (idempotent); the handle is also a context manager
    that removes on exit.
    """

    def __init__(self, model: nn.Module, specs: dict[str, Any]) -> None:
        self.model = model
        self.specs = dict(specs)
        self._installed: list[tuple[nn.Module, Any, Callable]] = []  # (module, previous, ours)
        self._restore_hooks: list[Callable[[], None]] = []
        self._call_checks: list[Callable[[dict], None]] = []  # run on the model's arguments
        self._probe = _Probe()
        self.active = False

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        listed = ", ".join(f"{name or '(model)'}: {spec}" for name, spec in list(self.specs.items())[:4])
        more = ", ..." if len(self.specs) > 4 else ""
        return f"AppliedSpecs({state}; {listed}{more})"

    def __deepcopy__(self, memo: dict) -> AppliedSpecs:
        # Reached when a model is deep-copied while applied: the copy keeps its regions (its
        # wrappers are rebound to it) but only the original's handle can remove them.
        copied = AppliedSpecs(copy.deepcopy(self.model, memo), copy.deepcopy(self.specs, memo))
        copied._probe = copy.deepcopy(self._probe, memo)
        copied._call_checks = list(self._call_checks)
        return copied

    def __getstate__(self) -> dict:
        # Pickling an applied model (torch.save(model)): like a deep copy, the loaded model keeps
        # its regions behind an inactive handle (the restore closures do not pickle).
        return {"model": self.model, "specs": self.specs, "_probe": self._probe,
                "_call_checks": self._call_checks}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model"], state["specs"])
        self._probe, self._call_checks = state["_probe"], state["_call_checks"]

    def __enter__(self) -> AppliedSpecs:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def _install(self, module: nn.Module, wrapper: Callable) -> None:
        previous = module.__dict__.get("forward", _NO_FORWARD)
        module.forward = wrapper
        self._installed.append((module, previous, wrapper))

    def remove(self) -> None:
        """Restore every module's forward (and a transformers model's attention
        implementation). Calling it again does nothing."""
        if not self.active:
            return
        # Check everything before changing anything (a module may carry two of our wrappers:
        # the model's region and its first-forward check).
        current: dict[int, Any] = {}
        for module, previous, ours in reversed(self._installed):
            now = current.get(id(module), module.__dict__.get("forward", _NO_FORWARD))
            current[id(module)] = previous
            if now is not ours:
                raise RuntimeError(
                    f"apply: {type(module).__qualname__}.forward was replaced after apply (by a "
                    "later apply or another library); remove the later change first (handles "
                    "come off in reverse order)"
                )
        for module, previous, _ in reversed(self._installed):
            if previous is _NO_FORWARD:
                del module.forward
            else:
                module.forward = previous
        for hook in reversed(self._restore_hooks):
            hook()
        self._installed.clear()
        self._restore_hooks.clear()
        self.active = False


class _RegionForward:
    """A selected module's forward: its own forward inside the spec's region.

    An object rather than a closure so that ``copy.deepcopy`` of the model rebinds it to the
    copy (``inner`` is a bound method, which deepcopy rebinds; a closure would be shared and
    run the original model).
    """

    def __init__(self, inner: Callable, open_region: Callable, probe: _Probe) -> None:
        self.inner, self.open_region, self.probe = inner, open_region, probe
        # The signature transformers inspects; not the __dict__ (an inner wrapper's own fields).
        functools.update_wrapper(self, inner, updated=())

    def __call__(self, *args, **kwargs):
        with self.open_region():
            if not torch.compiler.is_compiling() and self.probe.pending:
                with _SdpaProbe(self.probe):
                    return self.inner(*args, **kwargs)
            return self.inner(*args, **kwargs)


class _CheckingForward:
    """The model's forward: after its first eager call, raise if no region saw SDPA."""

    def __init__(self, inner: Callable, handle: AppliedSpecs) -> None:
        self.inner, self.handle = inner, handle
        functools.update_wrapper(self, inner, updated=())

    def __call__(self, *args, **kwargs):
        for check in self.handle._call_checks:
            check(kwargs)
        probe = self.handle._probe
        if torch.compiler.is_compiling() or not probe.pending:
            return self.inner(*args, **kwargs)
        out = self.inner(*args, **kwargs)
        probe.pending = False
        if not probe.reached:
            self.handle.remove()
            raise _no_sdpa_error(self.handle.model, self.handle.specs)
        return out


def apply(
    model: nn.Module,
    spec_or_mapping: Any,
    *,
    modules: Selector | Sequence[Selector] | None = None,
) -> AppliedSpecs:
    """Make ``model``'s ``F.scaled_dot_product_attention`` calls use a spec, without editing it.

    Args:
        model: any ``nn.Module`` whose attention calls SDPA (``[B, H, N, D]`` tensors; masks,
            grouped-query heads and KV caches as documented for ``dilated``). Hugging Face
            transformers models must use ``attn_implementation="sdpa"``.
        spec_or_mapping: a spec (``DilatedSpec``, ``BlockSparseSpec``; other families plug in
            through ``register_region``) for the whole model or for the modules selected by ``modules``;
            or a mapping ``{selector: spec}`` giving modules their own specs. A selector is a
            glob on qualified module names (``fnmatch``: ``"model.layers.*"``; ``*`` also
            matches dots; ``""`` is the model itself) or a module type.
        modules: with a single spec, the modules that get it: a glob, a module type, or a
            sequence of those. ``None``: the whole model.

    Each selected module runs its forward inside the spec's region, so the SDPA calls it makes
    (its own and its submodules') are dilated; regions nest and the innermost wins, so a module
    selected inside another selected module keeps its own spec. A selector matching a module
    also matches its submodules; only the outermost match gets a region. When several selectors
    pick the same module, the most specific decides (an exact name, then a type, then the glob
    with the most literal characters); a tie between different specs raises ValueError.

    Returns:
        An ``AppliedSpecs`` handle: ``.specs`` lists ``{module name: spec}``; ``.remove()``
        restores the model exactly (idempotent); ``with apply(...):`` removes on exit.

    Raises:
        ValueError: a glob or type that matches no module (the message lists some names), an
            ambiguous selection, a transformers model whose attention is not SDPA.
        TypeError: a spec or selector of the wrong kind.
        RuntimeError: at the end of the model's first eager forward, when no SDPA call was
            made inside the selected modules (the handle is removed first).

    Eager mode, ``torch.compile(model, backend="dilated_compile")`` (no extra graph breaks) and
    ``dilated_compile.export(model, ...)`` all see the regions. ``apply`` changes the model in
    place; a ``copy.deepcopy`` of an applied model is applied too (its wrappers are rebound to
    the copy), and the handle removes the regions of the original only. With activation
    checkpointing, select modules inside the checkpointed blocks (transformers models need
    nothing: their attention layers open their region themselves), since the recomputation
    during backward runs outside the regions the forward opened.

    Example::

        >>> spec = DilatedSpec(segment_lengths=(64, 128), dilation_rates=(1, 2))
        >>> handle = dilated_compile.apply(model, spec)                      # the whole model
        >>> handle = dilated_compile.apply(model, spec, modules="layers.*")  # some modules
        >>> handle = dilated_compile.apply(model, {"layers.*": spec, "layers.0": other})
        >>> handle.remove()
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply: model must be a torch.nn.Module, got {type(model).__name__}")
    resolved = _resolve(model, spec_or_mapping, modules)
    named = dict(model.named_modules(remove_duplicate=True))
    handle = AppliedSpecs(model, resolved)

    integration = _transformers_integration(model)
    if integration is not None:
        handle._restore_hooks.append(integration.use_region_attention(model, resolved))
        handle._call_checks.append(integration.check_model_arguments)
    handle.active = True
    try:
        for name, spec in resolved.items():
            module = named[name]
            open_region = region_factory(spec, f"the spec for {name or 'the model'!r}")
            handle._install(module, _RegionForward(module.forward, open_region, handle._probe))
        handle._install(model, _CheckingForward(model.forward, handle))
    except BaseException:
        handle.remove()
        raise
    return handle


def _transformers_integration(model: nn.Module):
    """The transformers adapter when ``model`` is a transformers model (never imports
    transformers for other models)."""
    if "transformers" not in sys.modules:
        return None
    from transformers import PreTrainedModel

    if not any(isinstance(m, PreTrainedModel) for m in model.modules()):
        return None
    from .integrations import transformers as integration

    return integration
