"""Activation functions and their registry: ``build(name_or_class, **kwargs)``, ``available()``, ``register``."""

from lit_act.activations import fixed  # noqa: F401  (registers the fixed activations)
from lit_act.activations.registry import available, build, get, register

__all__ = ["available", "build", "get", "register"]
