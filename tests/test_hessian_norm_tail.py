"""The closed-form diagonal of a pre-norm tail (last MLP branch, residual, final norm, head) against dense autograd
Hessians and GGNs, on lit-act's TransformerLM and on models written here the way users write them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_act.hessian import norm_tail
from lit_act.hessian.diagonal import exact_diagonal, trace_chain
from lit_act.models import TransformerLM
from tests.dense import dense_ggn, dense_hessian, lm_batches, make_batches

TAIL = ["mlp.fc_in.weight", "mlp.fc_in.bias", "mlp.fc_out.weight", "mlp.fc_out.bias"]


def perturbed(model: nn.Module) -> nn.Module:
    """Float64, eval, norm gains and biases away from 1 and 0 (their second-derivative terms then matter)."""
    model = model.double().eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
    return model


class NanoGPT(nn.Module):
    """A user's decoder: SDPA attention, bias-free Linear layers, SiLU MLP, RMSNorm, untied head."""

    def __init__(self, vocab=7, d=6, t=4):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(torch.randn(t, d) * 0.1)
        self.norm1, self.qkv, self.proj = nn.RMSNorm(d), nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.norm2, self.up, self.act = nn.RMSNorm(d), nn.Linear(d, 10, bias=False), nn.SiLU()
        self.down = nn.Linear(10, d, bias=False)
        self.final, self.head = nn.RMSNorm(d), nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        q, k, v = self.qkv(self.norm1(x)).split(x.shape[-1], -1)
        x = x + self.proj(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0])
        x = x + self.down(self.act(self.up(self.norm2(x))))
        return self.head(self.final(x))


class FlatTail(nn.Module):
    """A flat regressor ``head(norm(h + fc_out(tanh(fc_in(h)))))`` (``residual=False``: without ``h +``)."""

    def __init__(self, residual=True, affine=True):
        super().__init__()
        torch.manual_seed(2)
        self.residual = residual
        self.inp, self.fc_in, self.act, self.fc_out = nn.Linear(5, 4), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)
        self.drop, self.norm, self.head = nn.Dropout(0.1), nn.LayerNorm(4, elementwise_affine=affine), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        z = self.drop(self.fc_out(self.act(self.fc_in(h))))
        return self.head(self.norm(h + z if self.residual else z))


def assert_matches_dense(model, batches, loss, expected):
    """The covered parameters are exactly ``expected``; their diagonal equals the dense Hessian's and GGN's."""
    for curvature, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        res = exact_diagonal(model, batches, loss=loss, curvature=curvature, on_uncovered="partial")
        assert sorted(res.covered) == sorted(expected)
        mask = torch.cat([torch.full((p.numel(),), n in expected) for n, p in model.named_parameters()])
        reference = dense(model, batches, loss).diagonal()
        torch.testing.assert_close(res.diagonal[mask], reference[mask], rtol=1e-9, atol=1e-13)
        assert bool(torch.isnan(res.diagonal[~mask]).all())  # the uncovered rest is NaN


@pytest.mark.parametrize("activation,blocks", [("gelu", False), ("tanh", False), ("gelu", True)])
def test_transformer_lm_tail_matches_dense(activation, blocks, monkeypatch):
    """lit-act's pre-LN TransformerLM (residual + dropout in eval, 2 layers): the last block's MLP, ln_f and the head
    are covered exactly; the attention before them is not. ``blocks``: rows and vocabulary in blocks of two."""
    if blocks:
        monkeypatch.setattr(norm_tail, "_BLOCK_ELEMENTS", 16)
    model = perturbed(TransformerLM(vocab_size=7, block_size=4, d_model=6, n_layer=2, n_head=2, d_ff=8,
                                    activation=activation))
    assert_matches_dense(model, lm_batches(7, sizes=(3, 2)), "cross_entropy",
                         [f"blocks.1.{n}" for n in TAIL] + ["ln_f.weight", "ln_f.bias", "lm_head.weight"])


def test_users_decoder_with_rmsnorm_and_bias_free_layers_matches_dense():
    model = perturbed(NanoGPT())
    chain, _ = trace_chain(model, lm_batches(7, sizes=(3, 2))[0][0])
    assert chain.stop.startswith("the pre-norm tail rule covers 'up', 'down' and 'final'")
    assert_matches_dense(model, lm_batches(7, sizes=(3, 2)), "cross_entropy", ["up.weight", "down.weight", "final.weight",
                                                                  "head.weight"])


@pytest.mark.parametrize("residual,affine", [(True, True), (False, True), (True, False)])
def test_flat_tail_with_mse_matches_dense(residual, affine):
    model = perturbed(FlatTail(residual, affine))
    expected = ["fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias", "head.weight", "head.bias"]
    assert_matches_dense(model, make_batches("mse", (5, 3), seed=4, shape=(5,)), "mse",
                         expected + (["norm.weight", "norm.bias"] if affine else []))


class LateResidual(FlatTail):
    """The residual added to the branch depends on ``fc_in`` (computed after it): not a pre-norm tail."""

    def forward(self, x):
        h = torch.relu(self.inp(x))
        u = self.fc_in(h)
        return self.head(self.norm(u[:, :4] + self.fc_out(self.act(u))))


def test_tails_outside_the_rule_are_left_to_the_estimator_with_the_reason():
    x = make_batches("mse", (4,), shape=(5,))[0][0]
    chain, _ = trace_chain(perturbed(LateResidual()), x)
    assert chain.norm_tail is None and chain.covered == ["head.weight", "head.bias"]
    assert "residual added to the branch's output is not computed before 'fc_in'" in chain.stop
    model = FlatTail()
    model.fc_in = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))  # no activation between the branch's Linears
    chain, _ = trace_chain(perturbed(model), x)
    assert chain.norm_tail is None and "covered only after a residual MLP branch" in chain.stop


class Logits(nn.Module):
    """``model(idx).logits``: a Hugging Face LM as ``model(inputs) -> outputs`` for the output-loss rules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx):
        return self.model(idx).logits


def test_hugging_face_gpt_neox_tail_matches_dense():
    """GPT-NeoX (Pythia's architecture) from a small config, SDPA attention, sequential residual: the head reads a view
    of the final LayerNorm's output (``hidden[:, 0:]``), the MLP's activation is Hugging Face's ``GELUActivation``
    (checked to act elementwise), dropout modules sit between the branch and the residual add."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=7, hidden_size=6, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=8, max_position_embeddings=8, use_parallel_residual=False,
                                        attn_implementation="sdpa")
    torch.manual_seed(3)
    model = perturbed(Logits(transformers.GPTNeoXForCausalLM(config)))
    layer = "model.gpt_neox.layers.1.mlp."
    expected = [layer + n for n in ("dense_h_to_4h.weight", "dense_h_to_4h.bias", "dense_4h_to_h.weight",
                                    "dense_4h_to_h.bias")]
    assert_matches_dense(model, lm_batches(7, sizes=(3, 2)), "cross_entropy", expected + [
        "model.gpt_neox.final_layer_norm.weight", "model.gpt_neox.final_layer_norm.bias", "model.lm_head.weight"])
    config.use_parallel_residual = True  # r = mlp + attn + h: the residual is a sum formed after the branch
    chain, _ = trace_chain(perturbed(Logits(transformers.GPTNeoXForCausalLM(config))), lm_batches(7, sizes=(3, 2))[0][0])
    assert chain.norm_tail is None and "residual added to the branch's output is not computed before" in chain.stop


class PairMax(nn.Module):
    """A parameter-free activation that is not elementwise (registered as an activation class)."""

    def forward(self, x):
        return torch.maximum(x, x.roll(1, -1))


def test_activations_from_the_table_are_checked_to_act_elementwise():
    from lit_act.selection import _REGISTERED, register_activation_type

    register_activation_type(PairMax)
    try:
        model = FlatTail()
        model.act = PairMax()
        chain, _ = trace_chain(perturbed(model), make_batches("mse", (4,), shape=(5,))[0][0])
    finally:
        _REGISTERED.remove(PairMax)
    assert chain.norm_tail is None and "covered only after a residual MLP branch" in chain.stop


class Variant(FlatTail):
    """FlatTail with the branch written by ``branch(self, h) -> r`` (what the norm reads)."""

    def __init__(self, branch):
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return self.head(self.norm(self.branch(self, torch.relu(self.inp(x)))))


def scaled_in_place(m, h):
    a = m.act(m.fc_in(h))
    a.mul_(3.0)  # after the activation's call was recorded
    return h + m.fc_out(a)


def added_in_place(m, h):
    u = m.fc_in(h)
    z = m.fc_out(m.act(u))
    z += u[:, :4]  # the norm reads z itself, changed after fc_out's call
    return z


def detached(m, h):
    return h + m.fc_out(m.act(m.fc_in(h)).detach())


class LoraLinear(nn.Linear):
    def __init__(self, *shape):
        super().__init__(*shape)
        self.lora = nn.Parameter(torch.full((shape[0], 2), 0.1))

    def forward(self, x):
        return super().forward(x) + x @ self.lora.sum(1, keepdim=True)


class OnePlusRMSNorm(nn.RMSNorm):  # Gemma's convention: scale by 1 + weight
    def forward(self, x):
        return torch.nn.functional.rms_norm(x, self.normalized_shape, None, self.eps) * (1 + self.weight)


class NoAutograd(nn.Module):
    def forward(self, x):
        if x.requires_grad:
            raise RuntimeError("no autograd here")
        return torch.tanh(x)


@pytest.mark.parametrize("case", ["scaled_in_place", "added_in_place", "detached", "inplace_silu", "lora",
                                  "one_plus_rmsnorm", "raising_activation"])
def test_branches_the_closed_form_does_not_describe_are_rejected(case):
    """Each of these computes something other than the rule's formula (a review measured the closed form 2-4x and
    70-90% off the dense diagonal on such models): the walk must not cover the branch, and must say why."""
    from lit_act.selection import _REGISTERED, register_activation_type

    model = {"scaled_in_place": lambda: Variant(scaled_in_place), "added_in_place": lambda: Variant(added_in_place),
             "detached": lambda: Variant(detached)}.get(case, FlatTail)()
    if case == "inplace_silu":
        model.act = nn.SiLU(inplace=True)
    if case == "lora":
        model.fc_out = LoraLinear(6, 4)
    if case == "one_plus_rmsnorm":
        model.norm = OnePlusRMSNorm(4)
    if case == "raising_activation":
        register_activation_type(NoAutograd)
        model.act = NoAutograd()
    model = perturbed(model)
    batches = make_batches("mse", (5, 3), seed=4, shape=(5,))
    try:
        chain, _ = trace_chain(model, batches[0][0])
        res = exact_diagonal(model, batches, loss="mse", on_uncovered="partial")
    finally:
        if case == "raising_activation":
            _REGISTERED.remove(NoAutograd)
    assert chain.norm_tail is None and not {"fc_in.weight", "fc_out.weight"} & set(res.covered)
    assert "covered only after a residual MLP branch" in chain.stop
    reasons = {"scaled_in_place": "modified in place", "added_in_place": "modified in place",
               "inplace_silu": "works in place", "lora": "other than weight and bias",
               "one_plus_rmsnorm": "compute what its torch base class computes",
               "raising_activation": "does not act elementwise"}  # detached: fc_out's input is not act's output
    assert case == "detached" or reasons[case] in chain.stop


def test_tied_head_still_covers_the_tail():
    """nanoGPT ties its head to the token embedding: the head is not covered, the tail before it is."""
    model = NanoGPT()
    model.head.weight = model.emb.weight
    model = perturbed(model)
    chain, _ = trace_chain(model, lm_batches(7, sizes=(3, 2))[0][0])
    assert chain.norm_tail is not None and "head.weight" not in chain.covered
    assert_matches_dense(model, lm_batches(7, sizes=(3, 2)), "cross_entropy", ["up.weight", "down.weight", "final.weight"])


def test_half_precision_model_gets_the_rule():
    """bfloat16: the residual check's tolerance follows the dtype; values agree with the float32 model's to bf16
    precision."""
    model = TransformerLM(vocab_size=7, block_size=4, d_model=6, n_layer=2, n_head=2, d_ff=8).eval()
    batches = lm_batches(7, sizes=(3, 2))
    full = exact_diagonal(model, batches, loss="cross_entropy", on_uncovered="partial")
    half = exact_diagonal(model.to(torch.bfloat16), batches, loss="cross_entropy", on_uncovered="partial")
    assert half.covered == full.covered and "ln_f.weight" in half.covered
    mask = ~torch.isnan(full.diagonal)
    assert float((half.diagonal[mask].float() - full.diagonal[mask]).abs().max()) <= 0.05 * float(
        full.diagonal[mask].abs().max())


def test_ignored_targets_raise_with_the_fix():
    model = TransformerLM(vocab_size=7, block_size=4, d_model=6, n_layer=1, n_head=2).eval()
    x, y = lm_batches(7, sizes=(3, 2))[0]
    y = y.clone()
    y[0, -1] = -100
    for curvature in ("hessian", "ggn"):  # the GGN needs no gradient: checked all the same
        with pytest.raises(ValueError, match=r"ignore_index \(-100, padding\) have no output-loss rule"):
            exact_diagonal(model, [(x, y)], loss="cross_entropy", curvature=curvature, on_uncovered="partial")


class LeCunTanh(nn.Tanh):
    """An ``nn.Tanh`` subclass computing another function: its derivatives come from autograd, not tanh's."""

    def forward(self, x):
        return 1.7159 * torch.tanh(2 * x / 3)


def test_activation_subclass_with_its_own_forward_matches_dense():
    model = FlatTail()
    model.act = LeCunTanh()
    model = perturbed(model)
    expected = ["fc_in.weight", "fc_in.bias", "fc_out.weight", "fc_out.bias", "norm.weight", "norm.bias",
                "head.weight", "head.bias"]
    assert_matches_dense(model, make_batches("mse", (5, 3), seed=4, shape=(5,)), "mse", expected)
    chain = nn.Sequential(nn.Linear(5, 4), LeCunTanh(), nn.Linear(4, 3)).double()  # the plain chain rules too
    assert_matches_dense(chain, make_batches("cross_entropy", (5, 3), seed=4, shape=(5,)), "cross_entropy",
                         ["0.weight", "0.bias", "2.weight", "2.bias"])


class InPlaceBetween(nn.Module):
    """``case``: a view of the first layer's output scaled in place before the activation reads it, or the logits
    divided in place by a temperature after the head."""

    def __init__(self, case):
        super().__init__()
        torch.manual_seed(5)
        self.case, self.a, self.act, self.b = case, nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        if self.case == "view":
            h = h[:, 0:]
            h.mul_(2.0)
        out = self.b(self.act(h))
        return out.div_(2.0) if self.case == "temperature" else out


@pytest.mark.parametrize("case", ["view", "temperature"])
def test_plain_chain_stops_where_a_tensor_is_modified_in_place(case):
    model = InPlaceBetween(case).double()
    chain, _ = trace_chain(model, make_batches("mse", (4,), shape=(5,))[0][0])
    assert "modified in place before it is read" in chain.stop
    assert chain.covered == (["b.weight", "b.bias"] if case == "view" else [])


def test_zero_initialised_branch_is_not_trusted():
    """``r = h + 0.5 fc_out(a)`` with ``fc_out`` zero: ``r - z = h`` matches, but the 0.5 is invisible."""
    def half_branch(m, h):
        return h + 0.5 * m.fc_out(m.act(m.fc_in(h)))

    model = perturbed(Variant(half_branch))
    with torch.no_grad():
        model.fc_out.weight.zero_()
        model.fc_out.bias.zero_()
    chain, _ = trace_chain(model, make_batches("mse", (4,), shape=(5,))[0][0])
    assert chain.norm_tail is None and "zero on every row (zero-initialised 'fc_out'?)" in chain.stop


class CastedLinear(nn.Linear):
    """modded-nanogpt's fp32 master weight cast to the input's dtype in ``forward``."""

    def forward(self, x):
        return F.linear(x, self.weight.type_as(x), self.bias.type_as(x))


def test_a_subclass_whose_check_cannot_run_is_refused_not_crashed():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), CastedLinear(4, 3)).to(torch.bfloat16)
    model[2].float()  # fp32 weight, bf16 input: F.linear(input, weight) would raise
    chain, _ = trace_chain(model, torch.randn(4, 5, dtype=torch.bfloat16))
    assert chain.covered == [] and "a forward that does not compute its layer" in chain.stop


def test_hugging_face_activation_in_bfloat16_is_checked_in_float32():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=7, hidden_size=6, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=8, max_position_embeddings=8, use_parallel_residual=False)
    torch.manual_seed(3)
    model = Logits(transformers.GPTNeoXForCausalLM(config)).eval().to(torch.bfloat16)
    chain, _ = trace_chain(model, lm_batches(7, sizes=(3, 2))[0][0])
    assert chain.norm_tail is not None and "model.gpt_neox.layers.0.mlp.dense_h_to_4h.weight" in chain.covered
