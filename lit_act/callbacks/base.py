"""Shared machinery of lit-act's activation-statistic callbacks.

:class:`ActivationStatisticCallback` does everything but the statistic itself:

* **Scheduling.** Training batches are observed when ``every_n_steps`` divides ``trainer.global_step``
  (:func:`lit_act.utils.schedule.due`); with ``on_validation`` (``on_test``) every batch of a validation (test) epoch
  is. Nothing is collected in the sanity check or under ``fast_dev_run`` (:func:`lit_act.utils.schedule.is_real_run`).
* **Hooks only while collecting.** Forward hooks (:func:`lit_act.stats.tap.tap`) are registered at the start of an
  observed batch / epoch and removed at its end, on ``on_exception`` and on ``teardown``.
* **Accumulation.** Each observed module gets fixed-shape torchmetrics ``Metric``s (created at its first observation,
  on the activation's device). Updates run under ``no_grad`` with autocast off, on fp32 copies; NaN/Inf are counted.
* **Logging** (rank zero, straight to ``trainer.loggers`` so no collection is dropped by ``log_every_n_steps``): for
  every statistic ``s`` the metric returns, ``{stage}/{s}/{module_name}`` and the mean over modules
  ``{stage}/{s}/mean``; non-finite counts as ``{stage}/{statistic}/{module_name}/nonfinite`` (with a warning when > 0).
  Training statistics are logged at the step they were collected at; validation/test ones at epoch end. Metric
  ``compute`` syncs states across DDP ranks first, so every rank logs the same, exact, reduced numbers.
* **Resume.** ``state_dict`` holds every metric's states (reduced over DDP ranks) and the per-collection history;
  ``load_state_dict`` restores them, the states on rank 0 only (``state_key`` names the callback and its settings).
* **Figures.** At train end a heatmap of :attr:`history_statistic` per module vs collection step
  (``figures/{statistic}_per_layer``) via :func:`lit_act.utils.figures.save_figure`.
* **torch.compile.** Hooks added to a compiled module are not seen by its graph, so :meth:`setup` raises on a
  compiled LightningModule (``trainer.fit(torch.compile(model))``, ``module.compile()``): attach the callback to the
  uncompiled module.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lit_act.stats.tap import ModuleSelector, require_uncompiled, select_modules, tap
from lit_act.utils.figures import save_figure
from lit_act.utils.schedule import due, is_real_run, validate_every_n

_PER_POSITION_SUFFIXES = ("_token", "_dim")  # logged per module, never averaged over modules


class ActivationStatisticCallback(Callback):
    """Base class: subclasses set :attr:`statistic` and :attr:`history_statistic`, and implement
    :meth:`make_metrics` and :meth:`update`.

    Args:
        modules: module selector (:func:`lit_act.stats.tap.select_modules`); ``None`` = :meth:`default_modules`.
        every_n_steps: observe the training batch at every ``every_n_steps``-th global step (``None``: never).
        on_validation: observe every validation batch and log at validation epoch end.
        on_test: the same for test epochs.
        figures: save the per-layer heatmap (and subclass figures) at train end.

    Attributes (inspectable after ``fit``): ``selected`` (observed modules by name), ``metrics`` (stage -> module ->
    metrics), ``history_steps`` / ``history`` (:attr:`history_statistic` per module at each training emission),
    ``last_logged`` (the last ``{key: value}`` logged).
    """

    statistic: ClassVar[str]
    history_statistic: ClassVar[str]

    def __init__(self, modules: ModuleSelector = None, every_n_steps: int | None = 50, on_validation: bool = True,
                 on_test: bool = False, figures: bool = True) -> None:
        validate_every_n("every_n_steps", every_n_steps)
        if every_n_steps is None and not on_validation and not on_test:
            raise ValueError(f"{type(self).__name__} would never collect: set every_n_steps, on_validation=True or "
                             "on_test=True")
        self.modules = modules
        self.every_n_steps = every_n_steps
        self.on_validation = on_validation
        self.on_test = on_test
        self.figures = figures
        self.selected: dict[str, nn.Module] = {}
        self.metrics: dict[str, dict[str, dict[str, Metric]]] = {}  # stage -> module name -> metric name -> Metric
        self.history_steps: list[int] = []
        self.history: dict[str, list[float]] = {}  # module name -> history_statistic per training collection
        self.last_logged: dict[str, float] = {}
        self._pending_states: dict[str, dict[str, dict[str, dict[str, Tensor]]]] = {}
        self._taps = ExitStack()
        self._collecting: str | None = None
        self._collect_step = 0

    # ----------------------------------------------------------------------------------------- subclass interface
    def default_modules(self, pl_module: LightningModule) -> ModuleSelector:
        """Selector used when ``modules=None`` (default: every activation-function module)."""
        return None

    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        """Fresh metrics for module ``name`` at its first observation ``x`` in ``stage``."""
        raise NotImplementedError

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        """Feed one observed output ``x`` (raw, as extracted by the tap) to ``metrics``."""
        raise NotImplementedError

    def check_setup(self, pl_module: LightningModule) -> None:
        """Extra validation once modules are selected (raise with a fix in the message)."""

    def train_window_done(self, trainer: Trainer) -> bool:
        """Whether the training accumulators are computed, logged and reset after this observed batch."""
        return True

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), every_n_steps=self.every_n_steps)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_uncompiled(pl_module, type(self).__name__)
        selector = self.modules if self.modules is not None else self.default_modules(pl_module)
        self.selected = select_modules(pl_module, selector)
        self.check_setup(pl_module)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if due(trainer.global_step, self.every_n_steps) and is_real_run(trainer):
            self._collect_step = trainer.global_step
            self._start("train")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._collecting == "train":
            self._stop()
            if self.train_window_done(trainer):
                self.emit(trainer, "train", self._collect_step)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validation and is_real_run(trainer):
            self._start("val")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collecting == "val":
            self._stop()
            self.emit(trainer, "val", trainer.global_step)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_test and is_real_run(trainer):
            self._start("test")

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collecting == "test":
            self._stop()
            self.emit(trainer, "test", trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.figures and self.history_steps and is_real_run(trainer):
            self.save_history_figure(trainer)

    # ------------------------------------------------------------------------------------------------ collecting
    def _start(self, stage: str) -> None:
        self._stop()
        self._taps.enter_context(tap(self.selected, lambda name, module, x: self._observe(stage, name, module, x)))
        self._collecting = stage

    def _stop(self) -> None:
        self._taps.close()
        self._collecting = None

    def _observe(self, stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            metrics = self.metrics.setdefault(stage, {}).get(name)
            if metrics is None:
                metrics = self._create(stage, name, module, x)
            self.update(metrics, stage, name, module, x)

    def _create(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        metrics = {key: m.to(x.device) for key, m in self.make_metrics(stage, name, module, x).items()}
        for key, states in self._pending_states.get(stage, {}).pop(name, {}).items():
            if key in metrics:
                _assign_states(metrics[key], states)
        self.metrics[stage][name] = metrics
        return metrics

    # ----------------------------------------------------------------------------------------------- reporting
    def compute(self, stage: str) -> dict[str, dict[str, Tensor]]:
        """``{module name: {statistic: 0-d tensor}}`` for ``stage`` (DDP-synced by torchmetrics)."""
        out = {}
        for name in self.selected:
            metrics = self.metrics.get(stage, {}).get(name)
            if metrics:
                out[name] = {k: v for m in metrics.values() for k, v in m.compute().items()}
        return out

    def emit(self, trainer: Trainer, stage: str, step: int) -> dict[str, float]:
        """Compute, log and reset ``stage``'s accumulators; returns the logged ``{key: value}``."""
        per_module = self.compute(stage)
        for metrics in self.metrics.get(stage, {}).values():
            for metric in metrics.values():
                metric.reset()
        if not per_module:
            return {}
        keys, values = [], []
        for name, stats in per_module.items():
            for stat, value in stats.items():
                keys.append(f"{stage}/{self.statistic}/{name}/nonfinite" if stat == "nonfinite"
                            else f"{stage}/{stat}/{name}")
                values.append(value.float())
        for stat in next(iter(per_module.values())):
            if stat != "nonfinite" and not stat.endswith(_PER_POSITION_SUFFIXES):
                keys.append(f"{stage}/{stat}/mean")
                values.append(torch.stack([s[stat].float() for s in per_module.values()]).nanmean())
        logged = dict(zip(keys, torch.stack(values).tolist(), strict=True))
        self._warn_nonfinite(stage, logged)
        if stage == "train":
            self.history_steps.append(step)
            for name in per_module:
                self.history.setdefault(name, []).append(logged[f"train/{self.history_statistic}/{name}"])
        self.last_logged = logged
        log_to_loggers(trainer, logged, step)
        return logged

    def _warn_nonfinite(self, stage: str, logged: dict[str, float]) -> None:
        bad = {k: int(v) for k, v in logged.items() if k.endswith("/nonfinite") and v > 0}
        if bad:
            rank_zero_warn(f"{type(self).__name__}: NaN/Inf activations were excluded from the {stage} statistics "
                           f"(counts: {bad})")

    def save_history_figure(self, trainer: Trainer) -> None:
        """Heatmap of :attr:`history_statistic` (modules x collection steps)."""
        import matplotlib.pyplot as plt

        names = list(self.history)
        grid = [self.history[n] for n in names]
        fig, ax = plt.subplots(figsize=(8, 1.2 + 0.35 * len(names)))
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(names)), names)
        ticks = range(0, len(self.history_steps), max(1, len(self.history_steps) // 8))
        ax.set_xticks(list(ticks), [str(self.history_steps[i]) for i in ticks])
        ax.set_xlabel("training step")
        ax.set_title(f"{self.history_statistic} per layer")
        fig.colorbar(image, ax=ax)
        save_figure(trainer, fig, f"{self.history_statistic}_per_layer")

    # ---------------------------------------------------------------------------------------------------- resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """Metric states reduced over DDP ranks (the checkpoint, written by rank 0, holds every rank's data) and the
        per-collection history."""
        states = {stage: {name: {key: _global_states(m) for key, m in metrics.items()}
                          for name, metrics in by_name.items()}
                  for stage, by_name in self.metrics.items()}
        return {"metric_states": states, "history_steps": list(self.history_steps),
                "history": {k: list(v) for k, v in self.history.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history everywhere and the (already reduced) metric states on rank 0 only, so the next DDP
        reduction counts them once."""
        self.history_steps = list(state_dict["history_steps"])
        self.history = {k: list(v) for k, v in state_dict["history"].items()}
        self._pending_states = state_dict["metric_states"] if _rank() == 0 else {}
        for stage, by_name in self._pending_states.items():
            for name, by_key in by_name.items():
                for key, states in by_key.items():
                    metric = self.metrics.get(stage, {}).get(name, {}).get(key)
                    if metric is not None:
                        _assign_states(metric, states)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() \
        else 0


def _global_states(metric: Metric) -> dict[str, Tensor]:
    metric.sync()  # no-op outside DDP
    try:
        return {s: v.detach().cpu().clone() for s, v in metric.metric_state.items()}
    finally:
        metric.unsync(should_unsync=metric._is_synced)


def _assign_states(metric: Metric, states: dict[str, Tensor]) -> None:
    device = metric.device
    for state, value in states.items():
        setattr(metric, state, value.to(device).clone())
    metric._update_count = max(metric._update_count, 1)  # restored data counts as updates (no compute warning)
    metric._computed = None


@rank_zero_only
def log_to_loggers(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
