"""Swap activation modules inside any ``nn.Module``.

``swap_activations(model, "pau", match="blocks.*.mlp.act")`` replaces every matching submodule with a fresh
activation built from the registry (one new module per match) and returns ``{qualified_name: old_module}``.
``match`` is a :data:`lit_act.selection.ModuleSelector`: ``None`` (every module of the activation table, including
Hugging Face's and classes added with :func:`lit_act.selection.register_activation_type`), a name glob (``*`` within
one dotted segment, ``**`` across dots) or list of globs, a module type (or tuple of types), a predicate
``(name, module) -> bool`` or a preset. Swap *before* ``torch.compile``: a compiled model keeps running the graph it
traced, so a compiled model is refused with a hint.
lit-act's reference models route every non-linearity through an ``act`` submodule, so all of them are swappable.
"""

from __future__ import annotations

import torch
from torch import nn

from lit_act.activations.registry import ActivationFactory, build
from lit_act.selection import ModuleSelector, select_modules


def swap_activations(model: nn.Module, name_or_factory: str | type[nn.Module] | ActivationFactory,
                     match: ModuleSelector = None, **kwargs) -> dict[str, nn.Module]:
    """Replace the submodules of ``model`` selected by ``match`` with ``build(name_or_factory, **kwargs)``.

    ``match`` selects as :func:`lit_act.selection.select_modules` (``None``: the ``"activations"`` preset); of nested
    matches only the outermost module is replaced. New modules are moved to the device (and floating dtype) of
    ``model``'s first parameter. Returns the replaced modules by qualified name; raises ``ValueError`` (listing
    candidates) when nothing matches, and ``TypeError`` for a ``torch.compile``'d model.
    """
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise TypeError("swap_activations got a torch.compile'd model; swap on the original module first "
                        "(model._orig_mod), then call torch.compile again")
    targets = list(select_modules(model, match))
    # a matched module's own children are replaced along with it
    targets = [t for t in targets if not any(t.startswith(o + ".") for o in targets if o != t)]
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
