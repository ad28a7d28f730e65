"""Shared LightningModule for lit-act's reference models.

Conventions every lit-act callback relies on (documented here once):

* a batch is ``(inputs, targets)``;
* ``module(inputs)`` returns **logits** of shape ``(..., num_classes)`` (``(B, C)`` for classifiers, ``(B, T, V)`` for
  the language model); ``module.loss(logits, targets)`` is the training loss (mean cross-entropy over all positions);
* ``module.activation_factory()`` builds one activation module, so ``activation=<name>`` swaps every non-linearity.

Checkpoints reload alone (``Model.load_from_checkpoint(path)``): the hyperparameters record the activation as a
reconstructible spec (:func:`activation_spec`: a registry name, or ``{"name": ..., **kwargs}``) and the ``mlp``
transformation (:func:`mlp_spec`, the :func:`~lit_act.kan.kanify` arguments) that the model re-applies in
``__init__`` before the state dict is loaded. Example::

    model = MLPClassifier(64, 10, activation=functools.partial(build, name="leaky_relu", negative_slope=0.2),
                          mlp={"layer": "kan", "match": "hidden.*", "grid_size": 3})
    model.hparams.activation  # {'name': 'leaky_relu', 'negative_slope': 0.2}
    model.hparams.mlp         # {'layer': 'kan', 'match': 'hidden.*', 'grid_size': 3}

Logged keys: ``train/loss``, ``val/loss``, ``test/loss``, and for classifiers ``{stage}/acc``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor, nn

from lit_act.activations import build
from lit_act.activations import registry as _registry
from lit_act.kan import kanify
from lit_act.utils import validate as v

ActivationSpec = str | Mapping[str, Any] | type[nn.Module] | Callable[[], nn.Module]
MLPSpec = Mapping[str, Any] | Callable[..., Any] | None

_UNRECORDED = ("it could not be recorded in the checkpoint (a lambda, a local class or a partial with positional "
               "arguments); pass it again: Model.load_from_checkpoint(path, activation=...)")


def _import(path: str) -> Any:
    """The object at the dotted import path ``pkg.module.Name`` (``ValueError`` when there is none)."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            break
        return obj
    raise ValueError(f"activation {path!r} is neither a registered name ({', '.join(_registry.available())}) "
                     "nor an importable dotted path")


def _name_of(obj: Any) -> str | None:
    """A string that :func:`_resolve` maps back to ``obj``: its registry name, else its dotted import path."""
    for name in _registry.available():
        if _registry.get(name) is obj:
            return name
    path = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
    if "<" in path:  # lambdas, local classes
        return None
    try:
        return path if _import(path) is obj else None
    except ValueError:
        return None


def _resolve(name: str) -> str | Callable[..., nn.Module]:
    """A registry name stays a name (checked); a dotted path is imported."""
    if "." in name:
        return _import(name)
    _registry.get(name)  # fail fast on unknown names, listing the valid ones
    return name


def activation_spec(spec: ActivationSpec | None) -> str | dict[str, Any] | None:
    """A reconstructible record of ``spec`` for the hyperparameters (and so for checkpoints).

    Names stay names; classes and functions become their registry name or dotted import path; a
    ``functools.partial`` (what a Hydra ``_partial_`` config such as ``conf/activation/rational.yaml`` builds)
    becomes ``{"name": ..., **keywords}``. A spec that cannot be recorded (a lambda, a local class) gives ``None``
    with a warning: such a checkpoint reloads only with ``activation=`` passed again.

    Example: ``activation_spec(partial(build, name="topk", k=0.1))`` is ``{"name": "topk", "k": 0.1}``.
    """
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return {**spec}
    if isinstance(spec, functools.partial):
        args, kwargs = list(spec.args), dict(spec.keywords)
        target = spec.func
        if target is build:  # partial(build, name, **kwargs) or partial(build, name=..., **kwargs)
            target = args.pop(0) if args else kwargs.pop("name", None)
        name = target if isinstance(target, str) else _name_of(target) if callable(target) else None
        if not args and isinstance(name, str):
            return {"name": name, **kwargs} if kwargs else name
    elif callable(spec) and (name := _name_of(spec)) is not None:
        return name
    warnings.warn(f"activation {spec!r}: {_UNRECORDED}", UserWarning, stacklevel=3)
    return None


def activation_factory(spec: ActivationSpec) -> Callable[[], nn.Module]:
    """Turn a name, a recorded spec ``{"name": ..., **kwargs}``, an ``nn.Module`` class or a factory (e.g. a Hydra
    ``_partial_``) into a zero-argument factory."""
    if spec is None:
        raise ValueError(f"activation is None: {_UNRECORDED}")
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise ValueError(f"an activation mapping needs a 'name' key (and the keyword arguments), got {dict(spec)}")
        kwargs = {k: v for k, v in spec.items() if k != "name"}
        factory = functools.partial(build, _resolve(spec["name"]), **kwargs)
        factory()  # fail fast on bad arguments
        return factory
    if isinstance(spec, str):
        spec = _resolve(spec)
        build(spec)  # fail fast on unknown names, listing the valid ones
        return functools.partial(build, spec)  # a partial, not a lambda: ddp_spawn pickles the module
    if callable(spec):
        return functools.partial(build, spec)
    raise TypeError(f"activation must be a name, a mapping {{'name': ..., **kwargs}}, an nn.Module class or a factory, "
                    f"got {spec!r}")


def mlp_spec(mlp: MLPSpec) -> dict[str, Any] | None:
    """The :func:`~lit_act.kan.kanify` arguments a model applies to itself (``mlp=kan`` and friends), as a dict.

    Accepts ``None`` (keep the model's MLP blocks), a mapping of ``kanify`` keyword arguments, or
    ``functools.partial(kanify, ...)`` (what ``conf/mlp/*.yaml`` instantiate to).
    """
    if mlp is None:
        return None
    if isinstance(mlp, functools.partial) and mlp.func is kanify and not mlp.args:
        mlp = mlp.keywords
    if not isinstance(mlp, Mapping):
        raise TypeError(f"mlp must be None, a mapping of kanify arguments or functools.partial(kanify, ...), "
                        f"got {mlp!r}")
    return dict(mlp)


class LitActModule(LightningModule):
    """Base of the reference models: cross-entropy on logits, AdamW with optional cosine decay.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        cosine_schedule: decay the learning rate with a cosine over ``trainer.estimated_stepping_batches``.
    """

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.0, cosine_schedule: bool = False) -> None:
        super().__init__()
        lr, weight_decay = v.positive_float("lr", lr), v.finite_float("weight_decay", weight_decay, low=0.0)
        cosine_schedule = v.boolean("cosine_schedule", cosine_schedule)
        self.lr = lr
        self.weight_decay = weight_decay
        self.cosine_schedule = cosine_schedule

    def record_hyperparameters(self, activation: ActivationSpec, mlp: MLPSpec) -> dict[str, Any] | None:
        """``save_hyperparameters()`` of the calling ``__init__``'s arguments, with ``activation`` and ``mlp`` recorded
        in their reconstructible forms (:func:`activation_spec`, :func:`mlp_spec`) so checkpoints reload alone; sets
        ``self.activation_factory`` and returns the ``mlp`` dict for :meth:`apply_mlp`."""
        factory = activation_factory(activation)
        frame = inspect.currentframe().f_back
        code = frame.f_code  # the caller's own arguments (a user subclass's __init__ may differ)
        names = code.co_varnames[1:code.co_argcount + code.co_kwonlyargcount]
        hparams = {name: frame.f_locals[name] for name in names}
        hparams.update(activation=activation_spec(activation), mlp=mlp_spec(mlp))
        self.save_hyperparameters(hparams)
        self.activation_factory = factory
        return hparams["mlp"]

    def apply_mlp(self, mlp: dict[str, Any] | None) -> None:
        """Apply the recorded ``mlp`` transformation (:func:`~lit_act.kan.kanify`) at the end of ``__init__``, so
        a reloaded model has the same layers before its state dict is loaded."""
        if mlp is not None:
            kanify(self, **mlp)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy over every position: logits ``(..., C)``, integer targets ``(...)``."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def _shared_step(self, batch: Any, stage: str) -> Tensor:
        inputs, targets = batch
        logits = self(inputs)
        loss = self.loss(logits, targets)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test", on_step=stage == "train", on_epoch=True,
                 batch_size=targets.shape[0], sync_dist=stage != "train")
        if self.log_accuracy:
            acc = (logits.argmax(-1) == targets).float().mean()
            self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True, batch_size=targets.shape[0],
                     sync_dist=stage != "train")
        return loss

    log_accuracy: bool = True

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "test")

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if not self.cosine_schedule:
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
