"""Two-layer student network for teacher-student regression (soft committee machine)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.models.base import ActivationSpec, LitActModule, MLPSpec
from lit_act.utils import validate as v


class StudentNetwork(LitActModule):
    """``y = head(act(hidden(x) / sqrt(d)))`` with ``n`` hidden neurons, trained by mean squared error.

    ``hidden.weight`` rows are the student's incoming vectors, compared with the teacher's
    (``TeacherStudentDataModule.teacher.w``) to tell copying from averaging (Simsek et al., NeurIPS 2023).
    ``forward`` returns predictions ``(B, 1)``; logged keys ``{stage}/loss`` (MSE). ``activation`` and ``mlp`` as
    in :class:`~lit_act.models.MLPClassifier`.
    """

    log_accuracy = False

    def __init__(self, in_features: int, hidden_neurons: int = 2, activation: ActivationSpec = "erf",
                 lr: float = 1e-2, weight_decay: float = 0.0, cosine_schedule: bool = False,
                 mlp: MLPSpec = None) -> None:
        v.positive_int("in_features", in_features), v.positive_int("hidden_neurons", hidden_neurons)
        super().__init__(lr=lr, weight_decay=weight_decay, cosine_schedule=cosine_schedule)
        mlp = self.record_hyperparameters(activation, mlp)
        self.hidden = nn.Linear(in_features, hidden_neurons, bias=False)
        self.act = self.activation_factory()
        self.head = nn.Linear(hidden_neurons, 1, bias=False)
        self.scale = 1.0 / math.sqrt(in_features)
        self.apply_mlp(mlp)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act(self.hidden(x) * self.scale))

    def loss(self, prediction: Tensor, targets: Tensor) -> Tensor:
        """Mean squared error."""
        return F.mse_loss(prediction.squeeze(-1), targets)
