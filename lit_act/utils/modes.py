"""Train/eval flags that come back exactly as they were."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run the block with ``model.eval()`` (or the current modes when ``eval_mode`` is False) and restore every
    submodule's own ``training`` flag afterwards, also on exceptions."""
    flags = [(m, m.training) for m in model.modules()]
    if eval_mode:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training
