"""The callback core shared by every lit-act callback: adapters, the emitter, quiet internal passes, probe sets, resume.

:class:`LitActCallback` is the base of every lit-act callback (the statistics collector
:class:`lit_act.callbacks.base.ActivationStatisticCallback`, NAC, the Hessian, histograms, shapes, teacher-student,
S-KAN stages). It owns:

* **Adapters** (:class:`lit_act.batch.BatchAdapter`, ``adapter=``): how a batch is run through the model
  (``forward_fn``), its token mask, targets, and the output's logits / loss.
* **The emitter** (:meth:`LitActCallback.log_metrics`): one call writes ``{key: value}`` to every logger (rank zero, at the
  given step, never dropped by ``log_every_n_steps``) *and* to ``trainer.callback_metrics`` (every rank), so
  ``ModelCheckpoint(monitor="val/sparsity/mean")``, ``EarlyStopping`` and sweepers can monitor any statistic.
  Keys follow ``{stage}/{statistic}/{module}``, ``{stage}/{statistic}/mean`` over modules and
  ``{stage}/{statistic}/{module}/nonfinite`` (:func:`metric_key`). Figures go to ``<run dir>/figures``
  (:func:`lit_act.utils.figures.run_dir`: ``default_root_dir`` when set, else the logger's ``log_dir``).
* **Quiet internal passes** (:meth:`LitActCallback.quiet_pass`): lit-act's own forwards (NAC, Hessian-vector
  products, probe passes, dry runs) run with every other callback's taps paused
  (:func:`lit_act.stats.tap.paused`), train/eval flags and the RNG restored.
* **Probe sets** (:func:`probe_batches`): the first ``samples`` of the training split, in order, sharded over DDP
  ranks, without touching the training loader's shuffling or the global RNG.
* **Resume with one DDP semantics** (:func:`reduced_states`, :func:`assign_states`): metric states are saved reduced
  over ranks and restored on rank 0 only, so the next reduction counts them once.

Writing a new callback::

    class MyCallback(LitActCallback):
        @override
        def on_validation_epoch_end(self, trainer, pl_module):
            with self.quiet_pass(pl_module), torch.no_grad():
                out = self.adapter.forward(pl_module, self.example)
            self.log_metrics(trainer, {metric_key("val", "my_stat", "mean"): float(out.mean())}, trainer.global_step)
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning import Callback, Trainer
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, Subset
from torchmetrics import Metric

from lit_act.batch import DEFAULT_ADAPTER, BatchAdapter
from lit_act.stats.tap import paused
from lit_act.utils import validate as v
from lit_act.utils.figures import save_figure
from lit_act.utils.modes import evaluating

PROBE_BATCH_SIZE = 64


def metric_key(stage: str, statistic: str, module: str | None = None, nonfinite: bool = False) -> str:
    """``{stage}/{statistic}/{module}`` (``module=None``: ``{stage}/{statistic}``), with ``/nonfinite`` appended for
    non-finite counts; ``module="mean"`` is the mean over modules."""
    key = f"{stage}/{statistic}" if module is None else f"{stage}/{statistic}/{module}"
    return f"{key}/nonfinite" if nonfinite else key


class LitActCallback(Callback):
    """Base of every lit-act callback (see the module docstring).

    Args:
        adapter: how batches and outputs are read (:class:`lit_act.batch.BatchAdapter`; default: HF-style dicts,
            ``(inputs, targets)`` tuples, Tensors).
        figures: save this callback's figures.

    Attributes: ``last_logged`` (the last ``{key: value}`` this callback emitted).
    """

    def __init__(self, adapter: BatchAdapter | None = None, figures: bool = True) -> None:
        figures = v.boolean("figures", figures)
        if adapter is not None and not isinstance(adapter, BatchAdapter):
            raise TypeError(f"adapter must be a lit_act.batch.BatchAdapter, got {type(adapter).__name__}")
        self.adapter = adapter or DEFAULT_ADAPTER
        self.figures = figures
        self.last_logged: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------- emitter
    def log_metrics(self, trainer: Trainer, metrics: Mapping[str, float | Tensor], step: int) -> dict[str, float]:
        """Write ``metrics`` to every logger (rank zero, at ``step``) and to ``trainer.callback_metrics`` (every
        rank); returns them as floats (also kept in :attr:`last_logged`)."""
        values = {k: float(v) for k, v in metrics.items()}
        if not values:
            return values
        callback_metrics = trainer.callback_metrics
        for key, value in values.items():
            callback_metrics[key] = torch.tensor(value)
        self.last_logged = values
        log_to_loggers(trainer, values, step)
        return values

    def save_figure(self, trainer: Trainer, fig, name: str, step: int | None = None) -> None:
        """Save ``fig`` as ``<run dir>/figures/<name>[_step<step>].png`` (and a W&B image) when ``figures`` is on."""
        if self.figures:
            save_figure(trainer, fig, name, step=step)
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def warn(self, message: str) -> None:
        rank_zero_warn(f"{type(self).__name__}: {message}")

    # ----------------------------------------------------------------------------------------- internal passes
    @contextmanager
    def quiet_pass(self, module: nn.Module, eval_mode: bool = True, observe: bool = False) -> Iterator[None]:
        """Run lit-act's own pass over ``module``: every tap paused (except this callback's own when ``observe``),
        eval mode (``eval_mode``), train/eval flags and the global RNG restored on exit."""
        with paused(allow=self if observe else None), evaluating(module, eval_mode), preserved_rng():
            yield


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the torch (CPU and initialised CUDA), NumPy and ``random`` RNG states on exit."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)


# ----------------------------------------------------------------------------------------------------- probe set
def training_loader(trainer: Trainer) -> Any:
    """The training DataLoader of the run: ``trainer.datamodule.train_dataloader()`` when there is a datamodule,
    else the fit loop's ``trainer.train_dataloader`` (the first one of a collection); ``None`` when unavailable."""
    loader = None
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and callable(getattr(datamodule, "train_dataloader", None)):
        with preserved_rng():
            try:
                loader = datamodule.train_dataloader()
            except (AttributeError, RuntimeError, TypeError, ValueError, NotImplementedError):
                loader = None
    if loader is None:
        loader = trainer.train_dataloader
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    return loader


def batch_length(batch: Any) -> int:
    """Samples in ``batch``: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, list | tuple) else (
        vars(batch).values() if hasattr(batch, "__dict__") else ())
    for value in values:
        if isinstance(value, Tensor | Mapping | list | tuple):
            return batch_length(value)
    raise TypeError(f"cannot tell the number of samples of a {type(batch).__name__} batch")


def probe_batches(trainer: Trainer, samples: int, device: torch.device | None = None) -> Iterator[Any]:
    """The probe set: the first ``samples`` samples of the training split in dataset order (this rank's share under
    DDP: samples ``rank, rank + world, ...``), batched with the training loader's ``collate_fn``, moved to ``device``.
    The training loader's sampler and the global RNG are not touched.

    Raises:
        RuntimeError: when the run has no training loader.
    """
    loader = training_loader(trainer)
    if loader is None:
        raise RuntimeError("no training dataloader to take the probe set from: fit with a datamodule or "
                           "train_dataloaders=..., or switch the probe schedule off (probe=None)")
    with preserved_rng():
        if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
            dataset = loader.dataset
            indices = range(trainer.global_rank, min(samples, len(dataset)), max(trainer.world_size, 1))
            probe = DataLoader(Subset(dataset, list(indices)), batch_size=loader.batch_size or PROBE_BATCH_SIZE,
                               shuffle=False, collate_fn=loader.collate_fn, num_workers=0)
            for batch in probe:
                yield batch if device is None else move_data_to_device(batch, device)
            return
        seen = 0
        for batch in loader:
            if seen >= samples:
                break
            seen += batch_length(batch)
            yield batch if device is None else move_data_to_device(batch, device)


def stage_loader(trainer: Trainer, stage: str) -> Any:
    """The first DataLoader of ``stage`` (``"val"``: ``trainer.val_dataloaders``, ``"test"``:
    ``trainer.test_dataloaders``); ``None`` when there is none."""
    loader = getattr(trainer, f"{stage}_dataloaders", None) if stage in ("val", "test") else None
    if isinstance(loader, Mapping):
        loader = next(iter(loader.values()), None)
    elif isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    return loader


def leading_batches(loader: Any, device: torch.device | None = None) -> Iterator[Any] | None:
    """The batches of ``loader``'s dataset from sample 0 in dataset order, batched and collated like ``loader``, the same
    on every DDP rank (no sampler, no shuffling, no workers; ``loader`` itself is not iterated, so its state and the
    global RNG are untouched); ``None`` unless ``loader`` is a DataLoader over a map-style dataset. Stop iterating when
    enough has been seen."""
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return None

    def batches() -> Iterator[Any]:
        with preserved_rng():
            fixed = DataLoader(loader.dataset, batch_size=loader.batch_size or PROBE_BATCH_SIZE, shuffle=False,
                               collate_fn=loader.collate_fn, num_workers=0)
            for batch in fixed:
                yield batch if device is None else move_data_to_device(batch, device)

    return batches()


# -------------------------------------------------------------------------------------------------------- resume
def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


def reduced_states(metric: Metric) -> dict[str, Tensor]:
    """``metric``'s states reduced over DDP ranks (its own states outside DDP), detached CPU copies."""
    metric.sync()  # no-op outside DDP
    try:
        return {s: v.detach().cpu().clone() for s, v in metric.metric_state.items()}
    finally:
        metric.unsync(should_unsync=metric._is_synced)


def assign_states(metric: Metric, states: Mapping[str, Tensor]) -> None:
    """Set ``metric``'s states to ``states`` (from :func:`reduced_states`); the restored data counts as updates."""
    device = metric.device
    for state, value in states.items():
        setattr(metric, state, value.to(device).clone())
    metric._update_count = max(metric._update_count, 1)
    metric._computed = None


@rank_zero_only
def log_to_loggers(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    """``logger.log_metrics(metrics, step)`` on every logger of ``trainer`` (rank zero)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)

