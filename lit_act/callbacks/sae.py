"""SparseAutoencoderTrainer: train one sparse autoencoder per selected module online, from the activations of the
training batches, without touching the main model's graph, optimiser or RNG.

Self-contained (it uses :func:`lit_act.stats.tap.tap` / :func:`~lit_act.stats.tap.select_modules` directly) so it can
be ported onto the shared callback core later.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lit_act.sae.buffer import ActivationBuffer
from lit_act.sae.metrics import DENSITY_RANGE, SAEMetrics, decoder_epsilon, default_loss, loss_recovered
from lit_act.sae.training import SAEConfig, SAETrainer
from lit_act.stats.tap import ModuleSelector, neuron_view, require_uncompiled, select_modules, tap
from lit_act.utils import validate as v
from lit_act.utils.schedule import due, is_real_run, validate_every_n

_SCALARS = ("fvu", "l0", "afa_error", "never_fired_fraction")


class SparseAutoencoderTrainer(Callback):
    """Train an SAE (:mod:`lit_act.sae`) on each selected module's output while the model trains.

    **Collection.** At every ``every_n_steps``-th training step (not in the sanity check or ``fast_dev_run``) the
    outputs of the selected modules are detached, flattened to ``(tokens, d_in)`` rows (neurons = last dimension, conv
    channels = dim 1, :func:`~lit_act.stats.tap.neuron_view`), stripped of padding (for dict batches, rows where
    ``batch["attention_mask"] == 0`` when the output is ``(B, T, d_in)``) and of NaN/Inf rows (counted, logged as
    ``train/sae/nonfinite_rows/{module}``), and added to a per-module ring buffer of ``buffer_tokens`` rows
    (:class:`~lit_act.sae.buffer.ActivationBuffer`).

    **SAE steps.** After the batch, each SAE takes ``new tokens // batch_size`` Adam steps (the remainder carries over)
    on random buffer batches (:class:`~lit_act.sae.training.SAETrainer`: decoder-norm constraint, AuxK), on the model's
    device, with autocast off and gradients enabled only for the SAE. Under DDP each rank feeds its own activations,
    the number of steps is the minimum over ranks and SAE gradients are averaged, so every rank holds the same SAE.
    The SAE initialisation and buffer sampling use private generators: the global (CPU/CUDA) RNG, the model's graph
    and optimiser are untouched.

    **Metrics** (``{stage}/sae/{metric}/{module}``, straight to ``trainer.loggers`` on rank zero and into
    ``trainer.callback_metrics``): ``fvu``, ``l0``, ``afa_error``, ``never_fired_fraction`` (:class:`SAEMetrics`,
    over the SAE batches since the last training log, each measured in its step's forward before the update / over
    the validation epoch), ``dead_fraction`` (no activation
    in the last ``dead_tokens`` training tokens), ``epsilon_max``/``epsilon_mean`` (decoder quasi-orthogonality);
    training also logs the loss parts ``mse``, ``auxk`` (or ``l1``) and ``tokens``; validation logs
    ``loss_recovered``, ``loss_clean``, ``loss_sae``, ``loss_zero`` (the module's output replaced by the
    reconstruction / zeros on the first ``loss_recovered_batches`` validation batches, :func:`loss_recovered`).
    Each metric is also logged as ``{stage}/sae/{metric}/mean`` (mean over modules; the summary column of
    ``lit-act report``). Training metrics are logged every ``log_every_n_steps`` steps. Figure at train end:
    ``figures/sae_density_{module}.png`` (log10 feature-density histogram of the last validation epoch, else of the
    last training window).

    **Checkpoint.** ``state_dict`` holds, per module, the SAE weights, its Adam state, the dead-latent counters, the
    carried-over token count and the buffer's counters and generator; the buffered activations are dropped (a
    resumed run refills the buffer from its next batches). The SAEs are also reachable as ``callback.saes``.

    Example::

        trainer = Trainer(callbacks=[SparseAutoencoderTrainer(modules="blocks.*.mlp.act", sae="topk",
                                                              d_latent=1024, k=32, buffer_tokens=65536)])

    Args:
        modules: module selector (:func:`~lit_act.stats.tap.select_modules`; ``None``: every activation module).
        sae: SAE name (``topk``, ``batchtopk``, ``relu``, ``topafa``).
        d_latent, k, lr, batch_size, dead_tokens, auxk_coefficient, l1_coefficient, seed: :class:`SAEConfig`.
        every_n_steps: collect the training batch at every n-th global step.
        start_step: first global step collected (let the model train first: SAEs of a settled model).
        buffer_tokens: per-module buffer capacity in tokens (>= ``batch_size``).
        log_every_n_steps: log the training metrics every n-th global step.
        on_validation: evaluate the SAEs on every validation batch.
        loss_recovered_batches: validation batches on which the downstream loss is spliced (0: off).
        loss_fn: ``(model, batch) -> loss`` for the loss recovered (default: :func:`lit_act.sae.metrics.default_loss`).
        figures: save the density histograms at train end.
    """

    def __init__(self, modules: ModuleSelector = None, sae: str = "topk", d_latent: int = 1024, k: int = 32,
                 every_n_steps: int = 1, buffer_tokens: int = 65536, batch_size: int = 1024, lr: float = 3e-4,
                 dead_tokens: int = 1_000_000, auxk_coefficient: float = 1 / 32, l1_coefficient: float = 1e-3,
                 seed: int = 0, start_step: int = 0, log_every_n_steps: int = 50, on_validation: bool = True,
                 loss_recovered_batches: int = 4,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None, figures: bool = True) -> None:
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
        validate_every_n("every_n_steps", every_n_steps)
        validate_every_n("log_every_n_steps", log_every_n_steps)
        if every_n_steps is None:
            raise ValueError("every_n_steps must be a positive integer: the SAEs train on collected training batches")
        if not isinstance(loss_recovered_batches, int) or loss_recovered_batches < 0:
            raise ValueError(f"loss_recovered_batches must be an integer >= 0, got {loss_recovered_batches!r}")
        self.config = SAEConfig(sae=sae, d_latent=d_latent, k=k, lr=lr, batch_size=batch_size,
                                dead_tokens=dead_tokens, auxk_coefficient=auxk_coefficient,
                                l1_coefficient=l1_coefficient, seed=seed)
        ActivationBuffer(1, buffer_tokens, batch_size)  # validates buffer_tokens >= batch_size now
        self.modules = modules
        self.every_n_steps = every_n_steps
        if not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an integer >= 0, got {start_step!r}")
        self.start_step = start_step
        self.buffer_tokens = buffer_tokens
        self.log_every_n_steps = log_every_n_steps
        self.on_validation = on_validation
        self.loss_recovered_batches = loss_recovered_batches
        self.loss_fn = loss_fn or default_loss
        self.figures = figures
        self.selected: dict[str, nn.Module] = {}
        self.trainers: dict[str, SAETrainer] = {}
        self.buffers: dict[str, ActivationBuffer] = {}
        self.pending_tokens: dict[str, int] = {}
        self.metrics: dict[str, dict[str, SAEMetrics]] = {"train": {}, "val": {}}
        self.loss_parts: dict[str, dict[str, Tensor]] = {}
        self.recovered: dict[str, dict[str, Tensor]] = {}
        self.last_logged: dict[str, float] = {}
        self.last_density: dict[str, Tensor] = {}
        self._loaded: dict[str, Any] = {}
        self._taps = ExitStack()
        self._collecting: str | None = None
        self._mask: Tensor | None = None
        self._loss_fn_failed = False

    @property
    def saes(self) -> dict[str, nn.Module]:
        """The trained SAEs by module name."""
        return {name: t.sae for name, t in self.trainers.items()}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), sae=self.config.sae,
                                        d_latent=self.config.d_latent, k=self.config.k)

    # ------------------------------------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_uncompiled(pl_module, type(self).__name__)
        self.selected = select_modules(pl_module, self.modules)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._close()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._close()

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if (trainer.global_step >= self.start_step and due(trainer.global_step, self.every_n_steps)
                and is_real_run(trainer)):
            self._open("train", batch)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._collecting != "train":
            return
        self._close()
        for name, sae_trainer in self.trainers.items():
            self._train(name, sae_trainer)
        if due(trainer.global_step, self.log_every_n_steps):
            self._emit(trainer, "train", trainer.global_step)

    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.recovered = {}

    @override
    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        if self.on_validation and self.trainers and is_real_run(trainer):
            self._open("val", batch)

    @override
    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._collecting != "val":
            return
        self._close()
        if batch_idx < self.loss_recovered_batches and dataloader_idx == 0 and not self._loss_fn_failed:
            self._splice_losses(pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.on_validation and self.metrics["val"] and is_real_run(trainer):
            self._emit(trainer, "val", trainer.global_step)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if any(m.update_called for m in self.metrics["train"].values()):  # the last, partial logging window
            self._emit(trainer, "train", trainer.global_step)
        if self.figures and self.last_density and is_real_run(trainer):
            self._save_density_figures(trainer)

    # ------------------------------------------------------------------------------------------------ collecting
    def _open(self, stage: str, batch: Any) -> None:
        self._close()
        self._collecting = stage
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self._mask = mask.bool() if isinstance(mask, Tensor) else None
        observe = self._collect if stage == "train" else self._evaluate
        self._taps.enter_context(tap(self.selected, observe))

    def _close(self) -> None:
        self._taps.close()
        self._collecting = None
        self._mask = None

    def _rows(self, name: str, module: nn.Module, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"SparseAutoencoderTrainer: module {name!r} returned a {x.dtype} tensor; SAEs need a "
                            "floating-point activation, select another module with modules=")
        x = x.detach()
        if self._mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(self._mask.shape):
            return x[self._mask.to(x.device)].float()
        return neuron_view(x, module).float()

    def _collect(self, name: str, module: nn.Module, x: Tensor) -> None:
        rows = self._rows(name, module, x)
        if name not in self.trainers:
            self._create(name, rows)
        stored = self.buffers[name].add(rows)
        self.pending_tokens[name] = self.pending_tokens.get(name, 0) + stored

    def _create(self, name: str, rows: Tensor) -> None:
        sae_trainer = SAETrainer(rows.shape[1], self.config, device=rows.device)
        buffer = ActivationBuffer(rows.shape[1], self.buffer_tokens, self.config.batch_size,
                                  seed=self.config.seed + len(self.trainers) + 1)
        state = self._loaded.pop(name, None)
        if state is not None:
            sae_trainer.load_state_dict(state["trainer"])
            buffer.load_state_dict(state["buffer"])
            self.pending_tokens[name] = int(state["pending_tokens"])
        self.trainers[name], self.buffers[name] = sae_trainer, buffer
        self.metrics["train"][name] = SAEMetrics(rows.shape[1], self.config.d_latent).to(rows.device)
        self.metrics["val"][name] = SAEMetrics(rows.shape[1], self.config.d_latent).to(rows.device)

    def _train(self, name: str, sae_trainer: SAETrainer) -> None:
        buffer = self.buffers[name]
        steps = self.pending_tokens.get(name, 0) // self.config.batch_size if buffer.ready else 0
        device = sae_trainer.tokens_since_fired.device
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            agreed = torch.tensor(steps, device=device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            steps = int(agreed)
        metrics = self.metrics["train"][name]
        with torch.autocast(device.type, enabled=False):
            for _ in range(steps):
                x = buffer.sample()
                parts = sae_trainer.step(x)
                out = sae_trainer.last_output  # the step's own forward: no second pass
                metrics.update(x, out.x_hat, out.z, sae_trainer.sae.b_pre)
                self.loss_parts[name] = parts
        self.pending_tokens[name] = self.pending_tokens.get(name, 0) - steps * self.config.batch_size

    @torch.no_grad()
    def _evaluate(self, name: str, module: nn.Module, x: Tensor) -> None:
        sae_trainer = self.trainers.get(name)
        if sae_trainer is None:
            return
        rows = self._rows(name, module, x)
        rows = rows[torch.isfinite(rows).all(dim=1)]
        sae = sae_trainer.sae
        was_training = sae.training
        sae.eval()
        with torch.autocast(rows.device.type, enabled=False):
            out = sae(rows)
        sae.train(was_training)
        self.metrics["val"][name].update(rows, out.x_hat, out.z, sae.b_pre)

    def _splice_losses(self, pl_module: LightningModule, batch: Any) -> None:
        try:
            with torch.random.fork_rng(devices=[]):
                for name, sae_trainer in self.trainers.items():
                    result = loss_recovered(pl_module, self.selected[name], sae_trainer.sae, [batch], self.loss_fn)
                    acc = self.recovered.setdefault(name, {})
                    for key, value in result.items():
                        if key != "loss_recovered":
                            acc[key] = acc.get(key, 0) + value.detach()
                    acc["batches"] = acc.get("batches", 0) + 1
        except (TypeError, AttributeError, ValueError) as err:
            self._loss_fn_failed = True
            rank_zero_warn(f"SparseAutoencoderTrainer: loss recovered is off, the model's loss could not be computed "
                           f"on a validation batch ({err}); pass loss_fn=(model, batch) -> loss")

    # ----------------------------------------------------------------------------------------------- reporting
    def _module_values(self, stage: str) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {}
        for name, sae_trainer in self.trainers.items():
            metric = self.metrics[stage][name]
            values: dict[str, Tensor] = {}
            if metric.update_called:
                computed = metric.compute()
                self.last_density[name] = computed["density_hist"].cpu()
                values |= {key: computed[key] for key in _SCALARS}
            metric.reset()
            values["dead_fraction"] = sae_trainer.dead.float().mean()
            values |= decoder_epsilon(sae_trainer.sae)
            if stage == "train":
                values |= self.loss_parts.get(name, {})
                values["tokens"] = torch.tensor(float(sae_trainer.tokens_trained))
                values["nonfinite_rows"] = torch.tensor(float(self.buffers[name].nonfinite_rows))
            elif name in self.recovered:
                acc = self.recovered[name]
                clean, spliced, zero = (acc[key] / acc["batches"] for key in ("loss_clean", "loss_sae", "loss_zero"))
                values |= {"loss_clean": clean, "loss_sae": spliced, "loss_zero": zero,
                           "loss_recovered": (zero - spliced) / (zero - clean)}
            out[name] = values
        return out

    def _emit(self, trainer: Trainer, stage: str, step: int) -> dict[str, float]:
        per_module = self._module_values(stage)
        keys, values = [], []
        for name, stats in per_module.items():
            for stat, value in stats.items():
                keys.append(f"{stage}/sae/{stat}/{name}")
                values.append(torch.as_tensor(value, dtype=torch.float32).reshape(()).cpu())
        if not keys:
            return {}
        for stat in next(iter(per_module.values())):
            per = [stats[stat] for stats in per_module.values() if stat in stats]
            keys.append(f"{stage}/sae/{stat}/mean")
            values.append(torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()).cpu() for v in per]).mean())
        logged = dict(zip(keys, torch.stack(values).tolist(), strict=True))
        for key, value in logged.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        self.last_logged = logged
        _log(trainer, logged, step)
        return logged

    def _save_density_figures(self, trainer: Trainer) -> None:
        import matplotlib.pyplot as plt

        from lit_act.utils.figures import save_figure

        for name, hist in self.last_density.items():
            fig, ax = plt.subplots(figsize=(5, 3))
            edges = torch.linspace(*DENSITY_RANGE, hist.numel() + 1)
            ax.bar(edges[:-1].tolist(), hist.tolist(), width=float(edges[1] - edges[0]), align="edge")
            ax.set_xlabel("log10 feature density")
            ax.set_ylabel("latents")
            ax.set_title(f"SAE feature density: {name}")
            save_figure(trainer, fig, f"sae_density_{name}")

    # ---------------------------------------------------------------------------------------------------- resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """Per module: SAE weights, Adam state, dead counters, carried tokens, buffer counters (not its rows)."""
        modules = {name: {"trainer": t.state_dict(), "buffer": self.buffers[name].state_dict(),
                          "pending_tokens": self.pending_tokens.get(name, 0)} for name, t in self.trainers.items()}
        return {"config": self.config.to_dict(), "modules": modules | self._loaded}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore lazily: each module's SAE is rebuilt at its first observed activation and loaded then."""
        self._loaded = dict(state_dict["modules"])


@rank_zero_only
def _log(trainer: Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
