"""Fixed-bin activation histograms as W&B histograms and a PNG per collection schedule."""

from __future__ import annotations

import os

import numpy as np
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import DEFAULT_PROBE_SAMPLES, ActivationStatisticCallback
from lit_act.stats.histogram import ActivationHistogramMetric
from lit_act.stats.tap import ModuleSelector
from lit_act.utils import validate as v


class ActivationHistograms(ActivationStatisticCallback):
    """Histograms of every selected module's output in ``bins`` fixed bins on ``[low, high)`` (default: every
    activation-function module), one observed training batch every ``every_n_steps`` steps (and whole validation /
    test epochs when asked). Memory is ``bins`` counts per module, whatever the data size.

    Logged keys (``{stage}`` = ``train``/``val``/``test``, ``{module}`` as in ``named_modules()``):

    * ``{stage}/hist_outside/{module}`` (and ``/mean``): fraction of finite entries outside ``[low, high)``;
    * ``{stage}/histogram/{module}/nonfinite``: NaN/Inf entries (never binned);
    * ``{stage}/histogram/{module}``: a ``wandb.Histogram(np_histogram=(counts, edges))``, to W&B loggers only.

    Figure at train end: ``figures/activation_histograms.png`` (the last training collection of every module) and
    ``figures/hist_outside_per_layer.png``.

    The default selection stays ``"activations"`` on every model (also on transformers, where the statistics callbacks
    observe ``"mlp_hidden"``): a histogram is read as the distribution of an activation function's outputs, the
    shape a learnable or swapped activation produces; pass ``modules="mlp_hidden"`` for the down-projection inputs
    (a gated MLP's ``act(gate) * up``).

    Args:
        modules: module selector (:func:`lit_act.selection.select_sites`; default: every activation module).
        bins, low, high: the fixed bins.
        every_n_steps, on_validation, on_test, figures, probe, probe_samples, adapter: as in
            :class:`~lit_act.callbacks.base.ActivationStatisticCallback` (padding is never binned).
    """

    statistic = "histogram"
    history_statistic = "hist_outside"

    def __init__(self, modules: ModuleSelector = None, bins: int = 64, low: float = -5.0, high: float = 5.0,
                 every_n_steps: int | None = 100, on_validation: bool = False, on_test: bool = False,
                 figures: bool = True, probe: str | int | None = None, probe_samples: int = DEFAULT_PROBE_SAMPLES,
                 adapter: BatchAdapter | None = None) -> None:
        bins = v.positive_int("bins", bins, high=v.MAX_BINS)  # before any allocation
        low, high = v.finite_float("low", low), v.finite_float("high", high)
        if not low < high:
            raise v.ConfigError(f"high={high!r}: expected a finite number > low={low!r}")
        super().__init__(modules, every_n_steps, on_validation, on_test, figures, probe, probe_samples, adapter)
        ActivationHistogramMetric(bins, low, high)  # validates the bins
        self.bins, self.low, self.high = bins, low, high
        self.last_histograms: dict[str, dict[str, np.ndarray]] = {}  # stage -> module -> counts of the last emission

    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        return {"histogram": ActivationHistogramMetric(self.bins, self.low, self.high)}

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        metrics["histogram"].update(self.tokens(name, x))

    def emit(self, trainer: Trainer, stage: str, step: int) -> dict[str, float]:
        histograms = {}
        for name, metrics in self.metrics.get(stage, {}).items():
            metric = metrics["histogram"]
            metric.sync()  # sum over DDP ranks (no-op otherwise)
            histograms[name] = metric.counts.cpu().numpy().copy()
            metric.unsync(should_unsync=metric._is_synced)
        self.last_histograms[stage] = histograms
        self._log_wandb_histograms(trainer, stage, histograms, step)
        return super().emit(trainer, stage, step)

    @rank_zero_only
    def _log_wandb_histograms(self, trainer: Trainer, stage: str, histograms: dict[str, np.ndarray],
                              step: int) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers or not histograms or os.environ.get("WANDB_MODE") == "disabled":
            return
        import wandb

        edges = np.linspace(self.low, self.high, self.bins + 1)
        payload = {f"{stage}/histogram/{name}": wandb.Histogram(np_histogram=(counts, edges))
                   for name, counts in histograms.items()}
        for logger in loggers:
            logger.experiment.log({**payload, "trainer/global_step": step})

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.figures and self.last_histograms.get("train") and trainer.is_global_zero:
            self.save_histogram_figure(trainer, self.last_histograms["train"])

    def save_histogram_figure(self, trainer: Trainer, histograms: dict[str, np.ndarray]) -> None:
        """One panel per module: fraction of entries per bin (log scale)."""
        import matplotlib.pyplot as plt

        edges = np.linspace(self.low, self.high, self.bins + 1)
        fig, axes = plt.subplots(len(histograms), 1, figsize=(6, 1.6 * len(histograms) + 0.6), squeeze=False,
                                 sharex=True)
        for ax, (name, counts) in zip(axes[:, 0], histograms.items()):
            ax.stairs(counts / max(counts.sum(), 1), edges, fill=True)
            ax.set_yscale("log")
            ax.set_ylabel("fraction")
            ax.set_title(name, fontsize=9)
        axes[-1, 0].set_xlabel("activation value")
        fig.suptitle(f"activation histograms, step {self.history_steps[-1] if self.history_steps else 0}")
        fig.tight_layout()
        self.save_figure(trainer, fig, "activation_histograms")
