"""Module selection (``lit_act.selection``) on models nobody here wrote: Hugging Face GPT-2, LLaMA, BERT, ViT, ResNet
(small configs, random weights, offline), ``nn.Transformer``, Lightning's demo ``Transformer`` and ``BoringModel``,
plus lit-act's ``TransformerLM`` and ``MLPClassifier``."""

import ast
import functools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.demos import Transformer as LightningDemoTransformer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch import nn

from lit_act import selection
from lit_act.activations import swap_activations
from lit_act.activations.fixed import Erf
from lit_act.kan import kanify
from lit_act.models import MLPClassifier, TransformerLM
from lit_act.selection import (
    PRESETS,
    Site,
    activation_types,
    default_preset,
    down_projection,
    is_activation,
    linear_weight,
    match_glob,
    mlp_hidden,
    register_activation_type,
    residual_stream,
    select_modules,
    select_sites,
)

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

D, H, VOCAB, T = 32, 64, 64, 8


def _gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=D, n_head=2, n_inner=H, vocab_size=VOCAB, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=H, num_hidden_layers=2,
                                  num_attention_heads=2, max_position_embeddings=16)
    return transformers.BertModel(cfg)


def _vit():
    cfg = transformers.ViTConfig(hidden_size=D, intermediate_size=H, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=16, patch_size=8)
    return transformers.ViTModel(cfg)


def _resnet():
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 2], layer_type="basic")
    return transformers.ResNetModel(cfg)


def _torch_transformer():
    return nn.Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=48)


def _demo_transformer():
    return LightningDemoTransformer(vocab_size=VOCAB, ninp=16, nhead=2, nhid=48, nlayers=2)


def _lm():
    return TransformerLM(vocab_size=VOCAB, block_size=16, d_model=D, n_layer=2, n_head=2)


def _mlp_classifier():
    return MLPClassifier(64, num_classes=3, hidden=(16, 16))


BUILDERS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "vit": _vit, "resnet": _resnet,
            "nn.Transformer": _torch_transformer, "demo_transformer": _demo_transformer, "boring": BoringModel,
            "transformer_lm": _lm, "mlp_classifier": _mlp_classifier}


@functools.cache
def zoo(name: str) -> nn.Module:
    """One shared, read-only instance per architecture (tests that modify a model build their own)."""
    torch.manual_seed(0)
    return BUILDERS[name]().eval()


def _layers(prefix: str, n: int = 2, suffix: str = "") -> list[str]:
    return [f"{prefix}.{i}{suffix}" for i in range(n)]


# --------------------------------------------------------------------------------------------------------- globs

@pytest.mark.parametrize(("pattern", "name", "expected"), [
    ("encoder.layer.*", "encoder.layer.3", True),
    ("encoder.layer.*", "encoder.layer.3.output", False),  # `*` stops at dots
    ("encoder.layer.*", "encoder.layer", False),
    ("**.mlp", "blocks.0.mlp", True),
    ("**.mlp", "mlp", True),  # `**` as a whole segment: zero or more segments
    ("**.mlp", "blocks.0.fc_mlp", False),
    ("blocks.**.act", "blocks.act", True),
    ("blocks.**.act", "blocks.0.mlp.act", True),
    ("blocks.**", "blocks", True),
    ("blocks.**", "blocks.0.mlp", True),
    ("blocks.**", "blocksx", False),
    ("**", "a.b.c", True),
    ("**mlp", "blocks.0.fc_mlp", True),  # `**` inside a segment: any characters, dots included
    ("blocks.?", "blocks.1", True),
    ("blocks.?", "blocks.10", False),
    ("blocks.[01].mlp", "blocks.1.mlp", True),
    ("blocks.[!01].mlp", "blocks.1.mlp", False),
    ("blocks.[!01].mlp", "blocks.2.mlp", True),
    ("blocks.0", "blocks.0", True),  # no wildcard: an exact name
    ("blocks.0", "blocks.01", False),
    ("a+b(c)", "a+b(c)", True),  # regex characters are literal
    ("lm_head[", "lm_head[", True),  # an unclosed class is literal
])
def test_match_glob(pattern, name, expected):
    assert match_glob(pattern, name) is expected


def test_globs_on_hugging_face_names():
    bert = zoo("bert")
    # `*` no longer crosses dots: the layers only, not every module below them
    assert list(select_modules(bert, "encoder.layer.*")) == _layers("encoder.layer")
    assert list(select_modules(bert, "encoder.layer.*.intermediate.**")) == [
        "encoder.layer.0.intermediate", "encoder.layer.0.intermediate.dense",
        "encoder.layer.0.intermediate.intermediate_act_fn", "encoder.layer.1.intermediate",
        "encoder.layer.1.intermediate.dense", "encoder.layer.1.intermediate.intermediate_act_fn"]
    assert list(select_modules(zoo("gpt2"), "**.mlp")) == _layers("transformer.h", suffix=".mlp")
    assert list(select_modules(zoo("gpt2"), "transformer.h.*.mlp.c_*")) == [
        "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj"]
    assert list(select_modules(zoo("transformer_lm"), "**.mlp")) == _layers("blocks", suffix=".mlp")


# -------------------------------------------------------------------------------------------------- activations

def test_default_activations_on_the_zoo():
    bert = select_modules(zoo("bert"))
    assert list(bert) == [*_layers("encoder.layer", suffix=".intermediate.intermediate_act_fn"), "pooler.activation"]
    assert [type(m).__name__ for m in bert.values()] == ["GELUActivation", "GELUActivation", "Tanh"]
    assert list(select_modules(zoo("gpt2"))) == _layers("transformer.h", suffix=".mlp.act")
    assert list(select_modules(zoo("llama"))) == _layers("model.layers", suffix=".mlp.act_fn")
    assert list(select_modules(zoo("vit"))) == [*_layers("layers", suffix=".mlp.activation_fn"), "pooler.activation"]
    assert list(select_modules(zoo("resnet"))) == [
        "embedder.embedder.activation", "encoder.stages.0.layers.0.layer.0.activation",
        "encoder.stages.0.layers.0.activation", "encoder.stages.1.layers.0.layer.0.activation",
        "encoder.stages.1.layers.0.activation", "encoder.stages.1.layers.1.layer.0.activation",
        "encoder.stages.1.layers.1.activation"]
    assert list(select_modules(zoo("transformer_lm"))) == _layers("blocks", suffix=".mlp.act")
    assert list(select_modules(zoo("mlp_classifier"))) == _layers("hidden", suffix=".act")


def test_activation_table():
    types = activation_types()
    for cls in (nn.ReLU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Tanh, Erf,
                transformers.activations.GELUActivation, transformers.activations.NewGELUActivation):
        assert cls in types
    for cls in (nn.Softmax, nn.LogSoftmax, nn.MultiheadAttention, nn.Identity, nn.Linear, nn.Dropout):
        assert cls not in types
    assert is_activation(transformers.activations.SiLUActivation()) and not is_activation(nn.Identity())
    assert all(s.port == "output" for s in select_sites(zoo("gpt2")).values())


def test_library_never_imports_transformers():
    """lit-act's own code has no ``import transformers`` (lightning/torchmetrics may load it when installed)."""
    root = Path(selection.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "transformers"]
    assert offenders == []


class Squareplus(nn.Module):
    """An activation class lit-act does not know (Barron 2021)."""

    def forward(self, x):
        return (x + torch.sqrt(x * x + 4)) / 2


def _bert_with_squareplus():
    bert = _bert()
    for layer in bert.encoder.layer:
        layer.intermediate.intermediate_act_fn = Squareplus()
    return bert


def test_default_selection_outside_the_blocks_warns_and_registration_fixes_it(monkeypatch):
    monkeypatch.setattr(selection, "_REGISTERED", [])
    bert = _bert_with_squareplus()
    with pytest.warns(UserWarning, match=r"only pooler\.activation.*not recognised.*Squareplus.*"
                                         r"register_activation_type"):
        assert list(select_modules(bert)) == ["pooler.activation"]
    register_activation_type(Squareplus)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(select_modules(bert)) == [*_layers("encoder.layer", suffix=".intermediate.intermediate_act_fn"),
                                              "pooler.activation"]
    # swap_activations uses the same table
    replaced = swap_activations(bert, "relu")
    assert list(replaced) == [*_layers("encoder.layer", suffix=".intermediate.intermediate_act_fn"),
                              "pooler.activation"]
    assert [type(m) for m in replaced.values()] == [Squareplus, Squareplus, nn.Tanh]
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        register_activation_type(torch.relu)


def test_swap_activations_on_hugging_face_gpt2():
    model = _gpt2().eval()
    replaced = swap_activations(model, "relu")
    assert list(replaced) == _layers("transformer.h", suffix=".mlp.act")
    assert all(isinstance(block.mlp.act, nn.ReLU) for block in model.transformer.h)


# ---------------------------------------------------------------------------------------------- residual stream

@pytest.mark.parametrize(("name", "blocks"), [
    ("gpt2", _layers("transformer.h")),
    ("llama", _layers("model.layers")),
    ("bert", _layers("encoder.layer")),
    ("vit", _layers("layers")),
    ("resnet", _layers("encoder.stages")),  # the stages' nested layer stacks are not counted twice
    ("nn.Transformer", _layers("encoder.layers") + _layers("decoder.layers")),
    ("demo_transformer", _layers("transformer.encoder.layers") + _layers("transformer.decoder.layers")),
    ("transformer_lm", _layers("blocks")),
    ("mlp_classifier", _layers("hidden")),
])
def test_residual_stream(name, blocks):
    model = zoo(name)
    assert residual_stream(model) == blocks
    sites = select_sites(model, "residual_stream")
    assert list(sites) == blocks
    assert all(s.port == "output" and s.module is model.get_submodule(s.name) for s in sites.values())


class _Block(nn.Module):
    def __init__(self, width=4):
        super().__init__()
        self.fc, self.act = nn.Linear(width, width), nn.ReLU()


class _OtherBlock(_Block):
    pass


def test_stack_rules():
    """A stack is a ModuleList/Sequential of >= 2 composite blocks of one class with parameters; outermost only."""
    assert residual_stream(nn.Sequential(_Block(), _Block())) == ["0", "1"]  # the model itself may be the stack
    outer = nn.ModuleDict({"blocks": nn.ModuleList([_Block(), _Block()]),
                           "single": nn.ModuleList([_Block()]),  # one block: not a stack
                           "leaves": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]),  # no composite blocks
                           "mixed": nn.ModuleList([_Block(), _OtherBlock()]),  # two classes
                           "frozen_free": nn.ModuleList([nn.Sequential(nn.ReLU()), nn.Sequential(nn.ReLU())])})
    assert residual_stream(outer) == ["blocks.0", "blocks.1"]
    nested = nn.ModuleList([nn.ModuleDict({"inner": nn.ModuleList([_Block(), _Block()])}) for _ in range(3)])
    assert residual_stream(nested) == ["0", "1", "2"]


def test_residual_stream_of_a_model_without_blocks_raises_with_the_fix():
    with pytest.raises(ValueError, match=r"BoringModel has no repeated-block stack.*pass modules=.*Candidates: layer"):
        residual_stream(BoringModel())
    with pytest.raises(ValueError, match="no repeated-block stack"):
        select_sites(BoringModel(), None, default="residual_stream")


# --------------------------------------------------------------------------------------------------- mlp_hidden

MLP_HIDDEN = {
    "gpt2": {n: "output" for n in _layers("transformer.h", suffix=".mlp.act")},
    "llama": {n: "input" for n in _layers("model.layers", suffix=".mlp.down_proj")},
    "bert": {n: "output" for n in _layers("encoder.layer", suffix=".intermediate.intermediate_act_fn")},
    "vit": {n: "output" for n in _layers("layers", suffix=".mlp.activation_fn")},
    "nn.Transformer": {n: "input" for n in _layers("encoder.layers", suffix=".linear2")
                       + _layers("decoder.layers", suffix=".linear2")},
    "demo_transformer": {n: "input" for n in _layers("transformer.encoder.layers", suffix=".linear2")
                         + _layers("transformer.decoder.layers", suffix=".linear2")},
    "transformer_lm": {n: "output" for n in _layers("blocks", suffix=".mlp.act")},
}
DOWN = {"gpt2": "transformer.h.{}.mlp.c_proj", "llama": "model.layers.{}.mlp.down_proj",
        "bert": "encoder.layer.{}.output.dense", "vit": "layers.{}.mlp.fc2",
        "nn.Transformer": "encoder.layers.{}.linear2", "transformer_lm": "blocks.{}.mlp.fc_out"}


@pytest.mark.parametrize("name", sorted(MLP_HIDDEN))
def test_mlp_hidden_sites(name):
    model = zoo(name)
    sites = mlp_hidden(model)
    assert {n: s.port for n, s in sites.items()} == MLP_HIDDEN[name]
    assert list(sites) == list(MLP_HIDDEN[name])
    assert select_sites(model, "mlp_hidden") == sites
    assert default_preset(model) == "mlp_hidden"
    if name in DOWN:
        assert down_projection(model, next(iter(sites))) is model.get_submodule(DOWN[name].format(0))


@pytest.mark.parametrize("name", ["resnet", "mlp_classifier", "boring"])
def test_models_without_mlp_blocks_default_to_activations(name):
    assert default_preset(zoo(name)) == "activations"
    with pytest.raises(ValueError, match="found no MLP.*pass modules="):
        mlp_hidden(zoo(name))


def test_mlp_hidden_without_stacks_and_bottleneck_widths():
    plain = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 4))
    assert mlp_hidden(plain) == {"1": Site("1", plain[1])}
    assert down_projection(plain, "1") is plain[2]
    deep = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    assert mlp_hidden(deep) == {"4": Site("4", deep[4], "input")}  # two activations on the path: the fc_out input


def _forward(name, model):
    g = torch.Generator().manual_seed(1)
    if name in ("gpt2", "llama", "bert"):
        model(input_ids=torch.randint(0, VOCAB, (2, T), generator=g))
    elif name == "vit":
        model(pixel_values=torch.randn(2, 3, 16, 16, generator=g))
    elif name == "nn.Transformer":
        model(torch.randn(T, 2, 16, generator=g), torch.randn(T - 2, 2, 16, generator=g))
    elif name == "demo_transformer":
        model(torch.randint(0, VOCAB, (2, T), generator=g), torch.randint(0, VOCAB, (2, T), generator=g))
    else:
        model(torch.randint(0, VOCAB, (2, T), generator=g))


HIDDEN_WIDTH = {"nn.Transformer": 48, "demo_transformer": 48, "transformer_lm": 4 * D}


@pytest.mark.parametrize("name", sorted(MLP_HIDDEN))
def test_mlp_hidden_site_is_the_down_projection_input(name):
    """Hook each site (its port) and its down-projection's input separately; one forward; the tensors are equal."""
    model = zoo(name)
    seen, fed, widths, handles = {}, {}, {}, []
    for site_name, site in mlp_hidden(model).items():
        down = down_projection(model, site)
        widths[site_name] = linear_weight(down).shape[1]
        if site.port == "output":
            handles.append(site.module.register_forward_hook(
                lambda m, args, out, key=site_name: seen.__setitem__(key, out.detach().clone())))
        else:
            assert down is site.module
            handles.append(site.module.register_forward_pre_hook(
                lambda m, args, key=site_name: seen.__setitem__(key, args[0].detach().clone())))
        handles.append(down.register_forward_pre_hook(
            lambda m, args, key=site_name: fed.__setitem__(key, args[0].detach().clone())))
    try:
        with torch.no_grad():
            _forward(name, model)
    finally:
        for handle in handles:
            handle.remove()
    assert set(seen) == set(fed) == set(MLP_HIDDEN[name])
    for key in seen:
        assert seen[key].shape[-1] == widths[key] == HIDDEN_WIDTH.get(name, H)  # h, not the model width
        torch.testing.assert_close(seen[key], fed[key], rtol=0, atol=0)


def test_linear_weight_of_gpt2_conv1d_is_in_linear_layout():
    c_proj = zoo("gpt2").transformer.h[0].mlp.c_proj  # transformers' Conv1D: weight stored (in, out)
    w = linear_weight(c_proj)
    assert w.shape == (D, H)
    x = torch.randn(3, H)
    torch.testing.assert_close(F.linear(x, w, c_proj.bias), c_proj(x))
    assert linear_weight(zoo("llama").model.layers[0].mlp.down_proj).shape == (D, H)
    with pytest.raises(TypeError, match="not a linear-like layer"):
        linear_weight(nn.ReLU())


# ------------------------------------------------------------------------------------------ selectors and errors

def test_presets_types_predicates_and_lists():
    lm = zoo("transformer_lm")
    assert set(PRESETS) == {"activations", "residual_stream", "mlp_hidden"}
    assert list(select_modules(lm, ["residual_stream", "lm_head"])) == ["blocks.0", "blocks.1", "lm_head"]
    assert list(select_modules(lm, None, default="residual_stream")) == ["blocks.0", "blocks.1"]
    assert list(select_modules(lm, (nn.GELU, nn.LayerNorm)))[:3] == ["blocks.0.ln1", "blocks.0.ln2",
                                                                     "blocks.0.mlp.act"]
    assert list(select_modules(lm, lambda name, m: name.endswith("fc_out"))) == _layers("blocks", suffix=".mlp.fc_out")
    with pytest.raises(ValueError, match="default must be one of the presets"):
        select_sites(lm, None, default="mlp")
    with pytest.raises(ValueError, match="port must be one of"):
        Site("x", nn.ReLU(), "grad")


def test_select_modules_refuses_input_port_sites():
    with pytest.raises(ValueError, match=r"inputs of model\.layers\.0\.mlp\.down_proj.*select_sites"):
        select_modules(zoo("llama"), "mlp_hidden")
    sites = select_sites(zoo("llama"), None, default="mlp_hidden")
    assert [s.port for s in sites.values()] == ["input", "input"]


def test_no_match_errors_list_candidates():
    bert = zoo("bert")
    with pytest.raises(ValueError, match=r"\['model\.encoder\.layer\.\*'\] match no module of BertModel; "
                                         r"closest names: encoder\.layer\.1, encoder\.layer\.0"):
        select_modules(bert, "model.encoder.layer.*")
    with pytest.raises(ValueError, match=r"`\*` stays within one dotted segment \(use `\*\*`.*"
                                         r"encoder\.layer\.0\.attention\.output\.dense"):
        select_modules(bert, "encoder.*.dense")
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):
        select_modules(bert, ["encoder.layer.0", "nope"])  # every entry of a list must match
    with pytest.raises(ValueError, match="type Conv2d.*module types present: .*GELUActivation"):
        select_modules(bert, nn.Conv2d)
    with pytest.raises(ValueError, match="predicate .*available modules: embeddings"):
        select_modules(bert, lambda name, m: False)
    with pytest.raises(ValueError, match='"activations" preset.*functional.*"mlp_hidden"'):
        select_modules(zoo("nn.Transformer"))
    with pytest.raises(TypeError, match="predicate"):
        select_modules(bert, 3)
    with pytest.raises(TypeError, match="non-empty strings"):
        select_modules(bert, [])
    with pytest.raises(ValueError, match="not an mlp_hidden site.*encoder.layer.0.intermediate.intermediate_act_fn"):
        down_projection(bert, "pooler.activation")


def test_kanify_default_matches_nested_mlps():
    model = _lm()
    assert [r.name for r in kanify(model, layer="kan", grid_size=3)] == _layers("blocks", suffix=".mlp")
