"""Bad arguments to public constructors and config values fail at once with an error naming the argument.

Table-driven: each row is (what is built, the bad argument's name); the error must be a ``ValueError`` (``ConfigError``)
whose message names the argument. Hydra-style strings with an unambiguous meaning are converted instead.
"""

import math
import re

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lit_act.activations import GroupRational, Rational, TopK, build
from lit_act.callbacks import (
    ActivationHistograms,
    ActivationSparsity,
    DeadNeurons,
    HessianConfig,
    HessianSpectrum,
    LearnedActivationShapes,
    MassiveActivations,
    NeuronActivationCoverage,
    TeacherStudentMatch,
)
from lit_act.callbacks.sae import SparseAutoencoderTrainer
from lit_act.kan.fourier import FourierKANLinear
from lit_act.kan.grkan import GRKANLinear
from lit_act.kan.kan_linear import KANLinear
from lit_act.kan.skan import SKANLinear, SKANStageCallback
from lit_act.models import CNNClassifier, MLPClassifier, StudentNetwork, TransformerLM
from lit_act.utils import validate as v
from lit_act.utils.schema import check_config
from lit_act.utils.validate import ConfigError

BAD = [
    # activations
    ("leaky_relu negative_slope='a'", lambda: build("leaky_relu", negative_slope="a"), "negative_slope"),
    ("leaky_relu negative_slope=nan", lambda: build("leaky_relu", negative_slope=float("nan")), "negative_slope"),
    ("poly_norm eps=-1", lambda: build("poly_norm", eps=-1), "eps"),
    ("poly_norm eps=0", lambda: build("poly_norm", eps=0.0), "eps"),
    ("poly_relu order=2.5", lambda: build("poly_relu", order=2.5), "order"),
    ("poly_relu order=True", lambda: build("poly_relu", order=True), "order"),
    ("poly_relu order=10**6", lambda: build("poly_relu", order=10**6), "order"),
    ("crrelu eps='x'", lambda: build("crrelu", eps="x"), "eps"),
    ("crrelu eps=inf", lambda: build("crrelu", eps=math.inf), "eps"),
    ("apa gated='maybe'", lambda: build("apa", gated="maybe"), "gated"),
    ("topk k='a'", lambda: TopK(k="a"), "k"),
    ("topk k=0", lambda: TopK(k=0), "k"),
    ("topk k=True", lambda: TopK(k=True), "k"),
    ("topk activation=3", lambda: TopK(activation=3), "activation"),
    ("pau degrees=(2.7, 1.2)", lambda: build("pau", degrees=(2.7, 1.2)), "degrees"),
    ("pau degrees='54'", lambda: build("pau", degrees="54"), "degrees"),
    ("pau degrees=5", lambda: build("pau", degrees=5), "degrees"),
    ("pau degrees=(5, 4, 3)", lambda: build("pau", degrees=(5, 4, 3)), "degrees"),
    ("pau degrees=(-1, 2)", lambda: build("pau", degrees=(-1, 2)), "degrees"),
    ("pau degrees=(0, 0)", lambda: build("pau", degrees=(0, 0)), "degrees"),
    ("pau degrees=(40, 40) above the limit", lambda: build("pau", degrees=(40, 40)), "degrees"),
    ("pau degrees=(True, 2)", lambda: build("pau", degrees=(True, 2)), "degrees"),
    ("rational version='Z'", lambda: Rational(version="Z"), "version"),
    ("rational init='swoosh'", lambda: Rational(init="swoosh"), "init"),
    ("rational sharing='pixel'", lambda: Rational(sharing="pixel"), "sharing"),
    ("rational num_channels='a'", lambda: Rational(sharing="channel", num_channels="a"), "num_channels"),
    ("rational channel_dim=1.5", lambda: Rational(channel_dim=1.5), "channel_dim"),
    ("group_rational num_features=0", lambda: GroupRational(num_features=0), "num_features"),
    ("group_rational num_groups=3 of 8", lambda: GroupRational(num_features=8, num_groups=3), "num_groups"),
    ("group_rational init='x'", lambda: GroupRational(num_features=8, init="x"), "init"),
    # KAN layers
    ("kan grid_size=10**9", lambda: KANLinear(4, 4, grid_size=10**9), "grid_size"),
    ("kan grid_size='a'", lambda: KANLinear(4, 4, grid_size="a"), "grid_size"),
    ("kan spline_order=-1", lambda: KANLinear(4, 4, spline_order=-1), "spline_order"),
    ("kan grid_range=3.0", lambda: KANLinear(4, 4, grid_range=3.0), "grid_range"),
    ("kan grid_range=(1, -1)", lambda: KANLinear(4, 4, grid_range=(1.0, -1.0)), "grid_range"),
    ("kan grid_eps=nan", lambda: KANLinear(4, 4, grid_eps=float("nan")), "grid_eps"),
    ("kan in_features=0", lambda: KANLinear(0, 4), "in_features"),
    ("kan init='x'", lambda: KANLinear(4, 4, init="x"), "init"),
    ("fourier grid_size=2.5", lambda: FourierKANLinear(4, 4, grid_size=2.5), "grid_size"),
    ("fourier grid_size=10**9", lambda: FourierKANLinear(4, 4, grid_size=10**9), "grid_size"),
    ("fourier out_features='a'", lambda: FourierKANLinear(4, "a"), "out_features"),
    ("grkan degrees='54'", lambda: GRKANLinear(8, 8, degrees="54"), "degrees"),
    ("grkan in_features=-8", lambda: GRKANLinear(-8, 8), "in_features"),
    ("skan num_bases=5", lambda: SKANLinear(4, 4, num_bases=5), "num_bases"),
    ("skan num_bases=10**9", lambda: SKANLinear(4, 4, num_bases=10**9), "num_bases"),
    ("skan spaces='fourier' -> one space, but 'bspline,x' unknown", lambda: SKANLinear(4, 4, spaces=["x"]), "spaces"),
    ("skan grid_range=3.0", lambda: SKANLinear(4, 4, grid_range=3.0), "grid_range"),
    # models
    ("mlp hidden=0", lambda: MLPClassifier(64, 10, hidden=0), "hidden"),
    ("mlp hidden=[0]", lambda: MLPClassifier(64, 10, hidden=[0]), "hidden"),
    ("mlp hidden=['a']", lambda: MLPClassifier(64, 10, hidden=["a"]), "hidden"),
    ("mlp lr='abc'", lambda: MLPClassifier(64, 10, lr="abc"), "lr"),
    ("mlp lr=-1", lambda: MLPClassifier(64, 10, lr=-1), "lr"),
    ("mlp dropout=1.5", lambda: MLPClassifier(64, 10, dropout=1.5), "dropout"),
    ("mlp num_classes=None", lambda: MLPClassifier(64, None), "num_classes"),
    ("cnn channels=16", lambda: CNNClassifier(1, 10, channels=16), "channels"),
    ("cnn in_channels=None", lambda: CNNClassifier(None, 10), "in_channels"),
    ("student hidden_neurons=0", lambda: StudentNetwork(20, hidden_neurons=0), "hidden_neurons"),
    ("transformer vocab_size=None", lambda: TransformerLM(None, 16), "vocab_size"),
    ("transformer n_head='x'", lambda: TransformerLM(128, 16, n_head="x"), "n_head"),
    ("transformer weight_decay=-0.1", lambda: TransformerLM(128, 16, weight_decay=-0.1), "weight_decay"),
]


@pytest.mark.parametrize("case, make, name", BAD, ids=[row[0] for row in BAD])
def test_bad_argument_names_itself(case, make, name):
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert message.startswith(f"{name}=") or f" {name}=" in message, message
    assert "\n" not in message


BAD_CONFIG = [
    ({"trainer": {"max_epochs": "abc"}}, "trainer.max_epochs='abc'"),
    ({"trainer": {"max_epochs": 2.5}}, "trainer.max_epochs=2.5"),
    ({"trainer": {"max_steps": -5}}, "trainer.max_steps=-5"),
    ({"trainer": {"limit_train_batches": 1.5}}, "trainer.limit_train_batches=1.5"),
    ({"trainer": {"fast_dev_run": "x"}}, "trainer.fast_dev_run='x'"),
    ({"seed": "abc"}, "seed='abc'"),
    ({"model": {"lr": "abc"}}, "model.lr='abc'"),
    ({"model": {"hidden": [0]}}, "model.hidden=[0]"),
    ({"model": {"hidden": 0}}, "model.hidden=0"),
    ({"model": {"d_model": 0}}, "model.d_model=0"),
    ({"data": {"batch_size": -1}}, "data.batch_size=-1"),
    ({"data": {"val_fraction": 1.5}}, "data.val_fraction=1.5"),
    ({"optimized_mode": "up"}, "optimized_mode='up'"),
]


@pytest.mark.parametrize("values, start", BAD_CONFIG, ids=[row[1] for row in BAD_CONFIG])
def test_config_schema_names_key_and_value(values, start):
    with pytest.raises(ConfigError) as info:
        check_config(OmegaConf.create(values))
    assert str(info.value).startswith(start + ": expected "), str(info.value)


def test_config_schema_accepts_the_defaults():
    check_config(OmegaConf.create({"seed": 42, "trainer": {"max_epochs": -1, "max_steps": -1, "limit_val_batches": 0.5,
                                                           "fast_dev_run": True, "devices": "auto"},
                                   "model": {"hidden": [128, 128], "lr": 1e-3, "d_ff": None},
                                   "data": {"batch_size": 64}}))


def test_hydra_strings_with_one_meaning_are_converted():
    assert build("leaky_relu", negative_slope="0.2").negative_slope == 0.2
    assert build("poly_norm", eps="1e-5").eps == 1e-5
    assert TopK(k="8").k == 8 and TopK(k="0.25").k == 0.25
    assert Rational(degrees=["5", "4"]).degrees == (5, 4)
    assert v.positive_int("every_n_steps", "8") == 8
    assert v.finite_float("threshold", "0.1") == 0.1
    assert v.str_sequence("params", "hidden.*") == ("hidden.*",)
    assert v.str_sequence("params", ["a.*", "b"]) == ("a.*", "b")
    assert v.float_pair("x_range", ["-3", 3]) == (-3.0, 3.0)
    assert torch.equal(build("crrelu", eps="0.5").eps.detach(), torch.tensor(0.5))


@pytest.mark.parametrize("call, name", [
    (lambda: v.positive_int("every_n_steps", True), "every_n_steps"),
    (lambda: v.positive_int("every_n_steps", 2.5), "every_n_steps"),
    (lambda: v.positive_int("bins", 10**9, high=100_000), "bins"),
    (lambda: v.finite_float("threshold", float("nan")), "threshold"),
    (lambda: v.finite_float("high", math.inf), "high"),
    (lambda: v.finite_float("tol", "a"), "tol"),
    (lambda: v.positive_float("kh_power", float("nan")), "kh_power"),
    (lambda: v.str_sequence("ood_sets", [1, 2]), "ood_sets"),
    (lambda: v.float_pair("x_range", 3.0), "x_range"),
    (lambda: v.int_pair("degrees", "54"), "degrees"),
    (lambda: v.choice("backend", "fast", ["cached", "forward"]), "backend"),
    (lambda: v.boolean("figures", "maybe"), "figures"),
    (lambda: v.positive_int_sequence("hidden", 0), "hidden"),
])
def test_validators_name_the_argument(call, name):
    with pytest.raises(ConfigError, match=rf"^{name}="):
        call()


def test_choice_lists_valid_options():
    with pytest.raises(ConfigError, match=r"valid: \['cached', 'forward'\]"):
        v.choice("backend", "fast", ["cached", "forward"])


# ------------------------------------------------------------------------------------------------------- callbacks
NAN, INF = float("nan"), math.inf
NOEVAL = {"evaluate_on": None}  # NAC without the OOD evaluation (needs no ood_sets)

BAD_CALLBACK = [
    # schedules and common arguments (every callback): integers, booleans rejected, never split strings
    (ActivationSparsity, {"every_n_steps": True}, "every_n_steps"),
    (ActivationSparsity, {"every_n_steps": 2.5}, "every_n_steps"),
    (ActivationSparsity, {"every_n_steps": "often"}, "every_n_steps"),
    (ActivationSparsity, {"every_n_steps": 0}, "every_n_steps"),
    (ActivationSparsity, {"probe": True}, "probe"),
    (ActivationSparsity, {"probe": "never"}, "probe"),
    (ActivationSparsity, {"probe": 0}, "probe"),
    (ActivationSparsity, {"probe_samples": 0}, "probe_samples"),
    (ActivationSparsity, {"probe_samples": 2.5}, "probe_samples"),
    (ActivationSparsity, {"on_validation": "maybe"}, "on_validation"),
    (ActivationSparsity, {"on_test": 1}, "on_test"),
    (ActivationSparsity, {"figures": "yes"}, "figures"),
    (ActivationSparsity, {"modules": 3}, "modules"),
    (ActivationSparsity, {"modules": [1, 2]}, "modules"),
    (ActivationSparsity, {"modules": []}, "modules"),
    (DeadNeurons, {"window_steps": True}, "window_steps"),
    (DeadNeurons, {"window_steps": 0}, "window_steps"),
    (DeadNeurons, {"every_n_steps": True}, "every_n_steps"),
    (DeadNeurons, {"probe": "never"}, "probe"),
    (HessianSpectrum, {"every_n_epochs": True}, "every_n_epochs"),
    (HessianSpectrum, {"every_n_steps": "x"}, "every_n_steps"),
    (LearnedActivationShapes, {"every_n_epochs": 0}, "every_n_epochs"),
    (NeuronActivationCoverage, {"every_n_steps": True, **NOEVAL}, "every_n_steps"),
    (SparseAutoencoderTrainer, {"every_n_steps": True}, "every_n_steps"),
    (SparseAutoencoderTrainer, {"every_n_steps": None}, "every_n_steps"),
    (SparseAutoencoderTrainer, {"log_every_n_steps": 0}, "log_every_n_steps"),
    # ActivationSparsity
    (ActivationSparsity, {"threshold": "x"}, "threshold"),
    (ActivationSparsity, {"threshold": -0.5}, "threshold"),
    (ActivationSparsity, {"threshold": NAN}, "threshold"),
    (ActivationSparsity, {"threshold": INF}, "threshold"),
    (ActivationSparsity, {"cett_target": 1.5}, "cett_target"),
    (ActivationSparsity, {"cett_target": 0}, "cett_target"),
    (ActivationSparsity, {"cett_target": "a"}, "cett_target"),
    (ActivationSparsity, {"cett_max_tokens": 0}, "cett_max_tokens"),
    (ActivationSparsity, {"cett_max_tokens": 2.5}, "cett_max_tokens"),
    (ActivationSparsity, {"down_projections": ["fc_out"]}, "down_projections"),
    (ActivationSparsity, {"neuron_dim": "a"}, "neuron_dim"),
    # DeadNeurons
    (DeadNeurons, {"threshold": "x"}, "threshold"),
    (DeadNeurons, {"threshold": NAN}, "threshold"),
    (DeadNeurons, {"threshold": -INF}, "threshold"),
    # MassiveActivations
    (MassiveActivations, {"k": 0}, "k"),
    (MassiveActivations, {"k": 2.5}, "k"),
    (MassiveActivations, {"k": True}, "k"),
    (MassiveActivations, {"magnitude": -1}, "magnitude"),
    (MassiveActivations, {"magnitude": NAN}, "magnitude"),
    (MassiveActivations, {"median_ratio": "x"}, "median_ratio"),
    (MassiveActivations, {"fit_emergence": "maybe"}, "fit_emergence"),
    # ActivationHistograms (bins bounded before any allocation)
    (ActivationHistograms, {"bins": 10**9}, "bins"),
    (ActivationHistograms, {"bins": 0}, "bins"),
    (ActivationHistograms, {"bins": "a"}, "bins"),
    (ActivationHistograms, {"high": INF}, "high"),
    (ActivationHistograms, {"low": NAN}, "low"),
    (ActivationHistograms, {"low": "x"}, "low"),
    (ActivationHistograms, {"low": 1.0, "high": 1.0}, "high"),
    # HessianSpectrum
    (HessianConfig, {"tol": "a"}, "tol"),
    (HessianConfig, {"tol": 0}, "tol"),
    (HessianConfig, {"kh_power": NAN}, "kh_power"),
    (HessianConfig, {"kh_power": -1}, "kh_power"),
    (HessianConfig, {"max_iter": 2.5}, "max_iter"),
    (HessianConfig, {"max_iter": 0}, "max_iter"),
    (HessianConfig, {"max_iter": 2}, "max_iter"),  # < top_k
    (HessianSpectrum, {"num_batches": 0}, "num_batches"),
    (HessianSpectrum, {"num_batches": True}, "num_batches"),
    (HessianConfig, {"top_k": 0}, "top_k"),
    (HessianConfig, {"slq_runs": 0}, "slq_runs"),
    (HessianConfig, {"trace_budget": -1}, "trace_budget"),
    (HessianConfig, {"trace_budget": 2}, "trace_budget"),
    (HessianConfig, {"slq_iter": -1}, "slq_iter"),
    (HessianConfig, {"slq_iter": 2.5}, "slq_iter"),
    (HessianConfig, {"params": 3}, "params"),
    (HessianConfig, {"params": [1]}, "params"),
    (HessianConfig, {"backend": "jax"}, "backend"),
    (HessianConfig, {"trace_method": "magic"}, "trace_method"),
    (HessianConfig, {"curvature": "kfac"}, "curvature"),
    (HessianConfig, {"lambda_min": "maybe"}, "lambda_min"),
    (HessianConfig, {"seed": "x"}, "seed"),
    (HessianConfig, {"memory_budget": 3.0, "chunk_size": 4}, "memory_budget"),
    (HessianConfig, {"per_block_top_k": 2, "curvature": "ggn"}, "per_block_top_k"),
    (HessianSpectrum, {"config": {"top_kk": 3}}, "top_kk"),  # a Hydra node with a typo: the valid fields are listed
    (HessianSpectrum, {"config": 3}, "config"),
    (HessianSpectrum, {"top_k": 5}, "top_k"),  # a field passed flat, as in earlier versions: the error says where
    # NeuronActivationCoverage
    (NeuronActivationCoverage, {"ood_sets": [1, 2]}, "ood_sets"),
    (NeuronActivationCoverage, {"bins": 10**9, **NOEVAL}, "bins"),
    (NeuronActivationCoverage, {"bins": 1, **NOEVAL}, "bins"),
    (NeuronActivationCoverage, {"saturation": 0, **NOEVAL}, "saturation"),
    (NeuronActivationCoverage, {"saturation": "x", **NOEVAL}, "saturation"),
    (NeuronActivationCoverage, {"alpha": -1, **NOEVAL}, "alpha"),
    (NeuronActivationCoverage, {"alpha": "big", **NOEVAL}, "alpha"),
    (NeuronActivationCoverage, {"spacing": "log", **NOEVAL}, "spacing"),
    (NeuronActivationCoverage, {"evaluate_on": "val", "ood_sets": {}}, "evaluate_on"),
    (NeuronActivationCoverage, {"fit_samples": 0, **NOEVAL}, "fit_samples"),
    (NeuronActivationCoverage, {"batch_size": True, **NOEVAL}, "batch_size"),
    (NeuronActivationCoverage, {"probe": "never", **NOEVAL}, "probe"),
    (NeuronActivationCoverage, {"layer_params": [1], **NOEVAL}, "layer_params"),
    (NeuronActivationCoverage, {"search_kwargs": 3, **NOEVAL}, "search_kwargs"),
    # LearnedActivationShapes
    (LearnedActivationShapes, {"x_range": 3.0}, "x_range"),
    (LearnedActivationShapes, {"x_range": (3, -3)}, "x_range"),
    (LearnedActivationShapes, {"x_range": (0, INF)}, "x_range"),
    (LearnedActivationShapes, {"points": 1}, "points"),
    (LearnedActivationShapes, {"points": 10**9}, "points"),
    (LearnedActivationShapes, {"max_curves": 0}, "max_curves"),
    (LearnedActivationShapes, {"max_curves": 10**9}, "max_curves"),
    # TeacherStudentMatch
    (TeacherStudentMatch, {"copy_threshold": 1.5}, "copy_threshold"),
    (TeacherStudentMatch, {"copy_threshold": NAN}, "copy_threshold"),
    (TeacherStudentMatch, {"average_threshold": "x"}, "average_threshold"),
    (TeacherStudentMatch, {"copy_margin": -0.1}, "copy_margin"),
    (TeacherStudentMatch, {"sign_symmetric": "maybe"}, "sign_symmetric"),
    (TeacherStudentMatch, {"student_weight": 3}, "student_weight"),
    # SKANStageCallback
    (SKANStageCallback, {"full_epochs": -1}, "full_epochs"),
    (SKANStageCallback, {"full_epochs": 1.5}, "full_epochs"),
    (SKANStageCallback, {"selective_epochs": "x"}, "selective_epochs"),
    (SKANStageCallback, {"tau_min": 0}, "tau_min"),
    (SKANStageCallback, {"tau_min": 1.5}, "tau_min"),
    (SKANStageCallback, {"tau_min": NAN}, "tau_min"),
    (SKANStageCallback, {"entropy_weight": -1}, "entropy_weight"),
    # SparseAutoencoderTrainer
    (SparseAutoencoderTrainer, {"k": 0}, "k"),
    (SparseAutoencoderTrainer, {"k": 64, "d_latent": 32}, "k"),
    (SparseAutoencoderTrainer, {"d_latent": 0}, "d_latent"),
    (SparseAutoencoderTrainer, {"d_latent": "a"}, "d_latent"),
    (SparseAutoencoderTrainer, {"buffer_tokens": 0}, "buffer_tokens"),
    (SparseAutoencoderTrainer, {"batch_size": -1}, "batch_size"),
    (SparseAutoencoderTrainer, {"lr": 0}, "lr"),
    (SparseAutoencoderTrainer, {"lr": "x"}, "lr"),
    (SparseAutoencoderTrainer, {"start_step": -1}, "start_step"),
    (SparseAutoencoderTrainer, {"loss_fn": 3}, "loss_fn"),
]


@pytest.mark.parametrize("cls, kwargs, name", BAD_CALLBACK,
                         ids=[f"{cls.__name__}-{kw}" for cls, kw, _ in BAD_CALLBACK])
def test_bad_callback_argument_names_itself(cls, kwargs, name):
    with pytest.raises(ValueError) as info:
        cls(**kwargs)
    message = str(info.value)
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), message
    assert "\n" not in message


def test_hydra_strings_are_converted_in_callbacks():
    assert ActivationSparsity(threshold="0.1").threshold == 0.1
    assert ActivationSparsity(every_n_steps="8", probe="4", probe_samples="64").every_n_steps == 8
    sparsity = ActivationSparsity(probe="4", probe_samples="64", cett_target="0.3", cett_max_tokens="128")
    assert (sparsity.probe, sparsity.probe_samples, sparsity.cett_target, sparsity.cett_max_tokens) == (4, 64, 0.3, 128)
    assert ActivationSparsity(on_validation="false", on_test="true").on_test is True
    assert DeadNeurons(threshold="0.5", window_steps="10").window_steps == 10
    hist = ActivationHistograms(bins="32", low="-2", high="2")
    assert (hist.bins, hist.low, hist.high) == (32, -2.0, 2.0)
    # a Hydra node without _target_ (DictConfig) is a mapping of HessianConfig's fields
    hessian = HessianSpectrum(config=OmegaConf.create({"tol": "1e-3", "max_iter": "80", "kh_power": "0.25",
                                                       "params": "hidden.*"})).config
    assert (hessian.tol, hessian.max_iter, hessian.kh_power) == (1e-3, 80, 0.25)
    assert hessian.params == ("hidden.*",)  # one pattern, not its characters
    assert HessianConfig(params=OmegaConf.create(["a.*", "b"])).params == ("a.*", "b")
    assert LearnedActivationShapes(x_range=OmegaConf.create(["-2", 2])).x_range == (-2.0, 2.0)
    nac = NeuronActivationCoverage(alpha="0.5", saturation="10", bins="20", evaluate_on=None)
    assert (nac.params.alpha, nac.params.saturation, nac.params.bins) == (0.5, 10.0, 20)
    assert NeuronActivationCoverage(ood_sets=OmegaConf.create({"noise": 1})).ood_sets["noise"] == 1
    assert MassiveActivations(k="5", magnitude="50").k == 5
    assert SKANStageCallback(full_epochs="2", tau_min="0.1").tau_min == 0.1
    assert TeacherStudentMatch(copy_threshold="0.8").rule["copy_threshold"] == 0.8
    assert SparseAutoencoderTrainer(d_latent="64", k="8", lr="1e-3").config.d_latent == 64


def test_module_selectors_are_kept_whole():
    assert ActivationSparsity(modules="blocks.*.mlp.act").modules == "blocks.*.mlp.act"
    assert ActivationSparsity(modules=OmegaConf.create(["fc*", "act"])).modules == ["fc*", "act"]
    assert ActivationSparsity(modules=(nn.ReLU, nn.GELU)).modules == (nn.ReLU, nn.GELU)
    assert ActivationSparsity(modules=OmegaConf.create({"a": 1})).modules == {"a": 1}
