"""PolyReLU / PolyNorm: fused kernels vs BryceZhuo/PolyCom's formulas, gradcheck, fp32 coefficient grads."""

import pytest
import torch

from lit_act.activations import PolyNorm, PolyReLU, build
from lit_act.activations.fused import polynorm, polyrelu


def ref_norm(z, eps=1e-6):
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps)


def ref_polynorm(x, w, b):  # PolyCom README
    return w[0] * ref_norm(x**3) + w[1] * ref_norm(x**2) + w[2] * ref_norm(x) + b


def ref_polyrelu(x, w, b):  # PolyCom dense_model transformer.py
    r = torch.relu(x)
    return w[0] * r**3 + w[1] * r**2 + w[2] * r + b


def test_defaults_follow_polycom():
    for cls in (PolyReLU, PolyNorm):
        m = cls()
        torch.testing.assert_close(m.weight.detach(), torch.full((3,), 1 / 3))
        torch.testing.assert_close(m.bias.detach(), torch.zeros(1))
    assert PolyNorm().eps == 1e-6


@pytest.mark.parametrize("cls, ref", [(PolyReLU, ref_polyrelu), (PolyNorm, ref_polynorm)])
def test_fused_matches_reference_formula(cls, ref):
    module = cls(backend="eager")
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.3, -0.7, 1.1]))
        module.bias.fill_(0.25)
    x = torch.randn(4, 7, 33, requires_grad=True)
    w = module.weight.detach().clone().requires_grad_()
    b = module.bias.detach().clone().requires_grad_()
    y, y_ref = module(x), ref(x, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(y)
    gx, = torch.autograd.grad((y * up).sum(), x, retain_graph=True)
    (y * up).sum().backward()
    rx, rw, rb = torch.autograd.grad((y_ref * up).sum(), (x, w, b))
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.weight.grad, rw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.bias.grad, rb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fn", [polyrelu, polynorm])
def test_gradcheck_float64(fn):
    x = (torch.randn(3, 5, dtype=torch.float64) + 0.01).requires_grad_()
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fn(*a, backend="eager"), (x, w, b))


@pytest.mark.parametrize("cls, ref", [(PolyReLU, ref_polyrelu), (PolyNorm, ref_polynorm)])
def test_half_inputs_accumulate_coefficient_grads_in_fp32(cls, ref):
    x = torch.randn(256, 512).to(torch.bfloat16)
    module = cls(backend="eager")
    y = module(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    w = module.weight.detach().double().requires_grad_()
    b = module.bias.detach().double().requires_grad_()
    ref(x.double(), w, b).sum().backward()
    torch.testing.assert_close(module.weight.grad.double(), w.grad, rtol=1e-5, atol=1e-2)
    torch.testing.assert_close(module.bias.grad.double(), b.grad, rtol=1e-6, atol=1e-3)


def test_order_and_input_validation():
    with pytest.raises(ValueError, match="order"):
        PolyReLU(order=0)
    with pytest.raises(TypeError, match="floating"):
        PolyNorm()(torch.ones(2, 3, dtype=torch.int64))
    x = torch.randn(2, 3)
    torch.testing.assert_close(PolyReLU(order=1)(x), torch.relu(x))  # a_1 = 1, a_0 = 0
    assert isinstance(build("poly_norm"), PolyNorm) and isinstance(build("poly_relu"), PolyReLU)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_compiled_backend_matches_eager(cls):
    x = torch.randn(8, 64, 128, requires_grad=True)  # >= COMPILE_MIN_NUMEL elements
    compiled, eager = cls(backend="compiled"), cls(backend="eager")
    y = compiled(x)
    y.square().sum().backward()
    got = (x.grad.clone(), compiled.weight.grad, compiled.bias.grad)
    x.grad = None
    y_ref = eager(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(got, (x.grad, eager.weight.grad, eager.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-2)
