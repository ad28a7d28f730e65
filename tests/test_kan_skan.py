"""S-KAN: bases, selection on a target built from one space, pruning, the stage callback, bad input."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lit_act.kan import SPACES, SKANLinear, SKANStageCallback
from lit_act.kan.skan import space_bases


def test_space_bases_match_their_definitions():
    x = torch.tensor([[-0.7], [0.2], [0.95]], dtype=torch.float64)
    four = space_bases("fourier", x, 4, (-1.0, 1.0))
    expected = torch.cat([torch.cos(math.pi * x * torch.tensor([1.0, 2.0], dtype=torch.float64)),
                          torch.sin(math.pi * x * torch.tensor([1.0, 2.0], dtype=torch.float64))], -1)
    torch.testing.assert_close(four[:, 0], expected)
    cheb = space_bases("chebyshev", x, 4, (-1.0, 1.0))
    t = torch.tanh(x)
    torch.testing.assert_close(cheb[:, 0], torch.cat([torch.ones_like(t), t, 2 * t**2 - 1, 4 * t**3 - 3 * t], -1))
    rbf = space_bases("rbf", x, 4, (-1.0, 1.0))
    centres = torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(rbf[:, 0], torch.exp(-(((x - centres) / (2 / 3)) ** 2)))


def test_forward_equals_weighted_sum_of_spaces():
    layer = SKANLinear(3, 2).double()
    with torch.no_grad():
        layer.selection_logits.normal_()
        layer.bias.normal_()
    x = torch.rand(5, 3, dtype=torch.float64) * 2 - 1
    w = torch.softmax(layer.selection_logits, -1)
    y = layer.bias.expand(5, 2).clone()
    for s_idx, s in enumerate(layer.spaces):
        phi = space_bases(s, x, layer.num_bases, layer.grid_range, layer.grid)  # (N, in, K)
        y = y + torch.einsum("nik,jik,i->nj", phi, layer.coefficients[s], w[:, s_idx])
    torch.testing.assert_close(layer(x), y)


def train_selection(layer: SKANLinear, x, y, full: int = 200, selective: int = 300, tau_min: float = 0.01,
                    entropy_weight: float = 0.05) -> None:
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    for step in range(full + selective):
        if step >= full:
            layer.set_stage("selective", tau_min ** ((step - full) / (selective - 1)))
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(layer(x), y)
        if step >= full:
            loss = loss + entropy_weight * layer.selection_entropy()
        loss.backward()
        opt.step()


def test_selection_picks_the_space_the_target_was_built_from():
    d = 4
    x = torch.rand(512, d) * 2 - 1
    teacher = SKANLinear(d, 1, spaces=("fourier",))  # a target built from the Fourier space alone
    with torch.no_grad():
        teacher.coefficients["fourier"].normal_()
        y = teacher(x)
        y = (y - y.mean()) / y.std()
    layer = SKANLinear(d, 1)
    train_selection(layer, x, y)
    counts = layer.select()
    assert counts == {"bspline": 0, "fourier": d, "chebyshev": 0, "rbf": 0}
    with torch.no_grad():
        assert torch.nn.functional.mse_loss(layer(x), y).item() < 1e-3


def test_select_folds_weights_and_drops_unused_parameters():
    layer = SKANLinear(6, 3)
    with torch.no_grad():
        layer.selection_logits.copy_(torch.eye(4)[[0, 1, 1, 3, 3, 3]] * 50)  # nearly one-hot choices
    x = torch.rand(20, 6) * 2 - 1
    before = layer(x)
    counts = layer.select()
    assert counts == {"bspline": 1, "fourier": 2, "chebyshev": 0, "rbf": 3}
    assert set(layer.coefficients) == {"bspline", "fourier", "rbf"}
    assert layer.selection_logits is None and layer.stage == "pruned"
    n_params = sum(p.numel() for p in layer.parameters())
    assert n_params == 3 * 6 * layer.num_bases + 3  # one space per input node, plus the bias
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="already"):
        layer.select()
    with pytest.raises(RuntimeError, match="pruned"):
        layer.set_stage("full")


def test_bad_arguments_list_valid_spaces():
    with pytest.raises(ValueError, match="valid: \\['bspline', 'fourier', 'chebyshev', 'rbf'\\]"):
        SKANLinear(2, 2, spaces=("bspline", "wavelet"))
    with pytest.raises(ValueError, match="num_bases"):
        SKANLinear(2, 2, num_bases=3)
    with pytest.raises(ValueError, match="in_features=2"):
        SKANLinear(2, 2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match="select\\(\\)"):
        SKANLinear(2, 2).set_stage("pruned")
    assert torch.isfinite(SKANLinear(2, 2)(torch.tensor([[1e6, -1e6]]))).all()


def test_gradcheck_float64():
    layer = SKANLinear(3, 2, num_bases=4).double()
    x = (torch.rand(4, 3, dtype=torch.float64) * 1.8 - 0.9).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))


class _Regressor(L.LightningModule):
    def __init__(self, callback: SKANStageCallback) -> None:
        super().__init__()
        self.layer = SKANLinear(2, 1)
        self.callback = callback

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y) + self.callback.penalty(self)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def test_stage_callback_runs_the_three_stages(tmp_path):
    callback = SKANStageCallback(full_epochs=1, selective_epochs=2, tau_min=0.1, entropy_weight=0.1)
    assert callback.temperature(1) == 1.0 and math.isclose(callback.temperature(2), 0.1)
    x = torch.rand(64, 2) * 2 - 1
    data = DataLoader(TensorDataset(x, torch.sin(3 * x[:, :1])), batch_size=16)
    module = _Regressor(callback)
    seen = []

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append((pl_module.layer.stage, pl_module.layer.temperature))

    trainer = L.Trainer(max_epochs=4, callbacks=[callback, Spy()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert [s for s, _ in seen] == ["full", "selective", "selective", "pruned"]
    assert seen[1][1] == 1.0 and math.isclose(seen[2][1], 0.1)
    optimizer_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert optimizer_params == {id(p) for p in module.parameters()}
    assert sum(trainer.callback_metrics[f"skan/nodes_{s}"].item() for s in SPACES) == 2


def test_stage_callback_needs_skan_layers(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def training_step(self, batch, _):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = L.Trainer(max_epochs=1, callbacks=[SKANStageCallback()], logger=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="no SKANLinear"):
        trainer.fit(Plain(), DataLoader(TensorDataset(torch.rand(4, 1), torch.rand(4, 1))))


def test_best_checkpoint_after_pruning_is_a_pruned_one(tmp_path):
    """Checkpoints from before select() cannot load into the pruned model, so "best" must come from after it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Monitored(_Regressor):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            # lower is better, and the pre-pruning epochs score best: the reset must still win
            self.log("score", float(self.current_epoch), on_epoch=True, on_step=False)
            return loss

    callback = SKANStageCallback(full_epochs=1, selective_epochs=1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="score", mode="min", save_top_k=1)
    x = torch.rand(32, 2) * 2 - 1
    data = DataLoader(TensorDataset(x, torch.sin(3 * x[:, :1])), batch_size=16)
    module = Monitored(callback)
    trainer = L.Trainer(max_epochs=4, callbacks=[callback, checkpoint], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    state = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert "layer.selection_logits" not in state  # saved after pruning
    module.load_state_dict(state)
