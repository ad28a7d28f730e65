"""TopK, APA/AGLU, CRReLU, registry + Hydra configs, swap_activations."""

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from lit_act.activations import APA, CRReLU, GroupRational, Rational, TopK, available, build, swap_activations
from lit_act.models import MLPClassifier, TransformerLM

CONF = Path(__file__).resolve().parents[1] / "conf" / "activation"


def test_topk_keeps_k_largest_with_straight_through_gradient():
    x = torch.tensor([[0.5, -1.0, 3.0, 2.0, 0.1], [4.0, 1.0, -2.0, 0.0, 5.0]], requires_grad=True)
    y = TopK(k=2)(x)
    torch.testing.assert_close(y, torch.tensor([[0.0, 0.0, 3.0, 2.0, 0.0], [4.0, 0.0, 0.0, 0.0, 5.0]]))
    y.backward(torch.arange(10.0).view(2, 5))
    torch.testing.assert_close(x.grad, torch.tensor([[0.0, 0.0, 2.0, 3.0, 0.0], [5.0, 0.0, 0.0, 0.0, 9.0]]))
    assert TopK(k=0.25).kept(10) == 3  # ceil(2.5)
    relu_topk = TopK(k=3, activation="relu")(torch.tensor([[-1.0, -2.0, 0.5, -3.0]]))
    torch.testing.assert_close(relu_topk, torch.tensor([[0.0, 0.0, 0.5, 0.0]]))
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises((ValueError, TypeError)):
            TopK(k=bad)


def test_apa_and_aglu_follow_the_paper_formula():
    module = APA()
    with torch.no_grad():
        module.lambd.fill_(0.7)
        module.kappa.fill_(1.3)
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    expected = (0.7 * torch.exp(-1.3 * x) + 1) ** (-1 / 0.7)
    torch.testing.assert_close(module.double()(x), expected)
    gated = build("aglu").double()
    with torch.no_grad():
        gated.lambd.fill_(1.0)
        gated.kappa.fill_(1.0)
    torch.testing.assert_close(gated(x), x * torch.sigmoid(x))  # lambda = kappa = 1: SiLU
    assert not torch.isnan(APA()(torch.tensor([-1e4, 1e4]))).any()


def test_crrelu_formula_and_learnable_eps():
    module = CRReLU()
    x = torch.linspace(-3, 3, 61)
    torch.testing.assert_close(module(x), torch.relu(x) + 0.01 * x * torch.exp(-x * x / 2))
    module(x).sum().backward()
    torch.testing.assert_close(module.eps.grad, (x * torch.exp(-x * x / 2)).sum())


def test_every_registered_activation_has_a_config_that_instantiates():
    for name in available():
        path = CONF / f"{name}.yaml"
        assert path.exists(), f"missing conf/activation/{name}.yaml"
        cfg = OmegaConf.load(path)
        assert cfg.name == name
        if name == "group_rational":
            cfg.num_features = 16
        module = instantiate(cfg)()
        assert isinstance(module, nn.Module)
        x = torch.randn(2, 16)
        assert module(x).shape == x.shape


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="poly_norm"):
        build("polynorm2")


def test_swap_by_type_glob_and_predicate():
    model = MLPClassifier(64, num_classes=3, hidden=(16, 16))
    replaced = swap_activations(model, "pau", match=nn.ReLU)
    assert sorted(replaced) == ["hidden.0.act", "hidden.1.act"]
    assert all(isinstance(m, nn.ReLU) for m in replaced.values())
    assert isinstance(model.hidden[0].act, Rational) and model.hidden[0].act is not model.hidden[1].act
    replaced = swap_activations(model, "poly_norm", match="*.1.act")
    assert list(replaced) == ["hidden.1.act"]
    replaced = swap_activations(model, nn.GELU, match=lambda name, m: name.endswith("0.act"))
    assert list(replaced) == ["hidden.0.act"] and isinstance(model.hidden[0].act, nn.GELU)
    with pytest.raises(ValueError, match=r"\['blocks\.\*'\] match no module"):
        swap_activations(model, "relu", match="blocks.*")
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 3)


def test_swap_default_match_and_transformer_then_compile_ready():
    model = TransformerLM(vocab_size=128, block_size=16, d_model=32, n_layer=2, n_head=2, d_ff=64)
    replaced = swap_activations(model, GroupRational, match="blocks.*.mlp.act", num_features=64, num_groups=4)
    assert sorted(replaced) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    logits = model(torch.randint(0, 128, (2, 16)))
    assert logits.shape[-1] == 128 and torch.isfinite(logits).all()
    default = swap_activations(model, "gelu")  # match=None: every activation module, incl. lit-act's own
    assert sorted(default) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]
    with pytest.raises(TypeError, match="compile"):
        swap_activations(torch.compile(model), "relu")


def test_swapped_module_follows_model_dtype():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).double()
    swap_activations(model, "pau")
    assert model[1].numerator.dtype == torch.float64
    assert math.isfinite(model(torch.randn(2, 4, dtype=torch.float64)).sum().item())
