"""Activation registry: build an activation module by name or class (timm ``create_act`` style).

``build("gelu")`` returns a fresh ``nn.Module``; ``build(nn.GELU)`` instantiates the class; an unknown name raises a
``ValueError`` listing every registered name. New activations register with :func:`register`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ActivationFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ActivationFactory] = {}


def register(name: str, factory: ActivationFactory | None = None):
    """Register ``factory`` (a class or a callable returning an ``nn.Module``) under ``name``.

    Usable as a decorator (``@register("pau")``) or called directly. Names are case-insensitive; re-registering a name
    with a different factory raises.
    """

    def _add(f: ActivationFactory) -> ActivationFactory:
        key = name.lower()
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"activation name {name!r} is already registered to {_REGISTRY[key]!r}")
        _REGISTRY[key] = f
        return f

    return _add if factory is None else _add(factory)


def available() -> list[str]:
    """Sorted list of registered activation names."""
    return sorted(_REGISTRY)


def get(name: str) -> ActivationFactory:
    """The factory registered under ``name``; raises with the list of valid names if there is none."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown activation {name!r}; valid names: {', '.join(available())}")
    return _REGISTRY[key]


def build(name: str | type[nn.Module] | ActivationFactory, **kwargs) -> nn.Module:
    """A new activation module from a registered name, an ``nn.Module`` class, or a factory callable."""
    factory = get(name) if isinstance(name, str) else name
    if not callable(factory):
        raise TypeError(f"activation must be a name, an nn.Module class or a factory, got {name!r}")
    module = factory(**kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"activation factory {factory!r} returned {type(module).__name__}, not an nn.Module")
    return module
