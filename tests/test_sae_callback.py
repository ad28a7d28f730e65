"""SparseAutoencoderTrainer on real (tiny) fits: logged keys, no effect on the main model, resume, masks, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric

from lit_act.callbacks import ActivationStatisticCallback, DeadNeurons, SparseAutoencoderTrainer
from lit_act.callbacks.sae import log_density_histograms
from lit_act.sae.metrics import DENSITY_BINS, density_bin_edges


class TinyLM(LightningModule):
    """Embedding -> MLP (ReLU, dropout) -> logits, on (tokens, next tokens) batches."""

    def __init__(self, int_side_output: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 12)
        self.up = nn.Linear(12, 24)
        self.act = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.down = nn.Linear(24, 16)
        self.int_side_output = int_side_output
        self.ids = nn.Identity()

    def forward(self, x):
        if self.int_side_output:
            self.ids(x)  # a module whose output is an integer tensor
        return self.down(self.drop(self.act(self.up(self.emb(x)))))

    def loss(self, logits, targets):
        return F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1))

    def training_step(self, batch, batch_idx):
        return self.loss(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.loss(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loaders():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (64, 8), generator=g)
    y = (x + 1) % 16
    data = TensorDataset(x, y)
    return DataLoader(data, batch_size=8), DataLoader(data, batch_size=16)


def _fit(tmp_path, callbacks, max_steps=12, ckpt_path=None, model=None):
    torch.manual_seed(0)
    model = model or TinyLM()
    trainer = Trainer(default_root_dir=tmp_path, max_steps=max_steps, limit_val_batches=2, val_check_interval=6,
                      callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    train, val = _loaders()
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer, model


def _callback(**kw):
    options = dict(modules="act", sae="topk", d_latent=32, k=4, every_n_steps=1, buffer_tokens=256, batch_size=32,
                   lr=1e-2, log_every_n_steps=3, loss_recovered_batches=1, figures=False)
    return SparseAutoencoderTrainer(**(options | kw))


def test_callback_logs_keys_and_leaves_training_unchanged(tmp_path):
    _, reference = _fit(tmp_path / "ref", [])
    callback = _callback(figures=True)
    trainer, model = _fit(tmp_path / "sae", [callback])
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q), name  # same data, same dropout masks: the callback used no global RNG
    metrics = trainer.callback_metrics
    for key in ("fvu", "l0", "dead_fraction", "afa_error", "epsilon_max", "mse", "auxk", "tokens"):
        assert f"train/sae/{key}/act" in metrics, key
    for key in ("fvu", "l0", "dead_fraction", "loss_recovered", "loss_clean", "loss_zero", "loss_sae"):
        assert f"val/sae/{key}/act" in metrics, key
    assert metrics["train/sae/l0/act"].item() == pytest.approx(4.0, abs=0.5)  # k=4 (ReLU may zero a few)
    # 12 steps x 64 tokens, 32-token SAE batches: every collected token is trained on exactly once
    assert metrics["train/sae/tokens/act"].item() == 12 * 64 - (12 * 64) % 32
    assert callback.trainers["act"].optimizer.state_dict()["state"][0]["step"].item() == 12 * 64 // 32
    assert 0 <= metrics["val/sae/fvu/act"].item() < 1.5
    assert not model.act._forward_hooks and not model.act._forward_pre_hooks
    assert not any(p.requires_grad is False for p in model.parameters())
    for figure in ("sae_density_act.png", "sae_fvu_per_layer.png"):
        assert (tmp_path / "sae" / "figures" / figure).is_file(), figure


def test_callback_resumes_sae_state(tmp_path):
    callback = _callback()
    trainer, _ = _fit(tmp_path / "a", [callback], max_steps=6)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    saved_steps = callback.trainers["act"].optimizer.state_dict()["state"][0]["step"].item()
    saved_tokens = callback.trainers["act"].tokens_trained
    resumed = _callback()
    _fit(tmp_path / "b", [resumed], max_steps=9, ckpt_path=ckpt)
    steps = resumed.trainers["act"].optimizer.state_dict()["state"][0]["step"].item()
    assert saved_steps == 6 * 64 // 32
    assert steps == saved_steps + 3 * 64 // 32  # Adam state continued, not restarted
    assert resumed.trainers["act"].tokens_trained == saved_tokens + 3 * 64


def _observe(callback, model, batch, x=None):
    """Feed one training batch through the collector's taps (its mask from the adapter), as the fit loop does."""
    callback.selected = {"act": model.act}
    callback._mask = callback.adapter.mask(batch)
    callback._start("train")
    try:
        if x is None:
            model(torch.randint(0, 16, (4, 8)))
        else:
            model.act(x)
    finally:
        callback._stop()


def test_attention_mask_excludes_padding():
    callback = _callback()
    model = TinyLM()
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, 5:] = 0
    _observe(callback, model, {"input_ids": torch.zeros(4, 8, dtype=torch.long), "attention_mask": mask})
    assert callback.buffers["act"].tokens_seen == 4 * 5
    assert not model.act._forward_hooks


def test_nonfinite_rows_are_dropped_and_counted():
    callback = _callback()
    model = TinyLM()
    x = torch.randn(2, 8, 24)
    x[0, 3, 5] = float("nan")
    _observe(callback, model, None, x)
    assert callback.buffers["act"].nonfinite_rows == 1
    assert callback.buffers["act"].tokens_seen == 15
    assert callback.nonfinite["train"]["act"] == 1


def test_non_floating_module_output_is_an_error(tmp_path):
    with pytest.raises(TypeError, match="module 'ids' returned a torch.int64 tensor"):
        _fit(tmp_path, [_callback(modules="ids")], max_steps=2, model=TinyLM(int_side_output=True))


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match=r"buffer_tokens \(16\) must be >= batch_size \(32\)"):
        _callback(buffer_tokens=16)
    with pytest.raises(ValueError, match=r"k \(64\) must be <= d_latent \(32\)"):
        _callback(k=64)
    with pytest.raises(ValueError, match="d_latent=0: expected a positive integer"):
        _callback(d_latent=0)
    with pytest.raises(ValueError, match="unknown SAE 'gated'; valid names"):
        _callback(sae="gated")


class _Rows(Metric):
    """Counts the real-token rows a statistics callback observes (its compute returns {statistic: value})."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("rows", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, x):
        self.rows += x.reshape(-1, x.shape[-1]).shape[0]

    def compute(self):
        return {"rows": self.rows}


class RowCounter(ActivationStatisticCallback):
    statistic = history_statistic = "rows"

    def make_metrics(self, stage, name, module, x):
        return {"rows": _Rows()}

    def update(self, metrics, stage, name, module, x):
        metrics["rows"].update(self.tokens(name, x))


def test_internal_passes_are_isolated_both_ways(tmp_path):
    """The SAE callback's spliced forwards (3 per loss-recovered batch) run in a quiet pass: a statistics callback
    observing the module downstream of the splice counts exactly the validation batches' tokens; and another
    callback's probe passes do not feed the SAE buffers."""
    counter = RowCounter(modules="down", every_n_steps=None, on_validation=True, figures=False)
    dead = DeadNeurons(modules="act", probe=3, probe_samples=32, figures=False)  # probe passes of its own
    sae = _callback(loss_recovered_batches=2)
    trainer, _ = _fit(tmp_path, [sae, counter, dead], max_steps=6)
    # one validation epoch (val_check_interval=6) of limit_val_batches=2 batches of 16 x 8 tokens
    assert trainer.callback_metrics["val/rows/down"].item() == 2 * 16 * 8
    assert "val/sae/loss_recovered/act" in trainer.callback_metrics  # the spliced passes did run
    assert sae.recovered["act"]["batches"] == 2
    # and the SAE saw the 6 training batches of 8 x 8 tokens only, not DeadNeurons' two probe passes
    assert "probe/dead_fraction/act" in trainer.callback_metrics
    assert sae.buffers["act"].tokens_seen == 6 * 8 * 8


def test_density_histogram_goes_to_wandb_loggers(monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    class Run:
        logged: list = []

        def log(self, payload):
            self.logged.append(payload)

    class FakeWandb(WandbLogger):
        run = Run()

        @property
        def experiment(self):
            return self.run

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = FakeWandb(offline=True)
    counts = torch.zeros(DENSITY_BINS)
    counts[3], counts[10] = 5, 7
    trainer = SimpleNamespace(loggers=[logger])
    log_density_histograms(trainer, "val", {"act": counts}, step=7)
    (payload,) = Run.logged
    assert payload["trainer/global_step"] == 7
    histogram = payload["val/sae/density/act"]
    assert histogram.histogram == counts.tolist()
    assert histogram.bins == pytest.approx(density_bin_edges().tolist())
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log_density_histograms(trainer, "val", {"act": counts}, step=8)
    assert len(Run.logged) == 1  # W&B disabled: nothing logged


def test_sae_on_llama_down_proj_input_with_padding(tmp_path):
    """The "mlp_hidden" preset gives LLaMA's down_proj *input* (act_fn(gate) * up); padding is excluded by the
    adapter's attention mask, and the loss recovered splices the reconstruction into that input."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)

    class Llama(LightningModule):
        def __init__(self):
            super().__init__()
            self.model = transformers.LlamaForCausalLM(config)

        def forward(self, **batch):
            return self.model(**batch)

        def training_step(self, batch, batch_idx):
            return self(**batch).loss

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self(**batch).loss)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (32, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 6:] = 0
    rows = [{"input_ids": i, "attention_mask": m, "labels": i.masked_fill(m == 0, -100)} for i, m in zip(ids, mask)]
    loader = DataLoader(rows, batch_size=8)
    callback = SparseAutoencoderTrainer(modules="mlp_hidden", d_latent=48, k=4, buffer_tokens=96, batch_size=48,
                                        lr=1e-2, log_every_n_steps=2, loss_recovered_batches=1, figures=False)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=4, limit_val_batches=1, val_check_interval=4,
                      callbacks=[callback], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0)
    torch.manual_seed(0)
    trainer.fit(Llama(), loader, loader)
    name = "model.model.layers.0.mlp.down_proj"
    assert callback.selected[name].port == "input"
    assert callback.trainers[name].d_in == 24  # intermediate_size: the input, not the output, of down_proj
    assert callback.buffers[name].tokens_seen == 4 * 8 * 6  # 4 batches x 8 sequences x 6 real tokens
    metrics = trainer.callback_metrics
    assert 0 <= metrics[f"val/sae/fvu/{name}"].item() < 1.5
    assert metrics[f"val/sae/loss_zero/{name}"].item() != metrics[f"val/sae/loss_clean/{name}"].item()
