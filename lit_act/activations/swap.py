"""Swap activation modules inside any ``nn.Module``.

``swap_activations(model, "pau", match="blocks.*.mlp.act")`` replaces every matching submodule with a fresh
activation built from the registry (one new module per match) and returns ``{qualified_name: old_module}``.
``match`` is a module type (or tuple of types), a name glob (``fnmatch`` on the qualified name), a predicate
``(name, module) -> bool``, or a list of those (any may match); ``None`` matches every known activation type
(:data:`ACTIVATION_TYPES` plus anything in ``lit_act.activations``). Swap *before* ``torch.compile``: a compiled
model keeps running the graph it traced, so a compiled model is refused with a hint.
lit-act's reference models route every non-linearity through an ``act`` submodule, so all of them are swappable.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence

import torch
from torch import nn

from lit_act.activations.registry import ActivationFactory, build

ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.ReLU6, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Tanhshrink,
)

Matcher = type | tuple | str | Callable[[str, nn.Module], bool]


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, ACTIVATION_TYPES) or (
        type(module).__module__.startswith("lit_act.activations.") and not isinstance(module, nn.Identity))


def _matcher(match: Matcher | Sequence[Matcher] | None) -> Callable[[str, nn.Module], bool]:
    if match is None:
        return lambda name, module: _is_activation(module)
    if isinstance(match, str):
        return lambda name, module: fnmatch.fnmatchcase(name, match)
    if isinstance(match, type) or (isinstance(match, tuple) and all(isinstance(t, type) for t in match)):
        return lambda name, module: isinstance(module, match)
    if isinstance(match, list | tuple):
        parts = [_matcher(m) for m in match]
        return lambda name, module: any(p(name, module) for p in parts)
    if callable(match):
        return match
    raise TypeError(f"match must be a type, a name glob, a predicate (name, module) -> bool or a list, got {match!r}")


def swap_activations(model: nn.Module, name_or_factory: str | type[nn.Module] | ActivationFactory,
                     match: Matcher | Sequence[Matcher] | None = None, **kwargs) -> dict[str, nn.Module]:
    """Replace the submodules of ``model`` selected by ``match`` with ``build(name_or_factory, **kwargs)``.

    New modules are moved to the device (and floating dtype) of ``model``'s first parameter. Returns the replaced
    modules by qualified name; raises ``ValueError`` (listing the activation modules that exist) when nothing
    matches, and ``TypeError`` for a ``torch.compile``'d model.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("swap_activations got a torch.compile'd model; swap on the original module first "
                        "(model._orig_mod), then call torch.compile again")
    predicate = _matcher(match)
    targets = [name for name, module in model.named_modules() if name and predicate(name, module)]
    # a matched module's own children are replaced along with it
    targets = [t for t in targets if not any(t.startswith(o + ".") for o in targets if o != t)]
    if not targets:
        found = [name for name, module in model.named_modules() if name and _is_activation(module)]
        raise ValueError(f"no module of {type(model).__name__} matches {match!r}; activation modules present: "
                         f"{', '.join(found) or 'none'}")
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    replaced = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        new = build(name_or_factory, **kwargs)
        if reference is not None:
            new = new.to(device=reference.device, dtype=reference.dtype)
        replaced[name] = parent.get_submodule(child)
        setattr(parent, child, new)
    return replaced
