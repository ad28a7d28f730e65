"""Checkpoints reload alone: ``Model.load_from_checkpoint(path)`` gives the trained model, bit for bit.

Every registered activation, every ``mlp=`` choice and every S-KAN stage (pruned included) is built by the main job
(``lit_act.training.train`` on a composed Hydra config), trained a few real steps, saved, reloaded with nothing but
the checkpoint path, and compared on the same input in eval mode with ``torch.equal``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from lit_act.activations import available, build
from lit_act.data import DigitsDataModule
from lit_act.kan import LAYERS, SKANLinear
from lit_act.models import MLPClassifier
from lit_act.models.base import activation_spec
from lit_act.training import train
from tests.helpers import CONF_DIR, compose_train

TINY = {
    "mlp": ["data=digits", "data.batch_size=16", "model=mlp", "model.hidden=[16,16]"],
    "cnn": ["data=digits", "data.batch_size=16", "model=cnn", "model.channels=[4,8]"],
    "transformer": ["data=pysource", "model=transformer", "data.max_chars=20000", "data.block_size=8",
                    "data.batch_size=4", "model.d_model=16", "model.n_layer=1", "model.n_head=2"],
    "student": ["data=teacher_student", "model=student", "data.n_train=64", "data.n_val=16", "data.n_test=16",
                "data.batch_size=16", "model.hidden_neurons=3"],
}
# activations whose config needs the width of the layer they follow
WIDTH_ARGS = {"group_rational": {"mlp": "activation.num_features=16", "transformer": "activation.num_features=64"}}


def _fit(tmp_path: Path, overrides: list[str], steps: int = 3):
    """The main job for ``steps`` optimizer steps (no validation, no callbacks unless given), then a checkpoint."""
    cfg = compose_train(tmp_path, ["callbacks=none", "test=false", "optimized_metric=train/loss",
                                   f"++trainer.max_steps={steps}", "++trainer.limit_val_batches=0",
                                   "++trainer.enable_progress_bar=false", *overrides])
    try:
        _, objects = train(cfg)
    finally:
        HydraConfig.instance().cfg = None
    path = tmp_path / "model.ckpt"
    objects["trainer"].save_checkpoint(path)
    return objects["model"], objects["datamodule"], path


def _probe(datamodule) -> torch.Tensor:
    return next(iter(datamodule.train_dataloader()))[0]


def _assert_reloads(model, datamodule, path: Path):
    reloaded = type(model).load_from_checkpoint(path)
    assert str(reloaded) == str(model)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    model.eval(), reloaded.eval()
    x = _probe(datamodule)
    with torch.no_grad():
        expected, got = model(x), reloaded(x)
    assert torch.equal(got, expected), (got - expected).abs().max()
    return reloaded


def _activation_overrides(name: str, model: str) -> list[str]:
    if (Path(CONF_DIR) / "activation" / f"{name}.yaml").exists():
        extra = WIDTH_ARGS.get(name, {}).get(model)
        return [f"activation={name}", *([extra] if extra else [])]
    return [f"activation={{_target_: lit_act.activations.build, _partial_: true, name: {name}}}"]


@pytest.mark.parametrize("name", available())
def test_every_activation_reloads(tmp_path, name):
    model, datamodule, path = _fit(tmp_path, [*TINY["mlp"], *_activation_overrides(name, "mlp")])
    assert torch.load(path, weights_only=False)["hyper_parameters"]["activation"] == model.hparams.activation
    reloaded = _assert_reloads(model, datamodule, path)
    acts = [type(b.act).__name__ for b in reloaded.hidden]
    assert acts == [type(build(name, **({"num_features": 16} if name == "group_rational" else {}))).__name__] * 2


@pytest.mark.parametrize("model_name,activation", [
    ("cnn", "gelu"), ("cnn", "pau"), ("transformer", "relu"), ("transformer", "group_rational"),
    ("transformer", "poly_norm"), ("student", "tanh"), ("student", "crrelu"),
])
def test_every_model_reloads(tmp_path, model_name, activation):
    model, datamodule, path = _fit(tmp_path, [*TINY[model_name], *_activation_overrides(activation, model_name)])
    _assert_reloads(model, datamodule, path)


@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_every_mlp_choice_reloads(tmp_path, model_name, layer):
    model, datamodule, path = _fit(tmp_path, [*TINY[model_name], f"mlp={layer}"])
    assert model.hparams.mlp["layer"] == layer
    kan_layers = [m for m in model.modules() if isinstance(m, LAYERS[layer])]
    assert kan_layers, f"mlp={layer} did not kanify the {model_name}"
    reloaded = _assert_reloads(model, datamodule, path)
    assert len([m for m in reloaded.modules() if isinstance(m, LAYERS[layer])]) == len(kan_layers)


def _skan_stages(full: int, selective: int) -> list[str]:
    return ["callbacks=skan_stages", f"callbacks.skan_stages.full_epochs={full}",
            f"callbacks.skan_stages.selective_epochs={selective}", "++trainer.max_steps=-1", "++trainer.limit_train_batches=2"]


@pytest.mark.parametrize("epochs,stage,temperature", [
    (1, "full", 1.0),
    (3, "selective", 0.05 ** 0.5),  # second of three selective epochs: tau = tau_min ** (1 / 2)
    (5, "pruned", None),
])
def test_skan_every_stage_reloads(tmp_path, epochs, stage, temperature):
    model, datamodule, path = _fit(tmp_path, [*TINY["mlp"], "mlp=skan", *_skan_stages(1, 3),
                                              f"trainer.max_epochs={epochs}"])
    layers = [m for m in model.modules() if isinstance(m, SKANLinear)]
    assert {m.stage for m in layers} == {stage}
    if temperature is not None:
        assert layers[0].temperature == pytest.approx(temperature)
    reloaded = _assert_reloads(model, datamodule, path)
    for saved, loaded in zip(layers, [m for m in reloaded.modules() if isinstance(m, SKANLinear)], strict=True):
        assert (loaded.stage, loaded.temperature) == (saved.stage, saved.temperature)
        assert torch.equal(loaded.chosen, saved.chosen)
        assert list(loaded.coefficients) == list(saved.coefficients)
        if stage == "pruned":
            assert loaded.selection_logits is None
            for s in saved.coefficients:
                assert torch.equal(getattr(loaded, f"nodes_{s}"), getattr(saved, f"nodes_{s}"))


def test_pruned_skan_checkpoint_resumes_training(tmp_path):
    """``Trainer.fit(ckpt_path=...)`` on a freshly built (unpruned) model: the state dict prunes it, the optimizer
    is rebuilt on the pruned parameters, and training goes on."""
    model, datamodule, path = _fit(tmp_path, [*TINY["mlp"], "mlp=skan", *_skan_stages(1, 1), "trainer.max_epochs=3"])
    fresh = MLPClassifier(**{k: v for k, v in model.hparams.items()})
    assert {m.stage for m in fresh.modules() if isinstance(m, SKANLinear)} == {"full"}
    trainer = L.Trainer(max_epochs=4, limit_train_batches=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(fresh, datamodule=datamodule, ckpt_path=path)
    assert {m.stage for m in fresh.modules() if isinstance(m, SKANLinear)} == {"pruned"}
    assert trainer.global_step == 8
    assert not torch.equal(fresh.head.weight, model.head.weight)  # it trained on


def test_activation_spec_records_something_reconstructible():
    assert activation_spec("gelu") == "gelu"
    assert activation_spec(torch.nn.GELU) == "gelu"
    assert activation_spec(torch.nn.Hardswish) == "torch.nn.modules.activation.Hardswish"
    assert activation_spec(functools.partial(build, name="topk", k=3, activation="relu")) == {
        "name": "topk", "k": 3, "activation": "relu"}
    assert activation_spec(functools.partial(torch.nn.LeakyReLU, negative_slope=0.2)) == {
        "name": "torch.nn.modules.activation.LeakyReLU", "negative_slope": 0.2}
    with pytest.warns(UserWarning, match="could not be recorded"):
        assert activation_spec(lambda: torch.nn.ReLU()) is None


@pytest.mark.parametrize("activation", [torch.nn.Hardswish, functools.partial(torch.nn.LeakyReLU, negative_slope=0.3)])
def test_class_and_partial_activations_reload(tmp_path, activation):
    model = MLPClassifier(64, 10, hidden=(8,), activation=activation)
    dm = DigitsDataModule(batch_size=16)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = _assert_reloads(model, dm, tmp_path / "m.ckpt")
    assert str(reloaded.hidden[0].act) == str(model.hidden[0].act)


def test_unrecordable_activation_fails_clearly_on_reload(tmp_path):
    with pytest.warns(UserWarning, match="could not be recorded"):
        model = MLPClassifier(64, 10, hidden=(8,), activation=lambda: torch.nn.ReLU())
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": L.__version__}, tmp_path / "m.ckpt")
    with pytest.raises(ValueError, match="pass it again"):
        MLPClassifier.load_from_checkpoint(tmp_path / "m.ckpt")
    reloaded = MLPClassifier.load_from_checkpoint(tmp_path / "m.ckpt", activation="relu")
    assert torch.equal(reloaded.hidden[0].linear.weight, model.hidden[0].linear.weight)


def test_checkpoints_load_without_pickled_code(tmp_path):
    """The hyperparameters are plain data: the checkpoint loads with ``weights_only=True``."""
    _, _, path = _fit(tmp_path, [*TINY["mlp"], "activation=rational", "mlp=kan"])
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["activation"] == {"name": "rational", "degrees": [5, 4], "version": "A", "init": "leaky_relu",
                                     "sharing": "layer", "backend": "auto"}
    assert hparams["mlp"] == {"layer": "kan", "match": ["**.mlp", "hidden.*"], "hidden": None, "grid_size": 5,
                              "spline_order": 3, "grid_range": [-1.0, 1.0]}


class NoMLPArgument(MLPClassifier):
    """A model without an ``mlp`` argument, like a user's own LightningModule."""

    def __init__(self, in_features: int, num_classes: int, hidden=(16,), activation="relu", dropout=0.0,
                 batch_norm=False, lr=1e-3, weight_decay=0.0) -> None:
        super().__init__(in_features, num_classes, hidden, activation, dropout, batch_norm, lr, weight_decay)


def test_main_job_kanifies_other_models_after_construction(tmp_path):
    model, _, _ = _fit(tmp_path, [*TINY["mlp"], f"model._target_={__name__}.NoMLPArgument", "mlp=fourier_kan"])
    assert model.hparams.mlp is None
    assert [type(b.linear).__name__ for b in model.hidden] == ["FourierKANLinear", "FourierKANLinear"]
