"""The collector: the shared machinery of lit-act's activation-statistic callbacks.

:class:`ActivationStatisticCallback` (a :class:`lit_act.callbacks.core.LitActCallback`) does everything but the
statistic itself:

* **Schedules** (all optional, combined freely):

  - ``every_n_steps``: the training batch of every ``every_n_steps``-th global step (:func:`~lit_act.utils.schedule.due`),
    computed and logged at that step (or accumulated over a window, see :meth:`train_window_done`);
  - ``on_validation`` / ``on_test``: every batch of a validation / test epoch, logged at epoch end. Under
    ``trainer.validate(...)`` / ``trainer.test(...)`` that stage is always collected, so every statistics callback
    yields numbers there (``on_validation`` decides about the validation epochs inside ``fit``);
  - ``probe``: a **probe pass** (``"epoch"``: at every training epoch end; an int ``n``: every ``n`` steps): the
    current model runs in eval mode under ``no_grad`` over a fixed probe set, the first ``probe_samples`` samples of
    the training split (:func:`lit_act.callbacks.core.probe_batches`), with only this callback's taps live; flags and
    RNG restored. Logged as ``probe/...``.

  Nothing is collected in the sanity check or under ``fast_dev_run`` (:func:`lit_act.utils.schedule.is_real_run`).
* **Selection** (:func:`lit_act.selection.select_sites`): ``modules=`` is a preset, glob(s), type(s) or predicate, or
  a ``{name: module | Site}`` dict; ``None`` uses the subclass's :meth:`default_selection` preset
  (``"activations"`` here; ActivationSparsity and DeadNeurons: :func:`~lit_act.selection.default_preset`, i.e.
  ``"mlp_hidden"`` on transformer-like models; MassiveActivations: ``"residual_stream"``). A site observes a module's
  output or its input (``Site(..., port="input")``: the input of a gated MLP's down-projection).
* **Never silent.** At setup a callback that can collect nothing in the configured run (a schedule past the planned
  steps, validation-only with validation off) warns.
* **Hooks only while collecting** (:func:`lit_act.stats.tap.tap`): registered at the start of an observed batch /
  epoch / probe pass and removed at its end, on ``on_exception`` and on ``teardown``. lit-act's own passes (NAC,
  Hessian, probe passes of other callbacks) are not observed (:func:`lit_act.stats.tap.paused`).
* **Token mask**: each observed batch's mask (``adapter.mask_fn``, default ``batch["attention_mask"]``) is set
  before its forward; :meth:`tokens` gives subclasses the real tokens of an output (padding excluded), and raises
  naming the module and both shapes when they disagree.
* **Accumulation.** Each observed module gets fixed-shape torchmetrics ``Metric``s (created at its first observation,
  on the activation's device). Updates run under ``no_grad`` with autocast off; NaN/Inf are counted.
* **Emission** (:meth:`emit`, through :meth:`LitActCallback.log_metrics`: loggers and ``trainer.callback_metrics``): for every
  statistic ``s`` the metrics return, ``{stage}/{s}/{module}`` and the mean over modules ``{stage}/{s}/mean``;
  non-finite counts as ``{stage}/{statistic}/{module}/nonfinite`` (warning when > 0). Metric ``compute`` syncs
  states across DDP ranks first, so every rank logs the same reduced numbers.
* **Resume.** ``state_dict`` holds every metric's states reduced over DDP ranks and the per-collection history;
  ``load_state_dict`` restores them, the states on rank 0 only (``state_key`` names the callback and its settings).
* **Figures.** At train end a heatmap of :attr:`history_statistic` per module vs collection step
  (``figures/{statistic}_per_layer``) under the run directory.
* **torch.compile.** :meth:`setup` raises on a compiled LightningModule (hooks would not be seen).

A new statistic callback sets :attr:`statistic`, :attr:`history_statistic` and implements :meth:`make_metrics` and
:meth:`update`::

    class MeanActivation(ActivationStatisticCallback):
        statistic = history_statistic = "mean_act"

        def make_metrics(self, stage, name, module, x):
            return {"mean_act": torchmetrics.aggregation.MeanMetric()}  # compute() must return {stat: value}

        def update(self, metrics, stage, name, module, x):
            metrics["mean_act"].update(self.tokens(name, x))
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, ClassVar

import torch
from lightning import LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lit_act.batch import BatchAdapter
from lit_act.callbacks.core import (
    LitActCallback,
    assign_states,
    metric_key,
    probe_batches,
    rank,
    reduced_states,
)
from lit_act.selection import select_sites
from lit_act.stats.tap import (
    ModuleSelector,
    clear_token_cache,
    require_uncompiled,
    site_of,
    tap,
    valid_tokens,
)
from lit_act.utils import validate as v
from lit_act.utils.schedule import due, is_real_run, planned_steps, validate_every_n, validation_enabled

_PER_POSITION_SUFFIXES = ("_token", "_dim", "_freq")  # positions: logged per module, never averaged over modules
PROBE_EPOCH = "epoch"
DEFAULT_PROBE_SAMPLES = 512


def validate_probe(probe: str | int | None, probe_samples: int) -> None:
    """Raise unless ``probe`` is ``None``, ``"epoch"`` or a positive int, and ``probe_samples`` a positive int."""
    if probe is not None and probe != PROBE_EPOCH and not (isinstance(probe, int) and probe >= 1):
        raise ValueError(f"probe must be None, {PROBE_EPOCH!r} or a positive number of steps, got {probe!r}")
    validate_every_n("probe_samples", probe_samples)


def probe_due(probe: str | int | None, step: int) -> bool:
    """Whether a step-scheduled probe runs after ``step`` (``step >= 1``)."""
    return isinstance(probe, int) and not isinstance(probe, bool) and step > 0 and step % probe == 0


class ActivationStatisticCallback(LitActCallback):
    """Base class: subclasses set :attr:`statistic` and :attr:`history_statistic`, and implement
    :meth:`make_metrics` and :meth:`update`.

    Args:
        modules: module selector (:func:`lit_act.selection.select_sites`: a preset, glob(s), type(s) or predicate),
            or a ``{name: module}`` / ``{name: Site}`` dict; ``None`` = the preset :meth:`default_selection`.
        every_n_steps: observe the training batch at every ``every_n_steps``-th global step (``None``: never).
        on_validation: observe every validation batch and log at validation epoch end.
        on_test: the same for test epochs.
        figures: save the per-layer heatmap (and subclass figures) at train end.
        probe: probe-pass schedule: ``None``, ``"epoch"`` or every ``n`` steps.
        probe_samples: size of the probe set (first samples of the training split).
        adapter: batch / mask adapter (:class:`lit_act.batch.BatchAdapter`).

    Attributes (inspectable after ``fit``): ``selected`` (observed modules by name), ``metrics`` (stage -> module ->
    metrics), ``history_steps`` / ``history`` (:attr:`history_statistic` per module at each training/probe emission),
    ``last_logged`` (the last ``{key: value}`` logged).
    """

    statistic: ClassVar[str]
    history_statistic: ClassVar[str]

    def __init__(self, modules: ModuleSelector = None, every_n_steps: int | None = 50, on_validation: bool = True,
                 on_test: bool = False, figures: bool = True, probe: str | int | None = None,
                 probe_samples: int = DEFAULT_PROBE_SAMPLES, adapter: BatchAdapter | None = None) -> None:
        modules, every_n_steps = v.module_selector("modules", modules), validate_every_n("every_n_steps", every_n_steps)
        on_validation, on_test = v.boolean("on_validation", on_validation), v.boolean("on_test", on_test)
        probe, probe_samples = v.probe_schedule("probe", probe), v.positive_int("probe_samples", probe_samples)
        super().__init__(adapter, figures)
        validate_every_n("every_n_steps", every_n_steps)
        validate_probe(probe, probe_samples)
        if every_n_steps is None and not on_validation and not on_test and probe is None:
            raise ValueError(f"{type(self).__name__} would never collect: set every_n_steps, probe, "
                             "on_validation=True or on_test=True")
        self.modules = modules
        self.every_n_steps = every_n_steps
        self.on_validation = on_validation
        self.on_test = on_test
        self.probe = probe
        self.probe_samples = probe_samples
        self.selected: dict[str, Any] = {}
        self.metrics: dict[str, dict[str, dict[str, Metric]]] = {}  # stage -> module name -> metric name -> Metric
        self.history_steps: list[int] = []
        self.history: dict[str, list[float]] = {}  # module name -> history_statistic per training collection
        self._pending_states: dict[str, dict[str, dict[str, dict[str, Tensor]]]] = {}
        self._taps = ExitStack()
        self._collecting: str | None = None
        self._collect_step = 0
        self._mask: Tensor | None = None

    # ----------------------------------------------------------------------------------------- subclass interface
    def default_selection(self, pl_module: LightningModule) -> str:
        """The preset (:data:`lit_act.selection.PRESETS`) observed when ``modules=None`` (default
        ``"activations"``: every activation-function module)."""
        return "activations"

    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        """Fresh metrics for module ``name`` at its first observation ``x`` in ``stage``."""
        raise NotImplementedError

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        """Feed one observed output ``x`` (raw, as extracted by the tap; use :meth:`tokens` to drop padding)."""
        raise NotImplementedError

    def check_setup(self, pl_module: LightningModule) -> None:
        """Extra validation once modules are selected (raise with a fix in the message)."""

    def train_window_done(self, trainer: Trainer) -> bool:
        """Whether the training accumulators are computed, logged and reset after this observed batch."""
        return True

    @property
    def mask(self) -> Tensor | None:
        """The ``(B, T)`` token mask of the batch being observed (``None``: no padding)."""
        return self._mask

    def tokens(self, name: str, x: Tensor) -> Tensor:
        """``x`` restricted to the real tokens of the current batch (``(n_valid, ...)``), ``x`` without a mask."""
        return valid_tokens(name, x, self._mask)

    # ----------------------------------------------------------------------------------------------- lifecycle
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), every_n_steps=self.every_n_steps)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_uncompiled(pl_module, type(self).__name__)
        if isinstance(self.modules, dict):
            for value in self.modules.values():
                site_of(value)  # validates
            self.selected = dict(self.modules)
        else:  # {name: Site}: outputs, or inputs (down-projections of gated MLPs)
            self.selected = select_sites(pl_module, self.modules, default=self.default_selection(pl_module))
        self.check_setup(pl_module)
        self.warn_if_idle(trainer, stage)

    def warn_if_idle(self, trainer: Trainer, stage: str) -> None:
        """Warn when the configured run collects nothing (or almost nothing) with these schedules."""
        if trainer.fast_dev_run:
            return  # lit-act callbacks are off under fast_dev_run
        if stage == "fit":
            steps = planned_steps(trainer)
            collects = (self.every_n_steps is not None or self.probe is not None
                        or (self.on_validation and validation_enabled(trainer)))
            if not collects:
                self.warn("collects nothing in this fit: validation is off (limit_val_batches=0) and neither "
                          "every_n_steps nor probe is set")
            elif steps is not None and self.every_n_steps is not None and self.every_n_steps >= max(steps, 1) \
                    and self.every_n_steps > 1:
                self.warn(f"every_n_steps={self.every_n_steps} but the run plans {steps} steps: only step 0 is "
                          f"observed; lower every_n_steps")
            if steps is not None and isinstance(self.probe, int) and self.probe > steps:
                self.warn(f"probe={self.probe} but the run plans {steps} steps: no probe pass runs; use "
                          f"probe='epoch' or lower it")
        elif stage == "validate" and not validation_enabled(trainer):
            self.warn("collects nothing: trainer.validate runs with limit_val_batches=0")

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
            self._mask = self.adapter.mask(batch)
            self._start("train")

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._collecting == "train":
            self._stop()
            if self.train_window_done(trainer):
                self.emit(trainer, "train", self._collect_step)
        if probe_due(self.probe, trainer.global_step) and is_real_run(trainer):
            self.run_probe(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.probe == PROBE_EPOCH and is_real_run(trainer):
            self.run_probe(trainer, pl_module)

    def _collects_validation(self, trainer: Trainer) -> bool:
        return (self.on_validation or trainer.state.fn == "validate") and is_real_run(trainer)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collects_validation(trainer):
            self._start("val")

    @override
    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self._collecting == "val":
            self._mask = self.adapter.mask(batch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._collecting == "val":
            self._stop()
            self.emit(trainer, "val", trainer.global_step)

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (self.on_test or trainer.state.fn == "test") and is_real_run(trainer):
            self._start("test")

    @override
    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        if self._collecting == "test":
            self._mask = self.adapter.mask(batch)

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
    def run_probe(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """One probe pass (see the module docstring); computes, logs and resets the ``probe`` stage."""
        self._start("probe")
        try:
            with self.quiet_pass(pl_module, observe=True), torch.no_grad():
                for batch in probe_batches(trainer, self.probe_samples, pl_module.device):
                    self._mask = self.adapter.mask(batch)
                    self.adapter.forward(pl_module, batch)
        finally:
            self._stop()
        return self.emit(trainer, "probe", trainer.global_step)

    def _start(self, stage: str) -> None:
        self._stop()
        self._taps.enter_context(tap(self.selected, lambda name, module, x: self._observe(stage, name, module, x),
                                     owner=self))
        self._collecting = stage

    def _stop(self) -> None:
        self._taps.close()
        self._collecting = None
        clear_token_cache()  # free the shared x[mask] copy of the last observed output

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
                assign_states(metrics[key], states)
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
        """Compute, log (loggers and ``trainer.callback_metrics``) and reset ``stage``'s accumulators; returns the
        logged ``{key: value}``."""
        per_module = self.compute(stage)
        for metrics in self.metrics.get(stage, {}).values():
            for metric in metrics.values():
                metric.reset()
        if not per_module:
            return {}
        keys, values = [], []
        for name, stats in per_module.items():
            for stat, value in stats.items():
                keys.append(metric_key(stage, self.statistic, name, nonfinite=True) if stat == "nonfinite"
                            else metric_key(stage, stat, name))
                values.append(value.float())
        for stat in next(iter(per_module.values())):
            if stat != "nonfinite" and not stat.endswith(_PER_POSITION_SUFFIXES):
                keys.append(metric_key(stage, stat, "mean"))
                values.append(torch.stack([s[stat].float() for s in per_module.values()]).nanmean())
        logged = dict(zip(keys, torch.stack(values).tolist(), strict=True))
        self._warn_nonfinite(stage, logged)
        if stage in ("train", "probe"):
            self.history_steps.append(step)
            for name in per_module:
                self.history.setdefault(name, []).append(logged[metric_key(stage, self.history_statistic, name)])
        return self.log_metrics(trainer, logged, step)

    def _warn_nonfinite(self, stage: str, logged: dict[str, float]) -> None:
        bad = {k: int(v) for k, v in logged.items() if k.endswith("/nonfinite") and v > 0}
        if bad:
            self.warn(f"NaN/Inf activations were excluded from the {stage} statistics (counts: {bad})")

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
        self.save_figure(trainer, fig, f"{self.history_statistic}_per_layer")

    # ---------------------------------------------------------------------------------------------------- resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """Metric states reduced over DDP ranks (the checkpoint, written by rank 0, holds every rank's data) and the
        per-collection history."""
        states = {stage: {name: {key: reduced_states(m) for key, m in metrics.items()}
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
        self._pending_states = state_dict["metric_states"] if rank() == 0 else {}
        for stage, by_name in self._pending_states.items():
            for name, by_key in by_name.items():
                for key, states in by_key.items():
                    metric = self.metrics.get(stage, {}).get(name, {}).get(key)
                    if metric is not None:
                        assign_states(metric, states)
