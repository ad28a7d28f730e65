"""One adapter for batches and model outputs, shared by every lit-act callback.

lit-act never calls ``training_step``: when a callback needs its own pass (NAC, the Hessian, probe passes, dry runs)
it runs ``forward_fn(module, batch)`` and reads the output with the adapters below. The defaults read:

* **batches**: a Mapping (``dict``, Hugging Face ``BatchEncoding``) -> ``module(**batch)``; a tuple/list ->
  ``module(batch[0])``; a dataclass -> ``module(**fields)``; a Tensor -> ``module(batch)``;
* **targets**: ``batch["labels"]`` (or ``"label"``/``"targets"``), ``batch[1]``, or a dataclass's ``labels``;
* **token mask** ``(B, T)`` bool: ``batch["attention_mask"]`` when present, else ``None`` (no padding);
* **outputs**: logits = a Tensor as is, ``.logits`` / ``["logits"]`` (HF ``ModelOutput``), or the first element of a
  tuple; loss = ``.loss`` / ``["loss"]`` (``None`` when absent); hidden states = ``.hidden_states``.

Example::

    from lit_act.batch import BatchAdapter
    adapter = BatchAdapter(forward_fn=lambda m, b: m(b["pixels"]), mask_fn=lambda b: b["valid"])
    NeuronActivationCoverage(adapter=adapter)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

ForwardFn = Callable[[nn.Module, Any], Any]
MaskFn = Callable[[Any], Tensor | None]
OutputFn = Callable[[Any], Any]
TargetsFn = Callable[[Any], Tensor | None]

_TARGET_KEYS = ("labels", "label", "targets", "target", "y")


def _fields(batch: Any) -> dict[str, Any]:
    return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


def default_forward(module: nn.Module, batch: Any) -> Any:
    """``module(**batch)`` for a Mapping or dataclass, ``module(batch[0])`` for a tuple/list, ``module(batch)``
    otherwise (a Tensor)."""
    if isinstance(batch, Mapping):
        return module(**batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return module(**_fields(batch))
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError("cannot run the model on an empty batch sequence")
        return module(batch[0])
    return module(batch)


def default_mask(batch: Any) -> Tensor | None:
    """``batch["attention_mask"]`` (or a dataclass's ``attention_mask``) as bool, else ``None``."""
    if isinstance(batch, Mapping) or (dataclasses.is_dataclass(batch) and not isinstance(batch, type)):
        mask = _get(batch, "attention_mask")
        if isinstance(mask, Tensor):
            return mask.bool()
    return None


def default_targets(batch: Any) -> Tensor | None:
    """``batch["labels"]`` (``label``, ``targets``, ``target``, ``y``), ``batch[1]`` or a dataclass field of those
    names; ``None`` when the batch carries no targets."""
    if isinstance(batch, Mapping) or (dataclasses.is_dataclass(batch) and not isinstance(batch, type)):
        for key in _TARGET_KEYS:
            value = _get(batch, key)
            if isinstance(value, Tensor):
                return value
        return None
    if isinstance(batch, tuple | list) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def output_logits(output: Any) -> Tensor | None:
    """The logits of a model output: a Tensor as is, ``.logits`` / ``["logits"]``, else the first Tensor of a
    tuple/list; ``None`` when there is none."""
    if isinstance(output, Tensor):
        return output
    value = _get(output, "logits")
    if isinstance(value, Tensor):
        return value
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def output_loss(output: Any) -> Tensor | None:
    """``.loss`` / ``["loss"]`` of a model output when it is a Tensor (HF models given labels), else ``None``."""
    if isinstance(output, Tensor | tuple | list):
        return None
    value = _get(output, "loss")
    return value if isinstance(value, Tensor) else None


def output_hidden_states(output: Any) -> Any:
    """``.hidden_states`` / ``["hidden_states"]`` of a model output (``None`` when absent)."""
    return None if isinstance(output, Tensor | tuple | list) else _get(output, "hidden_states")


@dataclasses.dataclass(frozen=True)
class BatchAdapter:
    """How lit-act reads a batch and a model output; every callback takes one as ``adapter=``.

    Args:
        forward_fn: ``(module, batch) -> output``; default :func:`default_forward`.
        mask_fn: ``batch -> bool (B, T) | None`` (True = real token); default :func:`default_mask`.
        logits_fn: ``output -> logits``; default :func:`output_logits`.
        loss_fn: ``output -> scalar loss | None``; default :func:`output_loss`.
        targets_fn: ``batch -> targets | None``; default :func:`default_targets`.
    """

    forward_fn: ForwardFn | None = None
    mask_fn: MaskFn | None = None
    logits_fn: OutputFn | None = None
    loss_fn: OutputFn | None = None
    targets_fn: TargetsFn | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None and not callable(value):
                raise TypeError(f"BatchAdapter.{field.name} must be callable or None, got {value!r}")

    def forward(self, module: nn.Module, batch: Any) -> Any:
        """Run ``module`` on ``batch`` (never ``training_step``)."""
        return (self.forward_fn or default_forward)(module, batch)

    def mask(self, batch: Any) -> Tensor | None:
        """The ``(B, T)`` bool token mask of ``batch``, or ``None``."""
        mask = (self.mask_fn or default_mask)(batch)
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError(f"mask_fn must return a (batch, tokens) tensor or None, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        return None if mask is None else mask.bool()

    def logits(self, output: Any) -> Tensor | None:
        return (self.logits_fn or output_logits)(output)

    def loss(self, output: Any) -> Tensor | None:
        return (self.loss_fn or output_loss)(output)

    def targets(self, batch: Any) -> Tensor | None:
        return (self.targets_fn or default_targets)(batch)


DEFAULT_ADAPTER = BatchAdapter()
