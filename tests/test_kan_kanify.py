"""kanify on the reference models and plain modules; the Hydra ``mlp`` configs."""

from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lit_act.kan import LAYERS, KANLinear, kanify
from lit_act.kan.kanify import layer_class
from lit_act.models import MLPClassifier, TransformerLM

CONF = Path(__file__).resolve().parents[1] / "conf" / "mlp"


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def tiny_lm() -> TransformerLM:
    return TransformerLM(vocab_size=16, block_size=8, d_model=16, n_layer=2, n_head=2)


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_kanify_transformer_trains_and_loss_goes_down(layer):
    model = tiny_lm()
    replaced = kanify(model, layer=layer)
    assert [r.name for r in replaced] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert isinstance(model.blocks[0].mlp.fc_in, LAYERS[layer]) and isinstance(model.blocks[0].mlp.act, nn.Identity)
    idx = torch.randint(0, 16, (8, 8))
    targets = torch.roll(idx, -1, dims=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model.loss(model(idx), targets)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_hidden_width_matches_mlp_parameter_count(layer):
    model = TransformerLM(vocab_size=16, block_size=8, d_model=32, n_layer=1, n_head=2)
    mlp_params = n_params(model.blocks[0].mlp)
    (rep,) = kanify(model, layer=layer)
    assert rep.params_before == mlp_params and rep.params_after == n_params(model.blocks[0].mlp)

    def count(h):
        return n_params(layer_class(layer)(32, h)) + n_params(layer_class(layer)(h, 32))

    # the chosen width is the closest allowed one (multiples of num_groups=8 for GR-KAN): its neighbours are no
    # nearer to the MLP's parameter count
    step = 8 if layer == "grkan" else 1
    assert rep.hidden % step == 0
    for other in (rep.hidden - step, rep.hidden + step):
        if other >= 1:
            assert abs(count(rep.hidden) - mlp_params) <= abs(count(other) - mlp_params)
    if layer == "grkan":
        assert rep.hidden == 128  # KAT keeps the MLP's hidden width
    if layer == "kan":
        assert abs(rep.hidden - 128 / 10) <= 1  # G + k + 2 = 10 parameters per edge


def test_kanify_mlp_classifier_hidden_blocks():
    model = MLPClassifier(in_features=64, num_classes=10, hidden=(32, 16), dropout=0.1)
    replaced = kanify(model, layer="kan", match="hidden.*", grid_size=3)
    assert [(r.name, r.kind, r.in_features, r.out_features) for r in replaced] == [
        ("hidden.0", "linear_act", 64, 32), ("hidden.1", "linear_act", 32, 16)]
    assert isinstance(model.hidden[0].linear, KANLinear) and model.hidden[0].linear.grid_size == 3
    assert isinstance(model.hidden[0].dropout, nn.Dropout) and isinstance(model.head, nn.Linear)
    assert replaced[0].params_after == 64 * 32 * (3 + 3 + 2)  # base + scaler + G + k coefficients per edge
    assert model(torch.rand(5, 1, 8, 8)).shape == (5, 10)


def test_kanify_plain_sequential_and_dtype():
    model = nn.Sequential(nn.Linear(4, 32), nn.GELU(), nn.Linear(32, 3)).double()
    (rep,) = kanify(nn.ModuleDict({"mlp": model}), layer="fourier_kan", hidden=5)
    assert rep.hidden == 5 and model[0].fouriercoeffs.dtype == torch.float64
    assert model(torch.rand(2, 4, dtype=torch.float64)).shape == (2, 3)


def test_kanify_errors_are_clear():
    with pytest.raises(ValueError, match="valid: \\['fourier_kan', 'grkan', 'kan', 'skan'\\]"):
        kanify(tiny_lm(), layer="pykan")
    with pytest.raises(ValueError, match="no Linear -> activation.*recognised blocks in this model: \\['blocks.0.mlp'"):
        kanify(tiny_lm(), match="**.ffn")
    with pytest.raises(ValueError, match="names matched: \\['blocks.0.attn'"):
        kanify(tiny_lm(), match="**.attn")


@pytest.mark.parametrize("name", ["kan", "fourier_kan", "skan", "grkan"])
def test_hydra_mlp_configs_instantiate_and_apply(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    swap = hydra.utils.instantiate(cfg)
    model = tiny_lm()
    replaced = swap(model)
    assert len(replaced) == 2 and isinstance(model.blocks[1].mlp.fc_out, LAYERS[name])
    classifier = MLPClassifier(in_features=64, num_classes=10, hidden=(16,))
    assert [r.name for r in swap(classifier)] == ["hidden.0"]
