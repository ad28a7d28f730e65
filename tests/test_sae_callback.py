"""SparseAutoencoderTrainer on real (tiny) fits: logged keys, no effect on the main model, resume, masks, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_act.callbacks.sae import SparseAutoencoderTrainer


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
    callback = _callback()
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


def test_attention_mask_excludes_padding():
    callback = _callback()
    model = TinyLM()
    callback.selected = {"act": model.act}
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[:, 5:] = 0
    callback._open("train", {"input_ids": torch.zeros(4, 8, dtype=torch.long), "attention_mask": mask})
    model(torch.randint(0, 16, (4, 8)))
    callback._close()
    assert callback.buffers["act"].tokens_seen == 4 * 5
    assert not model.act._forward_hooks


def test_nonfinite_rows_are_dropped_and_counted():
    callback = _callback()
    model = TinyLM()
    callback.selected = {"act": model.act}
    callback._open("train", None)
    x = torch.randn(2, 8, 24)
    x[0, 3, 5] = float("nan")
    model.act(x)
    callback._close()
    assert callback.buffers["act"].nonfinite_rows == 1
    assert callback.buffers["act"].tokens_seen == 15


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
