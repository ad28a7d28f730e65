"""GRKANLinear: KAT's Linear(GroupRational(x)), variance-preserving init, bad input, gradients."""

import pytest
import torch

from lit_act.kan import GRKANLinear


def test_grkan_is_linear_of_group_rational_written_out():
    layer = GRKANLinear(8, 3, num_groups=2).double()
    with torch.no_grad():
        layer.rational.denominator.normal_()
        layer.linear.bias.normal_()
    x = torch.randn(5, 8, dtype=torch.float64)
    a = layer.rational.numerator
    powers = torch.stack([x**j for j in range(6)], -1)  # (N, in, 6)
    p = (powers * a).sum(-1)
    group = torch.arange(8) // 4  # contiguous groups of 4 channels
    b = layer.rational.denominator[group]  # (in, 4): the channel's group denominator, powers 1..4
    q = 1 + ((powers[..., 1:5] * b).sum(-1)).abs()  # version B
    expected = (p / q) @ layer.linear.weight.T + layer.linear.bias
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("act_init", ["identity", "gelu"])
def test_variance_preserving_init(act_init):
    layer = GRKANLinear(512, 512, act_init=act_init, backend="eager")
    with torch.no_grad():
        y = layer(torch.randn(2048, 512))
    assert 0.85 < y.var().item() < 1.15
    assert torch.all(layer.linear.bias == 0)


def test_grkan_bad_input():
    with pytest.raises(ValueError, match="divisor"):
        GRKANLinear(10, 4, num_groups=8)
    with pytest.raises(ValueError, match="in_features=8"):
        GRKANLinear(8, 4)(torch.randn(2, 6))


def test_gradcheck_float64():
    layer = GRKANLinear(4, 2, num_groups=2).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *layer.parameters()))
