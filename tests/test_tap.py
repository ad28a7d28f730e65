"""The module tap: selection, tensor extraction, neuron views, hook cleanup."""

from collections import OrderedDict

import pytest
import torch
from torch import nn

from lit_act.models import TransformerLM
from lit_act.selection import activation_types
from lit_act.stats.tap import (
    count_above,
    extract_tensor,
    finite_fp32,
    is_compiled,
    nan_marked,
    neuron_view,
    select_modules,
    tap,
)


def _lm():
    return TransformerLM(vocab_size=128, block_size=16, d_model=32, n_layer=2, n_head=2)


def _hook_count(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_default_selection_is_activation_modules_in_order():
    assert list(select_modules(_lm())) == ["blocks.0.mlp.act", "blocks.1.mlp.act"]


def test_activation_types_include_torch_and_lit_act_activations():
    from lit_act.activations.fixed import Erf

    types = activation_types()
    assert nn.GELU in types and nn.ReLU in types and nn.Mish in types and Erf in types
    model = nn.Sequential(nn.Linear(2, 2), Erf(), nn.Linear(2, 2), nn.Softplus())
    assert list(select_modules(model)) == ["1", "3"]


def test_glob_type_predicate_and_list_selectors():
    lm = _lm()
    assert list(select_modules(lm, "blocks.?")) == ["blocks.0", "blocks.1"]
    assert list(select_modules(lm, ["blocks.1.mlp.fc_in", "lm_head"])) == ["blocks.1.mlp.fc_in", "lm_head"]
    assert list(select_modules(lm, nn.LayerNorm))[:2] == ["blocks.0.ln1", "blocks.0.ln2"]
    assert list(select_modules(lm, lambda name, m: name.endswith("fc_out"))) == ["blocks.0.mlp.fc_out",
                                                                               "blocks.1.mlp.fc_out"]


def test_selection_errors_name_the_request_and_list_modules():
    lm = _lm()
    with pytest.raises(ValueError, match=r"\['nope\.\*'\].*available modules: tok_emb"):
        select_modules(lm, ["blocks.0.mlp.act", "nope.*"])
    with pytest.raises(ValueError, match="Conv2d"):
        select_modules(lm, nn.Conv2d)
    with pytest.raises(ValueError, match="default activation"):
        select_modules(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="predicate"):
        select_modules(lm, 3)


def test_extract_tensor_cases():
    t = torch.ones(2)
    assert extract_tensor("m", t) is t
    assert extract_tensor("m", (t, torch.zeros(1))) is t
    assert extract_tensor("m", {"last_hidden_state": t, "logits": torch.zeros(1)}) is t
    assert extract_tensor("m", OrderedDict(hidden_states=(torch.zeros(1), t))) is t
    assert extract_tensor("m", {"logits": t}) is t
    with pytest.raises(TypeError, match="'blk' returned NoneType"):
        extract_tensor("blk", None)
    with pytest.raises(TypeError, match="'blk' returned dict"):
        extract_tensor("blk", {"a": 1})


def test_neuron_view_layouts():
    x = torch.arange(2 * 3 * 4 * 5.0).reshape(2, 3, 4, 5)
    conv = neuron_view(x, nn.Conv2d(3, 3, 1))
    assert conv.shape == (40, 3)
    assert torch.equal(conv[:, 1].sort().values, x[:, 1].flatten().sort().values)
    assert neuron_view(torch.randn(2, 3, 7), nn.Conv1d(3, 3, 1)).shape == (14, 3)
    assert neuron_view(torch.randn(2, 3, 7), nn.GELU()).shape == (6, 7)  # tokens x features
    assert neuron_view(torch.randn(2, 3, 4, 5), nn.ReLU()).shape == (40, 3)  # conv map after an activation
    assert neuron_view(torch.randn(2, 3, 7), nn.GELU(), neuron_dim=1).shape == (14, 3)
    with pytest.raises(ValueError, match="out of range"):
        neuron_view(torch.randn(2, 3), nn.ReLU(), neuron_dim=4)


def test_tap_calls_fn_and_removes_hooks_also_on_exception():
    model = _lm()
    seen = []
    modules = select_modules(model)
    with tap(modules, lambda name, module, x: seen.append((name, tuple(x.shape)))):
        assert _hook_count(model) == 2
        model(torch.randint(0, 128, (2, 5)))
    assert seen == [("blocks.0.mlp.act", (2, 5, 128)), ("blocks.1.mlp.act", (2, 5, 128))]
    assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), tap(modules, lambda *a: None):
        raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_finite_fp32_and_compiled_detection():
    x, mask = finite_fp32(torch.tensor([1.0, float("nan"), float("inf")], dtype=torch.bfloat16))
    assert x.dtype == torch.float32 and mask.tolist() == [True, False, False]
    model = _lm()
    assert not is_compiled(model)
    model.blocks[0].compile()
    assert is_compiled(model)


def test_nan_marked_and_count_above():
    x = torch.tensor([[0.5, -2.0, float("inf"), 0.0], [float("nan"), 3.0, -float("inf"), 1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        marked = nan_marked(x.to(dtype))
        assert marked.dtype == torch.float32
        assert torch.equal(marked.isnan(), ~torch.isfinite(x))
        assert torch.equal(marked[torch.isfinite(x)], x[torch.isfinite(x)])
    above, nonfinite = count_above(nan_marked(x), 0.5, dim=1)
    assert above.tolist() == [0.0, 2.0] and nonfinite.tolist() == [1.0, 2.0]
    above, nonfinite = count_above(nan_marked(x).abs_(), 0.5, dim=0)
    assert above.tolist() == [0.0, 2.0, 0.0, 1.0] and nonfinite.tolist() == [1.0, 0.0, 2.0, 0.0]
