"""DeadNeuronMetric against a plain per-neuron check."""

import pytest
import torch

from lit_act.stats.dead import DeadNeuronMetric


def test_dead_fraction_and_living_frequency():
    batches = [torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, -2.0, 3.0]]),
               torch.tensor([[0.0, 2.0, -1.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 1.0, -3.0, 0.0]])]
    metric = DeadNeuronMetric(4)
    for a in batches:
        metric.update(a)
    out = metric.compute()
    a = torch.cat(batches)
    fired = (a > 0).sum(dim=0)
    assert out["dead_fraction"].item() == pytest.approx((fired == 0).float().mean().item()) == 0.5
    living = fired > 0
    assert out["living_activation_frequency"].item() == pytest.approx(
        (fired[living] / a.shape[0]).mean().item()) == pytest.approx((4 / 5 + 1 / 5) / 2)


def test_threshold_and_nonfinite():
    a = torch.tensor([[0.5, float("nan")], [0.2, float("inf")], [0.1, 0.05]])
    metric = DeadNeuronMetric(2, threshold=0.3)
    metric.update(a)
    out = metric.compute()
    assert out["nonfinite"].item() == 2
    assert out["dead_fraction"].item() == 0.5  # neuron 1's only finite value 0.05 <= 0.3
    assert out["living_activation_frequency"].item() == pytest.approx(1 / 3)


def test_shape_and_argument_errors():
    with pytest.raises(ValueError, match="num_neurons"):
        DeadNeuronMetric(0)
    with pytest.raises(ValueError, match=r"\(samples, 3\)"):
        DeadNeuronMetric(3).update(torch.ones(2, 4))


def test_abs_mode_and_shared_definition_with_sparsity():
    from lit_act.stats.sparsity import ActivationSparsityMetric

    a = torch.tensor([[-1.0, 0.0, 0.2], [-3.0, 0.0, -0.4]])
    signed, absolute = DeadNeuronMetric(3), DeadNeuronMetric(3, threshold=0.1, mode="abs")
    signed.update(a)
    absolute.update(a)
    assert signed.compute()["dead_fraction"].item() == pytest.approx(2 / 3)  # neurons 0 and 1 never > 0
    assert absolute.compute()["dead_fraction"].item() == pytest.approx(1 / 3)  # only neuron 1 has |a| <= 0.1 always
    # one definition of "active": a neuron is dead iff its per-neuron sparsity (same mode, threshold) is 1
    for mode, tau in (("signed", 0.0), ("abs", 0.1)):
        dead = DeadNeuronMetric(3, threshold=tau, mode=mode)
        dead.update(a)
        per_neuron = []
        for i in range(3):
            s = ActivationSparsityMetric(threshold=tau, mode=mode)
            s.update(a[:, i:i + 1])
            per_neuron.append(s.compute()["sparsity"].item() == 1.0)
        assert dead.dead_mask().tolist() == per_neuron
    with pytest.raises(ValueError, match=r"mode must be one of \['abs', 'signed'\]"):
        DeadNeuronMetric(3, mode="zero")


def test_nonfinite_layer_is_nan():
    metric = DeadNeuronMetric(2)
    metric.update(torch.full((3, 2), float("nan")))
    out = metric.compute()
    assert out["nonfinite"].item() == 6
    assert torch.isnan(out["dead_fraction"]) and torch.isnan(out["living_activation_frequency"])
