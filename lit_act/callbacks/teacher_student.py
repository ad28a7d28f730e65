"""``TeacherStudentMatch``: does each student neuron copy one teacher neuron or average several?"""

from __future__ import annotations

import math

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lit_act.analysis.teacher_student import CopyAverageResult, NeuronMatch, check_rule, classify_students
from lit_act.callbacks.core import LitActCallback
from lit_act.utils import validate as v
from lit_act.utils.schedule import is_real_run

PREFIX = "teacher_student/"


class TeacherStudentMatch(LitActCallback):
    """Classify every student neuron's incoming vector as a copy of one teacher neuron, an average of several, or
    other, by cosine similarity (:func:`lit_act.analysis.teacher_student.classify_students`; Şimşek et al.,
    NeurIPS 2023, "Should Under-parameterized Student Networks Copy or Average Teacher Weights?").

    The student's incoming vectors are the rows of the parameter ``student_weight`` of the LightningModule
    (``hidden.weight``, ``(n, d)``, for :class:`lit_act.models.StudentNetwork`); the teacher's are
    ``teacher_weights`` or, by default, ``trainer.datamodule.teacher.w`` (``(k, d)``, as in
    :class:`lit_act.data.TeacherStudentDataModule`). The analysis reads weights only, so it is the same on every DDP
    rank and needs no reduction; it keeps no state between epochs (nothing to checkpoint).

    Logged keys (to the loggers and ``trainer.callback_metrics`` at the end of every validation epoch, not in the
    sanity check or ``fast_dev_run``):

    * ``teacher_student/copy_fraction``, ``teacher_student/average_fraction``, ``teacher_student/other_fraction``:
      fractions of student neurons of each kind;
    * ``teacher_student/max_cos/neuron_{i}``: largest cosine of student neuron ``i`` to a single teacher vector;
    * ``teacher_student/match_cos/neuron_{i}``: its cosine with the matched direction (the copied teacher vector or
      the averaged group's sum; NaN for other);
    * ``teacher_student/teachers/neuron_{i}``: number of teacher neurons it matches (1 copy, >= 2 average, 0 other);
    * ``teacher_student/{max_cos,match_cos,teachers}/mean``: their means over student neurons (``match_cos`` over the
      matched neurons only; NaN when none matches).

    At the end of fit (rank zero): the classification is printed and kept in :attr:`result`, and the cosine matrix is
    saved as the heatmap ``figures/teacher_student_cosine.png`` (and a W&B image) via
    :func:`lit_act.utils.figures.save_figure`.

    Args:
        student_weight: name of the student's incoming-weight parameter (``(n, d)``).
        teacher_weights: teacher incoming vectors ``(k, d)``; ``None`` reads ``trainer.datamodule.teacher.w``.
        copy_threshold, copy_margin, average_threshold, sign_symmetric: the classification rule's settings
            (:func:`~lit_act.analysis.teacher_student.classify_students`); use ``sign_symmetric=True`` for odd
            activations (erf, tanh), where a neuron ``(-w, -a)`` computes the same as ``(w, a)``.
        figures: save the heatmap at the end of fit.
    """

    def __init__(self, student_weight: str = "hidden.weight", teacher_weights: Tensor | None = None,
                 copy_threshold: float = 0.9, copy_margin: float = 0.2, average_threshold: float = 0.9,
                 sign_symmetric: bool = False, figures: bool = True) -> None:
        if not isinstance(student_weight, str) or not student_weight:
            raise v.ConfigError(f"student_weight={student_weight!r}: expected a parameter name such as 'hidden.weight'")
        copy_threshold = v.finite_float("copy_threshold", copy_threshold, low=-1.0, high=1.0)
        average_threshold = v.finite_float("average_threshold", average_threshold, low=-1.0, high=1.0)
        copy_margin = v.finite_float("copy_margin", copy_margin, low=0.0)
        sign_symmetric = v.boolean("sign_symmetric", sign_symmetric)
        super().__init__(figures=figures)
        self.student_weight = student_weight
        self.teacher_weights = teacher_weights
        check_rule(copy_threshold, copy_margin, average_threshold)
        self.rule = {"copy_threshold": copy_threshold, "copy_margin": copy_margin,
                     "average_threshold": average_threshold, "sign_symmetric": sign_symmetric}
        self.result: CopyAverageResult | None = None

    def _teacher(self, trainer: Trainer) -> Tensor:
        if self.teacher_weights is not None:
            return torch.as_tensor(self.teacher_weights)
        teacher = getattr(getattr(trainer, "datamodule", None), "teacher", None)
        if teacher is None or not hasattr(teacher, "w"):
            raise RuntimeError("TeacherStudentMatch needs the teacher's incoming vectors: fit with a datamodule that has "
                               "`.teacher.w` (k, d) (lit_act.data.TeacherStudentDataModule) or pass "
                               "TeacherStudentMatch(teacher_weights=...)")
        return teacher.w

    def _student(self, pl_module: LightningModule) -> Tensor:
        try:
            return pl_module.get_parameter(self.student_weight)
        except AttributeError as err:
            matrices = [name for name, p in pl_module.named_parameters() if p.ndim == 2]
            raise ValueError(f"TeacherStudentMatch: {type(pl_module).__name__} has no parameter "
                             f"{self.student_weight!r}; its 2-D parameters are {matrices}. Set student_weight= to "
                             "the student's incoming weight (n, d).") from err

    def analyse(self, trainer: Trainer, pl_module: LightningModule) -> CopyAverageResult:
        """Classify the current student weights (see the class docstring)."""
        return classify_students(self._student(pl_module), self._teacher(trainer), **self.rule)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        student, teacher = self._student(pl_module), self._teacher(trainer)
        if student.ndim != 2 or teacher.ndim != 2 or student.shape[1] != teacher.shape[1]:
            raise ValueError(f"TeacherStudentMatch: student {self.student_weight} {tuple(student.shape)} and teacher "
                             f"{tuple(teacher.shape)} must be (n, d) and (k, d) with the same input dimension d")

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not is_real_run(trainer):
            return
        result = self.analyse(trainer, pl_module)
        metrics = {f"{PREFIX}{kind}_fraction": result.fraction(kind) for kind in ("copy", "average", "other")}
        per_neuron = {"max_cos": [n.max_cosine for n in result.neurons],
                      "match_cos": [n.match_cosine for n in result.neurons],
                      "teachers": [float(len(n.teachers)) for n in result.neurons]}
        for statistic, values in per_neuron.items():
            metrics.update({f"{PREFIX}{statistic}/neuron_{i}": value for i, value in enumerate(values)})
            finite = [v for v in values if not math.isnan(v)]
            metrics[f"{PREFIX}{statistic}/mean"] = sum(finite) / len(finite) if finite else math.nan
        self.log_metrics(trainer, metrics, trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        self.result = self.analyse(trainer, pl_module)
        lines = [f"student neuron {i}: {describe(n)}" for i, n in enumerate(self.result.neurons)]
        rank_zero_info("TeacherStudentMatch:\n  " + "\n  ".join(lines))
        if self.figures and is_real_run(trainer):
            self.save_figure(trainer, cosine_heatmap(self.result, self.rule["sign_symmetric"],
                                                     trainer.current_epoch), "teacher_student_cosine")


def describe(neuron: NeuronMatch) -> str:
    """``copy of teacher 2 (cos 0.98)``, ``average of teachers 0, 3 (cos 0.95)`` or ``other (max cos 0.61)``."""
    if neuron.kind == "copy":
        return f"copy of teacher {neuron.teachers[0]} (cos {neuron.match_cosine:.2f})"
    if neuron.kind == "average":
        return f"average of teachers {', '.join(map(str, neuron.teachers))} (cos {neuron.match_cosine:.2f})"
    return f"other (max cos {neuron.max_cosine:.2f})"


def cosine_heatmap(result: CopyAverageResult, sign_symmetric: bool, epoch: int):
    """Heatmap of the student x teacher cosine matrix, each row labelled with its classification."""
    import matplotlib.pyplot as plt

    cosine = result.cosine.cpu().numpy()
    n, k = cosine.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k + 3.0, 1.0 + 0.45 * n))
    image = ax.imshow(cosine, cmap="viridis" if sign_symmetric else "RdBu_r", vmin=0.0 if sign_symmetric else -1.0,
                      vmax=1.0, aspect="auto")
    for i in range(n):
        for j in range(k):
            ax.text(j, i, f"{cosine[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if sign_symmetric and cosine[i, j] < 0.6 else "black")
    ax.set_xticks(range(k), [f"T{j}" for j in range(k)])
    ax.set_yticks(range(n), [f"S{i}: {describe(neuron)}" for i, neuron in enumerate(result.neurons)], fontsize=8)
    ax.set_xlabel("teacher neuron (incoming vector)")
    ax.set_ylabel("student neuron: classification")
    ax.set_title(f"Student-teacher cosine similarity{' |cos|' if sign_symmetric else ''} after {epoch} epochs")
    fig.colorbar(image, ax=ax, label="cosine similarity (unitless)")
    return fig
