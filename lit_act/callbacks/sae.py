"""SparseAutoencoderTrainer: train one sparse autoencoder per selected site online, from the activations of the
training batches, without touching the main model's graph, optimiser or RNG.

Built on the callback core: the collector :class:`~lit_act.callbacks.base.ActivationStatisticCallback` (schedules,
owned taps, token masks, emission to loggers and ``trainer.callback_metrics``, resume of metric states) and
:meth:`~lit_act.callbacks.core.LitActCallback.quiet_pass` for the loss-recovered passes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import ActivationStatisticCallback
from lit_act.sae.buffer import ActivationBuffer
from lit_act.sae.metrics import AdapterLoss, SAEMetrics, decoder_epsilon, density_bin_edges, loss_recovered
from lit_act.sae.training import SAEConfig, SAETrainer
from lit_act.selection import default_preset
from lit_act.stats.tap import ModuleSelector, neuron_view
from lit_act.utils import validate as v
from lit_act.utils.schedule import due, is_real_run

_SCALARS = ("fvu", "l0", "afa_error", "never_fired_fraction")
_LOSSES = ("loss_clean", "loss_sae", "loss_zero")


class SparseAutoencoderTrainer(ActivationStatisticCallback):
    """Train an SAE (:mod:`lit_act.sae`) on each selected site's activations while the model trains.

    **Sites** (:func:`lit_act.selection.select_sites`): a preset (``"mlp_hidden"``: the input of every MLP's
    down-projection, also LLaMA's gated ``act_fn(gate) * up``; ``"residual_stream"``; ``"activations"``), globs,
    types, predicates or a ``{name: module | Site}`` dict; ``None``: :func:`~lit_act.selection.default_preset`
    (``mlp_hidden`` for transformers, else every activation module).

    **Collection.** At every ``every_n_steps``-th training step from ``start_step`` on (not in the sanity check or
    ``fast_dev_run``) each site's tensor is detached, restricted to the real tokens of the adapter's token mask
    (``adapter.mask``, default ``batch["attention_mask"]``; :func:`~lit_act.stats.tap.valid_tokens`), flattened to
    ``(tokens, d_in)`` rows (:func:`~lit_act.stats.tap.neuron_view`), stripped of NaN/Inf rows (counted, logged as
    ``{stage}/sae/{module}/nonfinite``) and added to a per-site ring buffer of ``buffer_tokens`` rows
    (:class:`~lit_act.sae.buffer.ActivationBuffer`).

    **SAE steps.** After the batch, each SAE takes ``new tokens // batch_size`` Adam steps (the remainder carries over)
    on random buffer batches (:class:`~lit_act.sae.training.SAETrainer`: decoder-norm constraint, AuxK), on the model's
    device, with autocast off and gradients enabled only for the SAE. Under DDP each rank feeds its own activations,
    the number of steps is the minimum over ranks and SAE gradients are summed, so every rank holds the same SAE.
    The SAE initialisation and buffer sampling use private generators: the global (CPU/CUDA) RNG, the model's graph
    and optimiser are untouched.

    **Metrics** (``{stage}/sae/{metric}/{module}`` and ``{stage}/sae/{metric}/mean``, through
    :meth:`~lit_act.callbacks.core.LitActCallback.log_metrics`: every logger and ``trainer.callback_metrics``):
    ``fvu``, ``l0``, ``afa_error``, ``never_fired_fraction`` (:class:`~lit_act.sae.metrics.SAEMetrics`, training:
    over the SAE batches since the last log, each measured in its step's forward before the update; validation /
    test: over the epoch), ``dead_fraction`` (no activation in the last ``dead_tokens`` training tokens),
    ``epsilon_max``/``epsilon_mean`` (decoder quasi-orthogonality); training also logs the loss parts ``mse``,
    ``auxk`` (or ``l1``) and ``tokens``; validation logs ``loss_recovered``, ``loss_clean``, ``loss_sae``,
    ``loss_zero``: the site's tensor replaced by the reconstruction / zeros on the first ``loss_recovered_batches``
    validation batches (:func:`~lit_act.sae.metrics.loss_recovered`), in a
    :meth:`~lit_act.callbacks.core.LitActCallback.quiet_pass` so no other callback observes these passes.
    The log10 feature-density histogram of each emission goes to W&B loggers as ``{stage}/sae/density/{module}``
    (``wandb.Histogram``). Training metrics are logged every ``log_every_n_steps`` steps. Figures at train end:
    ``figures/sae_density_{module}.png`` (density histogram of the last validation epoch, else of the last training
    window) and ``figures/sae_fvu_per_layer.png`` (training FVU per site over steps). FVU against L0 across a sweep:
    ``lit-act report <multirun dir>`` (``figures/sae_fvu_vs_l0.png``).

    **Checkpoint.** ``state_dict`` holds, per site, the SAE weights, its Adam state, the dead-latent counters, the
    carried-over token count and the buffer's counters and generator, plus the metric windows (reduced over DDP
    ranks); the buffered activations are dropped (a resumed run refills the buffer from its next batches). The SAEs
    are also reachable as ``callback.saes``.

    Example::

        trainer = Trainer(callbacks=[SparseAutoencoderTrainer(modules="mlp_hidden", sae="topk", d_latent=1024, k=32,
                                                              buffer_tokens=65536)])

    Args:
        modules: site selector (see above).
        sae: SAE name (``topk``, ``batchtopk``, ``relu``, ``topafa``).
        d_latent, k, lr, batch_size, dead_tokens, auxk_coefficient, l1_coefficient, seed: :class:`SAEConfig`.
        every_n_steps: collect the training batch at every n-th global step.
        start_step: first global step collected (let the model train first: SAEs of a settled model).
        buffer_tokens: per-site buffer capacity in tokens (>= ``batch_size``).
        log_every_n_steps: log the training metrics every n-th global step.
        on_validation: evaluate the SAEs on every validation batch (always under ``trainer.validate``).
        on_test: evaluate the SAEs on every test batch.
        loss_recovered_batches: validation batches on which the downstream loss is spliced (0: off).
        loss_fn: ``(model, batch) -> loss`` for the loss recovered (default: :class:`lit_act.sae.metrics.AdapterLoss`
            of ``adapter``: the output's loss, else ``model.loss(logits, targets)``, else cross-entropy).
        figures: save the figures at train end.
        adapter: batch adapter (:class:`lit_act.batch.BatchAdapter`: forward, token mask, logits, loss).
    """

    statistic = "sae"
    history_statistic = "sae/fvu"

    def __init__(self, modules: ModuleSelector = None, sae: str = "topk", d_latent: int = 1024, k: int = 32,
                 every_n_steps: int = 1, buffer_tokens: int = 65536, batch_size: int = 1024, lr: float = 3e-4,
                 dead_tokens: int = 1_000_000, auxk_coefficient: float = 1 / 32, l1_coefficient: float = 1e-3,
                 seed: int = 0, start_step: int = 0, log_every_n_steps: int = 50, on_validation: bool = True,
                 on_test: bool = False, loss_recovered_batches: int = 4,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, figures: bool = True,
                 adapter: BatchAdapter | None = None) -> None:
        modules, every_n_steps = v.module_selector("modules", modules), v.positive_int("every_n_steps", every_n_steps)
        d_latent, k = v.positive_int("d_latent", d_latent), v.positive_int("k", k)
        buffer_tokens = v.positive_int("buffer_tokens", buffer_tokens)
        batch_size, lr = v.positive_int("batch_size", batch_size), v.positive_float("lr", lr)
        dead_tokens, seed = v.positive_int("dead_tokens", dead_tokens), v.integer("seed", seed)
        auxk_coefficient = v.finite_float("auxk_coefficient", auxk_coefficient, low=0.0)
        l1_coefficient = v.finite_float("l1_coefficient", l1_coefficient, low=0.0)
        start_step = v.non_negative_int("start_step", start_step)
        log_every_n_steps = v.positive_int("log_every_n_steps", log_every_n_steps)
        loss_recovered_batches = v.non_negative_int("loss_recovered_batches", loss_recovered_batches)
        on_validation, figures = v.boolean("on_validation", on_validation), v.boolean("figures", figures)
        loss_fn = v.callable_or_none("loss_fn", loss_fn)
        on_test = v.boolean("on_test", on_test)
        super().__init__(modules, every_n_steps, on_validation, on_test, figures, adapter=adapter)
        self.config = SAEConfig(sae=sae, d_latent=d_latent, k=k, lr=lr, batch_size=batch_size,
                                dead_tokens=dead_tokens, auxk_coefficient=auxk_coefficient,
                                l1_coefficient=l1_coefficient, seed=seed)
        ActivationBuffer(1, buffer_tokens, batch_size)  # validates buffer_tokens >= batch_size now
        self.start_step = start_step
        self.buffer_tokens = buffer_tokens
        self.log_every_n_steps = log_every_n_steps
        self.loss_recovered_batches = loss_recovered_batches
        self.loss_fn = loss_fn or AdapterLoss(self.adapter)
        self.trainers: dict[str, SAETrainer] = {}
        self.buffers: dict[str, ActivationBuffer] = {}
        self.pending_tokens: dict[str, int] = {}
        self.loss_parts: dict[str, dict[str, Tensor]] = {}
        self.recovered: dict[str, dict[str, Tensor]] = {}
        self.nonfinite: dict[str, dict[str, int]] = {}  # stage -> site -> NaN/Inf rows since the last emission
        self.last_density: dict[str, dict[str, Tensor]] = {}  # stage -> site -> density histogram
        self._emitted_density: dict[str, Tensor] = {}
        self._loaded: dict[str, Any] = {}
        self._loss_fn_failed = False

    @property
    def saes(self) -> dict[str, nn.Module]:
        """The trained SAEs by site name."""
        return {name: t.sae for name, t in self.trainers.items()}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), sae=self.config.sae,
                                        d_latent=self.config.d_latent, k=self.config.k)

    # ------------------------------------------------------------------------------------------------ lifecycle
    def default_selection(self, pl_module: LightningModule) -> str:
        """``"mlp_hidden"`` on transformer-like models (what feeds each MLP's down-projection), else every activation
        module (:func:`lit_act.selection.default_preset`)."""
        return default_preset(pl_module)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step >= self.start_step:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._collecting != "train":
            return
        self._stop()
        for name, sae_trainer in self.trainers.items():
            self._train(name, sae_trainer)
        if due(trainer.global_step, self.log_every_n_steps) and self._trained("train"):
            self.emit(trainer, "train", trainer.global_step)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.recovered = {}
        super().on_validation_epoch_start(trainer, pl_module)

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (self._collecting == "val" and self.trainers and batch_idx < self.loss_recovered_batches
                and dataloader_idx == 0 and not self._loss_fn_failed):
            self._splice_losses(pl_module, batch)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._trained("train"):  # the last, partial logging window
            self.emit(trainer, "train", trainer.global_step)
        super().on_train_end(trainer, pl_module)
        if self.figures and self.last_density and is_real_run(trainer):
            self._save_density_figures(trainer)

    # ------------------------------------------------------------------------------------------------ collecting
    def _trained(self, stage: str) -> bool:
        """Whether an SAE metric of ``stage`` has data since the last emission (the buffers fill before steps)."""
        return any(m["sae"].update_called for m in self.metrics.get(stage, {}).values())

    def _rows(self, name: str, module: nn.Module, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"SparseAutoencoderTrainer: module {name!r} returned a {x.dtype} tensor; SAEs need a "
                            "floating-point activation, select another module with modules=")
        return neuron_view(self.tokens(name, x.detach()), module).float()

    @override
    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        return {"sae": SAEMetrics(self._rows(name, module, x).shape[1], self.config.d_latent)}

    @override
    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        rows = self._rows(name, module, x)
        if stage == "train":
            if name not in self.trainers:
                self._create_sae(name, rows)
            buffer = self.buffers[name]
            dropped = buffer.nonfinite_rows
            stored = buffer.add(rows)
            self._count_nonfinite(stage, name, buffer.nonfinite_rows - dropped)
            self.pending_tokens[name] = self.pending_tokens.get(name, 0) + stored
        elif name in self.trainers:
            finite = torch.isfinite(rows).all(dim=1)
            self._count_nonfinite(stage, name, int((~finite).sum()))
            self._evaluate(metrics["sae"], self.trainers[name].sae, rows[finite])

    def _count_nonfinite(self, stage: str, name: str, rows: int) -> None:
        counts = self.nonfinite.setdefault(stage, {})
        counts[name] = counts.get(name, 0) + rows

    def _create_sae(self, name: str, rows: Tensor) -> None:
        sae_trainer = SAETrainer(rows.shape[1], self.config, device=rows.device)
        buffer = ActivationBuffer(rows.shape[1], self.buffer_tokens, self.config.batch_size,
                                  seed=self.config.seed + len(self.trainers) + 1)
        state = self._loaded.pop(name, None)
        if state is not None:
            sae_trainer.load_state_dict(state["trainer"])
            buffer.load_state_dict(state["buffer"])
            self.pending_tokens[name] = int(state["pending_tokens"])
        self.trainers[name], self.buffers[name] = sae_trainer, buffer

    def _train(self, name: str, sae_trainer: SAETrainer) -> None:
        buffer = self.buffers[name]
        steps = self.pending_tokens.get(name, 0) // self.config.batch_size if buffer.ready else 0
        device = sae_trainer.tokens_since_fired.device
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor(steps, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            steps = int(agreed)
        metrics = self.metrics["train"][name]["sae"]
        with torch.autocast(device.type, enabled=False):
            for _ in range(steps):
                x = buffer.sample()
                parts = sae_trainer.step(x)
                out = sae_trainer.last_output  # the step's own forward: no second pass
                metrics.update(x, out.x_hat, out.z, sae_trainer.sae.b_pre, sae_trainer.sae.input_scale)
                self.loss_parts[name] = parts
        self.pending_tokens[name] = self.pending_tokens.get(name, 0) - steps * self.config.batch_size

    @staticmethod
    def _evaluate(metrics: SAEMetrics, sae: nn.Module, rows: Tensor) -> None:
        was_training = sae.training
        sae.eval()
        try:
            out = sae(rows)
        finally:
            sae.train(was_training)
        metrics.update(rows, out.x_hat, out.z, sae.b_pre, sae.input_scale)

    def _splice_losses(self, pl_module: LightningModule, batch: Any) -> None:
        try:
            with self.quiet_pass(pl_module), torch.no_grad():
                for name, sae_trainer in self.trainers.items():
                    result = loss_recovered(pl_module, self.selected[name], sae_trainer.sae, [batch], self.loss_fn)
                    acc = self.recovered.setdefault(name, {})
                    for key in _LOSSES:
                        acc[key] = acc.get(key, 0) + result[key].detach()
                    acc["batches"] = acc.get("batches", 0) + 1
        except (TypeError, AttributeError, ValueError) as err:
            self._loss_fn_failed = True
            self.warn(f"loss recovered is off, the model's loss could not be computed on a validation batch "
                      f"({err}); pass loss_fn=(model, batch) -> loss or adapter=BatchAdapter(loss_fn=...)")

    # ----------------------------------------------------------------------------------------------- reporting
    @override
    def compute(self, stage: str) -> dict[str, dict[str, Tensor]]:
        """``{site: {"sae/<metric>": 0-d tensor, "nonfinite": rows}}`` of the SAEs for ``stage`` (DDP-synced)."""
        out: dict[str, dict[str, Tensor]] = {}
        densities: dict[str, Tensor] = {}
        nonfinite = self.nonfinite.pop(stage, {})
        for name, sae_trainer in self.trainers.items():
            metric = self.metrics.get(stage, {}).get(name, {}).get("sae")
            values: dict[str, Tensor] = {}
            if metric is not None and metric.update_called:
                computed = metric.compute()
                densities[name] = computed["density_hist"].cpu()
                values |= {key: computed[key] for key in _SCALARS}
            values["dead_fraction"] = sae_trainer.dead.float().mean()
            values |= decoder_epsilon(sae_trainer.sae)
            if stage == "train":
                values |= self.loss_parts.get(name, {})
                values["tokens"] = torch.tensor(float(sae_trainer.tokens_trained))
            elif stage == "val" and name in self.recovered:
                acc = self.recovered[name]
                clean, spliced, zero = (acc[key] / acc["batches"] for key in _LOSSES)
                values |= {"loss_clean": clean, "loss_sae": spliced, "loss_zero": zero,
                           "loss_recovered": (zero - spliced) / (zero - clean)}
            out[name] = {f"sae/{key}": torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu()
                         for key, v in values.items()}
            out[name]["nonfinite"] = torch.tensor(float(nonfinite.get(name, 0)))
        keys = dict.fromkeys(key for stats in out.values() for key in stats)
        for stats in out.values():  # a site without data in this window (e.g. its buffer not full yet): NaN
            for key in keys:
                stats.setdefault(key, torch.tensor(float("nan")))
        self.last_density.setdefault(stage, {}).update(densities)
        self._emitted_density = densities
        return out

    @override
    def emit(self, trainer: Trainer, stage: str, step: int) -> dict[str, float]:
        """The collector's emission (loggers, ``trainer.callback_metrics``), then the density histograms to W&B."""
        self._emitted_density = {}
        logged = super().emit(trainer, stage, step)
        log_density_histograms(trainer, stage, self._emitted_density, step)
        return logged

    def _save_density_figures(self, trainer: Trainer) -> None:
        import matplotlib.pyplot as plt

        edges = density_bin_edges()
        for name, hist in (self.last_density.get("val") or self.last_density.get("train", {})).items():
            fig, ax = plt.subplots(figsize=(5, 3))
            ax.stairs(hist.numpy(), edges.numpy(), fill=True)
            ax.set_xlabel("log10 feature density")
            ax.set_ylabel("latents")
            ax.set_title(f"SAE feature density: {name}")
            self.save_figure(trainer, fig, f"sae_density_{name}")

    # ---------------------------------------------------------------------------------------------------- resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """The collector's state (metric windows, FVU history) and, per site: SAE weights, Adam state, dead
        counters, carried tokens, buffer counters (not its rows)."""
        modules = {name: {"trainer": t.state_dict(), "buffer": self.buffers[name].state_dict(),
                          "pending_tokens": self.pending_tokens.get(name, 0)} for name, t in self.trainers.items()}
        return super().state_dict() | {"config": self.config.to_dict(), "modules": modules | self._loaded}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore lazily: each site's SAE is rebuilt at its first observed activation and loaded then."""
        super().load_state_dict(state_dict)
        self._loaded = dict(state_dict["modules"])


@rank_zero_only
def log_density_histograms(trainer: Trainer, stage: str, histograms: dict[str, Tensor], step: int) -> None:
    """Log each site's log10 feature-density histogram as ``{stage}/sae/density/{site}``
    (``wandb.Histogram(np_histogram=(counts, edges))``) to every attached ``WandbLogger`` (rank zero; nothing
    without one or when ``WANDB_MODE=disabled``)."""
    loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
    if not loggers or not histograms or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    edges = density_bin_edges().numpy()
    payload = {f"{stage}/sae/density/{name}": wandb.Histogram(np_histogram=(np.asarray(counts), edges))
               for name, counts in histograms.items()}
    for logger in loggers:
        logger.experiment.log({**payload, "trainer/global_step": step})
