"""Fixed-bin activation histograms and learned-shape figures."""

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_act.activations import PolyNorm, Rational
from lit_act.callbacks import ActivationHistograms, LearnedActivationShapes
from lit_act.callbacks.shapes import elementwise_curves, response_curves
from lit_act.kan import KANLinear
from lit_act.models import MLPClassifier
from lit_act.stats.histogram import ActivationHistogramMetric


def test_histogram_metric_equals_numpy():
    x = torch.randn(1000) * 3
    x[:5] = float("nan")
    x[5:8] = float("inf")
    metric = ActivationHistogramMetric(bins=20, low=-4.0, high=4.0)
    metric.update(x[:500].reshape(10, 50))
    metric.update(x[500:])
    finite = x[torch.isfinite(x)].numpy()
    expected, _ = np.histogram(finite[(finite >= -4) & (finite < 4)], bins=20, range=(-4, 4))
    np.testing.assert_array_equal(metric.counts.numpy(), expected)
    outside = ((finite < -4) | (finite >= 4)).mean()
    out = metric.compute()
    assert out["hist_outside"].item() == pytest.approx(outside, abs=1e-6)
    assert out["nonfinite"].item() == 8
    with pytest.raises(ValueError, match="low < high"):
        ActivationHistogramMetric(low=1.0, high=1.0)


def _digits_like(n=64):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)),
                      batch_size=32)


def _trainer(tmp_path, callbacks, **kw):
    return L.Trainer(max_epochs=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **kw)


def test_histogram_callback_counts_the_observed_batch(tmp_path):
    model = MLPClassifier(64, 10, hidden=(16,))
    seen = []
    hook = model.hidden[0].act.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    callback = ActivationHistograms(bins=10, low=0.0, high=2.0, every_n_steps=1)
    _trainer(tmp_path, [callback], max_steps=1).fit(model, _digits_like())
    hook.remove()
    values = seen[0].numpy().ravel()
    expected, _ = np.histogram(values[(values >= 0) & (values < 2)], bins=10, range=(0, 2))
    np.testing.assert_array_equal(callback.last_histograms["train"]["hidden.0.act"], expected)
    assert callback.last_logged["train/hist_outside/hidden.0.act"] == pytest.approx(((values >= 2)).mean(), abs=1e-6)
    assert (tmp_path / "figures" / "activation_histograms.png").exists()
    assert not model.hidden[0].act._forward_hooks


def test_elementwise_curves_are_the_activation_and_non_elementwise_are_refused():
    x = torch.linspace(-3, 3, 50)
    rational = Rational(version="B", init="gelu").eval()
    torch.testing.assert_close(elementwise_curves(rational, x, 4)[:, 0], rational(x[:, None])[:, 0])
    assert elementwise_curves(PolyNorm(), x, 4) is None  # normalises over the last dimension


def test_response_curves_of_kan_are_edge_functions():
    layer = KANLinear(3, 2).eval()
    x = torch.linspace(-1, 1, 21)
    curves, labels = response_curves(layer, x, max_curves=2)
    inputs = torch.zeros(21, 3)
    inputs[:, 1] = x
    expected = layer(inputs)[:, 1] - layer(torch.zeros(1, 3))[:, 1]
    torch.testing.assert_close(curves[:, 1], expected)
    assert labels[1] == "in 1 -> out 1"


def test_shapes_callback_saves_figure_and_restores_modes(tmp_path):
    model = MLPClassifier(64, 10, hidden=(8,), activation="pau")
    callback = LearnedActivationShapes(every_n_epochs=1)
    _trainer(tmp_path, [callback], max_steps=2).fit(model, _digits_like())
    assert list(callback.selected) == ["hidden.0.act"]
    assert (tmp_path / "figures" / "learned_shapes.png").exists()
    assert (tmp_path / "figures" / "learned_shapes_epoch0001.png").exists()
    assert model.training
    with pytest.raises(ValueError, match="match no module"):
        _trainer(tmp_path, [LearnedActivationShapes(modules="nothing.*")]).fit(model, _digits_like())


def test_shapes_callback_with_nothing_learnable_does_nothing(tmp_path):
    model = MLPClassifier(64, 10, hidden=(8,), activation=nn.ReLU)
    callback = LearnedActivationShapes()
    _trainer(tmp_path, [callback], max_steps=1).fit(model, _digits_like())
    assert callback.selected == {} and not (tmp_path / "figures").exists()
