"""Copy / average classification of student neurons (Şimşek et al., NeurIPS 2023) and the teacher_student experiment."""

import math

import lightning as L
import pytest
import torch
from hydra.core.hydra_config import HydraConfig

from lit_act.analysis.teacher_student import classify_students, cosine_matrix
from lit_act.callbacks.teacher_student import PREFIX, TeacherStudentMatch
from lit_act.data import TeacherStudentDataModule
from lit_act.models import StudentNetwork
from lit_act.training import optimized_metric, train
from tests.helpers import compose_train


def orthonormal_teacher(k: int = 4, d: int = 6, scale: float = 3.0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    return q.T[:k] * scale  # k orthogonal rows of norm `scale`


def plain_cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_cosine_matrix_matches_plain_formula():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 5, generator=g), torch.randn(4, 5, generator=g)
    cos = cosine_matrix(student, teacher)
    for i in range(3):
        for j in range(4):
            assert cos[i, j].item() == pytest.approx(plain_cosine(student[i].tolist(), teacher[j].tolist()), abs=1e-12)


def test_copy_average_other_on_constructed_students():
    t = orthonormal_teacher()
    unit = t / t.norm(dim=1, keepdim=True)
    complement = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0)))[0].T[5]
    noise = 0.05 * torch.randn(6, generator=torch.Generator().manual_seed(2))
    student = torch.stack([
        2.5 * t[2],                                   # copy of teacher 2
        (unit[0] + unit[1]) / math.sqrt(2) * 0.7,     # normalised sum of two orthonormal teachers: average
        unit[0] + unit[1] + unit[3] + noise,          # noisy average of three
        complement,                                   # orthogonal to every teacher: other
    ])
    result = classify_students(student, t)
    kinds = [(n.kind, n.teachers) for n in result.neurons]
    assert kinds == [("copy", (2,)), ("average", (0, 1)), ("average", (0, 1, 3)), ("other", ())]
    assert result.neurons[0].match_cosine == pytest.approx(1.0, abs=1e-6)
    assert result.neurons[0].second_cosine == pytest.approx(0.0, abs=1e-6)
    assert result.neurons[1].match_cosine == pytest.approx(1.0, abs=1e-6)
    assert result.neurons[1].max_cosine == pytest.approx(1 / math.sqrt(2), abs=1e-6)
    # for orthogonal teachers the group cosine is sum_j C[i, j] / sqrt(m); check against a plain computation
    direction = (unit[0] + unit[1] + unit[3]).tolist()
    assert result.neurons[2].match_cosine == pytest.approx(plain_cosine(student[2].tolist(), direction), abs=1e-6)
    assert result.neurons[3].max_cosine == pytest.approx(0.0, abs=1e-6) and math.isnan(result.neurons[3].match_cosine)
    assert result.fraction("copy") == 0.25 and result.fraction("average") == 0.5 and result.fraction("other") == 0.25


def test_sign_symmetric_folds_negated_copies():
    t = orthonormal_teacher()
    student = torch.stack([-t[1], -(t[0] / 3 + t[2] / 3)])
    plain = classify_students(student, t)
    folded = classify_students(student, t, sign_symmetric=True)
    assert [n.kind for n in plain.neurons] == ["other", "other"]
    assert [(n.kind, n.teachers) for n in folded.neurons] == [("copy", (1,)), ("average", (0, 2))]
    assert folded.cosine.min() >= 0


def test_copy_needs_a_margin_over_the_second_teacher():
    # two teacher vectors with cosine 0.95: a student equal to the first is ambiguous, not a copy
    t = torch.tensor([[1.0, 0.0, 0.0], [0.95, math.sqrt(1 - 0.95 ** 2), 0.0], [0.0, 0.0, 1.0]])
    result = classify_students(t[:1], t, copy_margin=0.2)
    assert result.neurons[0].kind == "average" and result.neurons[0].teachers == (0, 1)
    assert result.neurons[0].match_cosine == pytest.approx(math.sqrt((1 + 0.95) / 2), abs=1e-6)
    assert classify_students(t[:1], t, copy_margin=0.01).neurons[0].kind == "copy"


@pytest.mark.parametrize("kwargs, message", [({"copy_threshold": 1.5}, "copy_threshold"),
                                             ({"copy_margin": -0.1}, "copy_margin")])
def test_bad_rule_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        classify_students(torch.eye(2), torch.eye(2), **kwargs)
    with pytest.raises(ValueError, match=message):
        TeacherStudentMatch(**kwargs)


def test_bad_shapes_and_zero_vectors_raise():
    with pytest.raises(ValueError, match="same d"):
        cosine_matrix(torch.ones(2, 3), torch.ones(4, 5))
    with pytest.raises(ValueError, match="zero"):
        cosine_matrix(torch.zeros(1, 3), torch.ones(4, 3))


def _fit(tmp_path, callback, dm, model, **trainer_kw):
    trainer = L.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], **trainer_kw)
    trainer.fit(model, datamodule=dm)
    return trainer


def test_callback_logs_the_classification_and_saves_the_heatmap(tmp_path):
    dm = TeacherStudentDataModule(input_dim=6, teacher_neurons=4, orthonormal=True, n_train=64, n_val=32, n_test=32,
                                  batch_size=32)
    model = StudentNetwork(in_features=6, hidden_neurons=2, lr=1e-9)
    unit = dm.teacher.w / dm.teacher.w.norm(dim=1, keepdim=True)
    with torch.no_grad():
        model.hidden.weight.copy_(torch.stack([dm.teacher.w[3], unit[0] + unit[1] + unit[2]]))
    callback = TeacherStudentMatch()
    trainer = _fit(tmp_path, callback, dm, model)
    logged = trainer.callback_metrics
    assert logged[f"{PREFIX}copy_fraction"] == 0.5 and logged[f"{PREFIX}average_fraction"] == 0.5
    assert logged[f"{PREFIX}other_fraction"] == 0.0
    assert logged[f"{PREFIX}teachers/neuron_0"] == 1 and logged[f"{PREFIX}teachers/neuron_1"] == 3
    assert logged[f"{PREFIX}teachers/mean"] == 2
    assert logged[f"{PREFIX}match_cos/neuron_1"] == pytest.approx(1.0, abs=1e-4)
    expected = classify_students(model.hidden.weight, dm.teacher.w)
    assert logged[f"{PREFIX}max_cos/mean"] == pytest.approx(
        sum(n.max_cosine for n in expected.neurons) / 2, abs=1e-6)
    assert [n.kind for n in callback.result.neurons] == ["copy", "average"]
    assert (tmp_path / "figures" / "teacher_student_cosine.png").stat().st_size > 0


def test_callback_errors_name_the_fix(tmp_path):
    dm = TeacherStudentDataModule(input_dim=6, n_train=64, n_val=32, n_test=32, batch_size=32)
    with pytest.raises(ValueError, match=r"no parameter 'fc.weight'.*\['hidden.weight', 'head.weight'\]"):
        _fit(tmp_path, TeacherStudentMatch(student_weight="fc.weight"), dm, StudentNetwork(in_features=6))
    with pytest.raises(RuntimeError, match="teacher_weights="):
        _fit(tmp_path, TeacherStudentMatch(), None, StudentNetwork(in_features=6), )
    with pytest.raises(ValueError, match="same input dimension"):
        _fit(tmp_path, TeacherStudentMatch(teacher_weights=torch.ones(3, 5)), dm, StudentNetwork(in_features=6))


def test_experiment_runs_with_fast_dev_run(tmp_path):
    cfg = compose_train(tmp_path, ["experiment=teacher_student", "debug=fdr"])
    assert cfg.optimized_metric == "val/loss" and cfg.callbacks.model_checkpoint.mode == "min"
    metrics, objects = train(cfg)
    assert math.isfinite(optimized_metric(cfg, metrics))
    assert any(isinstance(c, TeacherStudentMatch) for c in objects["trainer"].callbacks)
    HydraConfig.instance().cfg = None
