"""MassiveActivations: top-k / median / ratio / criterion count of residual-stream magnitudes per layer, and the
emergence-curve fit of the ratio over training."""

from __future__ import annotations

import math

from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import DEFAULT_PROBE_SAMPLES, ActivationStatisticCallback
from lit_act.selection import residual_stream
from lit_act.stats.emergence import _MIN_POINTS, EmergenceFit, fit_emergence
from lit_act.stats.massive import MassiveActivationMetric
from lit_act.stats.tap import ModuleSelector, check_mask
from lit_act.utils import validate as v


def residual_stream_modules(pl_module: nn.Module) -> list[str]:
    """The block names of every repeated-block stack (:func:`lit_act.selection.residual_stream`: ``blocks.0``,
    ``blocks.1``, ..., encoder and decoder layers alike): the block outputs, i.e. the residual stream; raises
    ``ValueError`` with the fix when the model has none."""
    return residual_stream(pl_module)


class MassiveActivations(ActivationStatisticCallback):
    """Massive activations (Sun et al. 2024; :mod:`lit_act.stats.massive`) on block outputs, by default the blocks of
    every repeated-block stack (:func:`lit_act.selection.residual_stream`: ``blocks.N``, ``transformer.h.N``, ...), and
    the emergence curve of the top-1/median ratio over training ("Hidden Dynamics of Massive Activations";
    :mod:`lit_act.stats.emergence`).

    Statistics are Sun et al.'s per-sequence ones (``main_llm.py``: per sequence the top-k of ``|h|`` over (token,
    dim) and the median, then the mean over sequences), over one observed training batch, or a whole validation/test
    epoch; a batch and an epoch estimate the same numbers. Logged keys (``{stage}`` = ``train``/``val``/``test``,
    ``{module}`` as in ``named_modules()``; all but positions, frequencies and ``nonfinite`` also as
    ``{stage}/<statistic>/mean`` over modules, NaN layers left out):

    * ``{stage}/massive_top{i}/{module}`` (i = 1..k): the i-th largest ``|h|`` of each sequence, averaged over
      sequences;
    * ``{stage}/massive_top{i}_token/{module}``, ``..._dim/{module}``, ``..._freq/{module}``: the (token, dim) most
      often the i-th largest entry of a sequence, and the fraction of sequences in which it is;
    * ``{stage}/massive_max{i}/{module}``, ``..._token``, ``..._dim``: the running top-k of ``|h|`` over every entry
      seen (grows with the data; not the paper's statistic), with its position;
    * ``{stage}/massive_median/{module}``: per-sequence median ``|h|``, averaged over sequences;
    * ``{stage}/massive_ratio/{module}``: top-1 / median;
    * ``{stage}/massive_count/{module}``: entries with ``|h| > magnitude`` and ``|h| >= median_ratio x`` their
      sequence's median;
    * ``{stage}/massive/{module}/nonfinite``: NaN/Inf entries (excluded); a layer with no finite entry logs NaN for
      every statistic, positions included;
    * at train end, per module with at least 5 training collections: ``train/emergence_{p}/{module}`` for
      ``p`` in ``A, lambda, gamma, t0, K, r2, peak_step`` (fit of ``massive_ratio`` vs step).

    Figures at train end: ``figures/massive_ratio_per_layer.png`` (ratio per layer vs step) and
    ``figures/massive_emergence.png`` (ratios with fitted curves).

    Args:
        modules: selector (default: :func:`residual_stream_modules`).
        k: number of top magnitudes (>= 1).
        magnitude, median_ratio: the massive-activation criterion (100 and 1000 in the paper).
        capacity: positions tracked per rank i for ``massive_top{i}_token/_dim/_freq`` (exact while at most this many
            distinct positions held rank i; :class:`~lit_act.stats.massive.MassiveActivationMetric`).
        every_n_steps: observe one training batch every ``every_n_steps`` steps (``None``: never).
        on_validation, on_test: observe whole validation / test epochs.
        fit_emergence: fit the emergence curve at train end.
        figures: save the figures at train end.
        probe, probe_samples, adapter: probe-pass schedule, probe-set size and batch adapter
            (:class:`~lit_act.callbacks.base.ActivationStatisticCallback`); padding (the adapter's token mask) is
            excluded from every statistic, medians included.
    """

    statistic = "massive"
    history_statistic = "massive_ratio"

    def __init__(self, modules: ModuleSelector = None, k: int = 3, magnitude: float = 100.0,
                 median_ratio: float = 1000.0, capacity: int = 64, every_n_steps: int | None = 50,
                 on_validation: bool = False,
                 on_test: bool = False, fit_emergence: bool = True, figures: bool = True,
                 probe: str | int | None = None, probe_samples: int = DEFAULT_PROBE_SAMPLES,
                 adapter: BatchAdapter | None = None) -> None:
        k, fit_emergence = v.positive_int("k", k), v.boolean("fit_emergence", fit_emergence)
        magnitude = v.positive_float("magnitude", magnitude)
        median_ratio = v.positive_float("median_ratio", median_ratio)
        capacity = v.positive_int("capacity", capacity)
        super().__init__(modules, every_n_steps, on_validation, on_test, figures, probe, probe_samples, adapter)
        MassiveActivationMetric(k, magnitude, median_ratio, capacity)  # validates the arguments
        self.k, self.magnitude, self.median_ratio, self.capacity = k, magnitude, median_ratio, capacity
        self.fit_emergence = fit_emergence
        self.emergence: dict[str, EmergenceFit] = {}

    def default_selection(self, pl_module: LightningModule) -> str:
        return "residual_stream"

    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        return {"massive": _PrefixedMassiveMetric(self.k, self.magnitude, self.median_ratio, self.capacity)}

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        mask = self.mask
        if mask is not None:
            check_mask(name, x, mask)
            mask = mask.to(x.device)
            # (B, T) token mask on (B, T, ..., D) hidden states: the metric wants x.shape[:-1]
            mask = mask.reshape(*mask.shape, *([1] * (x.dim() - 1 - mask.dim()))).expand(x.shape[:-1])
        metrics["massive"].update(x, mask)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.fit_emergence and len(self.history_steps) >= _MIN_POINTS:
            self.fit_and_log_emergence(trainer)

    def fit_and_log_emergence(self, trainer: Trainer) -> dict[str, EmergenceFit]:
        """Fit every module's ratio history, log ``train/emergence_*`` and save the figure."""
        self.emergence = {}
        for name, ratios in self.history.items():
            try:
                self.emergence[name] = fit_emergence(self.history_steps, ratios)
            except (RuntimeError, ValueError) as err:
                rank_zero_warn(f"MassiveActivations: emergence fit failed for {name!r}: {err}")
        logged = {f"train/emergence_{p}/{name}": v for name, fit in self.emergence.items()
                  for p, v in fit.as_dict().items() if not math.isnan(v)}
        if logged:
            self.log_metrics(trainer, logged, trainer.global_step)
        if self.figures and self.emergence:
            self._save_emergence_figure(trainer)
        return self.emergence

    def _save_emergence_figure(self, trainer: Trainer) -> None:
        import matplotlib.pyplot as plt
        import numpy as np

        fig, ax = plt.subplots(figsize=(7, 4))
        grid = np.linspace(min(self.history_steps), max(self.history_steps), 200)
        for name, fit in self.emergence.items():
            points = ax.plot(self.history_steps, self.history[name], "o", ms=3, label=f"{name} (R2={fit.r2:.3f})")
            ax.plot(grid, fit(grid), "-", color=points[0].get_color())
        ax.set_xlabel("training step")
        ax.set_ylabel("max|h| / median|h|")
        ax.set_title("massive-activation emergence")
        ax.legend(fontsize=7)
        self.save_figure(trainer, fig, "massive_emergence")


class _PrefixedMassiveMetric(MassiveActivationMetric):
    """:class:`MassiveActivationMetric` whose statistic names carry the ``massive_`` prefix (``nonfinite`` kept)."""

    def compute(self) -> dict[str, Tensor]:
        return {(k if k == "nonfinite" else f"massive_{k}"): v for k, v in super().compute().items()}
