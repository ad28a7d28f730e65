"""DeadNeurons: fraction of neurons that never fire on a fixed probe set (or over a window of training data), per
layer."""

from __future__ import annotations

from typing import Any

from lightning import LightningModule, Trainer
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import PROBE_EPOCH, ActivationStatisticCallback
from lit_act.selection import default_preset
from lit_act.stats.dead import DeadNeuronMetric
from lit_act.stats.tap import ModuleSelector, neuron_view
from lit_act.utils import validate as v
from lit_act.utils.schedule import validate_every_n


class DeadNeurons(ActivationStatisticCallback):
    """Dead neurons (Voita et al. 2023; :mod:`lit_act.stats.dead`) of every selected site (default
    :func:`lit_act.selection.default_preset`: ``"mlp_hidden"`` on transformer-like models, the neurons feeding each
    MLP's down-projection, the input of ``down_proj`` for gated MLPs; every activation module otherwise; neurons =
    last dim, conv channels = dim 1, see :func:`~lit_act.stats.tap.neuron_view`).

    **When a neuron fires** (``mode``, ``threshold``; the same definition as :class:`ActivationSparsity`):

    =====================  ==========================================  ==========================================
    activation family      default here: ``mode="signed"``, 0          alternative
    =====================  ==========================================  ==========================================
    ReLU, ReLU^2, hard     fires iff ``a > 0`` (Voita et al.)          ``"abs"`` agrees at threshold 0
    GELU, SiLU, smooth     fires iff ``a > 0`` (negative lobe = off)   ``"abs"`` with ``threshold > 0``: magnitude
    gated (SwiGLU, GeGLU)  fires iff ``act(gate) * up > 0``            ``mode="abs"``: ``|a| > threshold`` (the
                                                                       product is signed; use this one)
    =====================  ==========================================  ==========================================

    **Default: probe passes** (Voita et al.'s definition: a neuron is dead when it never fires on a *fixed* model over
    a large dataset). At every training epoch end (``probe="epoch"``, or every ``n`` steps with ``probe=n``) the
    current model runs in eval mode over the first ``probe_samples`` training samples, and a neuron is dead when it
    never exceeds ``threshold`` on any of their real tokens. Logged as ``probe/...``.

    **Running-window mode** (``every_n_steps`` or ``window_steps`` set): counts over the training batches of a window
    while the weights move, by default one training epoch (decided at epoch end), or ``window_steps`` steps; with
    ``every_n_steps > 1`` only every n-th batch is observed (a neuron firing only on skipped batches counts as dead).
    Logged as ``train/...`` at the step the window started. Counts are summed over DDP ranks before the decision.
    ``on_validation``/``on_test`` give the same over each epoch of that stage (validation is always collected under
    ``trainer.validate``).

    Logged keys (``{stage}`` = ``probe``/``train``/``val``/``test``; each also as ``{stage}/<statistic>/mean``):

    * ``{stage}/dead_fraction/{module}``: dead neurons / neurons;
    * ``{stage}/living_activation_frequency/{module}``: mean over living neurons of the fraction of samples on which
      each fires;
    * ``{stage}/dead/{module}/nonfinite``: NaN/Inf entries (excluded from the counts).

    Padding (the adapter's token mask, default ``batch["attention_mask"]``) is excluded. Figure at train end:
    ``figures/dead_fraction_per_layer.png`` (dead fraction per module vs probe / window).

    Args:
        modules: module selector (default: every activation module).
        threshold: a neuron fires when its activation is ``> threshold`` (default 0).
        mode: ``"signed"`` (default: fires iff ``a > threshold``) or ``"abs"`` (fires iff ``|a| > threshold``).
        window_steps: running mode: window length in training steps (``None``: one epoch).
        every_n_steps: running mode: observe every n-th training batch of the window (``None``: off, unless
            ``window_steps`` is set, then 1).
        on_validation, on_test: also count over whole validation / test epochs.
        neuron_dim: override the neuron dimension.
        figures: save the per-layer heatmap at train end.
        probe: ``"auto"`` (default: ``"epoch"`` unless the running mode is chosen, then ``None``), ``None``,
            ``"epoch"`` or every ``n`` steps.
        probe_samples: probe-set size (default 1024 samples).
        adapter: batch adapter (:class:`lit_act.batch.BatchAdapter`).
    """

    statistic = "dead"
    history_statistic = "dead_fraction"

    def __init__(self, modules: ModuleSelector = None, threshold: float = 0.0, mode: str = "signed",
                 window_steps: int | None = None,
                 every_n_steps: int | None = None, on_validation: bool = False, on_test: bool = False,
                 neuron_dim: int | None = None, figures: bool = True, probe: str | int | None = "auto",
                 probe_samples: int = 1024, adapter: BatchAdapter | None = None) -> None:
        threshold, neuron_dim = v.finite_float("threshold", threshold), v.optional(v.integer, "neuron_dim", neuron_dim)
        window_steps = validate_every_n("window_steps", window_steps)
        every_n_steps = validate_every_n("every_n_steps", every_n_steps)
        probe = v.probe_schedule("probe", probe, ("auto", "epoch"))
        validate_every_n("window_steps", window_steps)
        if window_steps is not None and every_n_steps is None:
            every_n_steps = 1
        if probe == "auto":
            probe = PROBE_EPOCH if every_n_steps is None else None
        super().__init__(modules, every_n_steps, on_validation, on_test, figures, probe, probe_samples, adapter)
        if window_steps is not None and every_n_steps is not None and window_steps < every_n_steps:
            raise ValueError(f"window_steps ({window_steps}) must be >= every_n_steps ({every_n_steps}) so a window "
                             "observes at least one batch")
        DeadNeuronMetric(1, threshold, mode)  # validates threshold and mode
        self.threshold = float(threshold)
        self.mode = mode
        self.window_steps = window_steps
        self.neuron_dim = neuron_dim
        self.window_start: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), every_n_steps=self.every_n_steps,
                                        window_steps=self.window_steps, threshold=self.threshold, mode=self.mode)

    def default_selection(self, pl_module: LightningModule) -> str:
        """:func:`lit_act.selection.default_preset`: ``"mlp_hidden"`` on transformer-like models (the tensor entering
        each MLP's down-projection), ``"activations"`` otherwise."""
        return default_preset(pl_module)

    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        return {"dead": DeadNeuronMetric(neuron_view(x, module, self.neuron_dim).shape[1], self.threshold,
                                         self.mode)}

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        metrics["dead"].update(neuron_view(self.tokens(name, x), module, self.neuron_dim))

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self._collecting == "train" and self.window_start is None:
            self.window_start = trainer.global_step

    def train_window_done(self, trainer: Trainer) -> bool:
        return self.window_steps is not None and trainer.global_step - self.window_start >= self.window_steps

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._collect_step = self.window_start if self.window_start is not None else trainer.global_step
        done = self._collecting == "train" and self.train_window_done(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if done:
            self.window_start = None

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.window_steps is None and self.window_start is not None:
            self.emit(trainer, "train", self.window_start)
            self.window_start = None
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return super().state_dict() | {"window_start": self.window_start}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.window_start = state_dict["window_start"]
