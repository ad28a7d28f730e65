"""MLP classifier: ``hidden.N.linear -> hidden.N.act`` blocks and a ``head`` returning logits."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lit_act.models.base import ActivationSpec, LitActModule, MLPSpec
from lit_act.utils import validate as v


class MLPBlock(nn.Module):
    """``linear -> act`` (-> dropout); named so callbacks can target ``hidden.N.act``."""

    def __init__(self, in_features: int, out_features: int, act: nn.Module, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.act = act
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.act(self.linear(x)))


class MLPClassifier(LitActModule):
    """Fully connected classifier on flattened inputs; ``forward`` returns logits ``(B, num_classes)``.

    Args:
        in_features: flattened input size (filled from the datamodule when ``None``).
        num_classes: number of classes (filled from the datamodule when ``None``).
        hidden: widths of the hidden layers.
        activation: activation name, class or factory (one fresh module per hidden layer).
        dropout: dropout after each activation.
        batch_norm: insert ``BatchNorm1d`` between each hidden ``linear`` and ``act``.
        mlp: ``kanify`` arguments applied to the model at the end of ``__init__`` (``mlp=kan`` etc., see
            :func:`~lit_act.models.base.mlp_spec`); recorded in the hyperparameters so checkpoints reload alone.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 128),
                 activation: ActivationSpec = "relu", dropout: float = 0.0, batch_norm: bool = False,
                 lr: float = 1e-3, weight_decay: float = 0.0, cosine_schedule: bool = False,
                 mlp: MLPSpec = None) -> None:
        v.positive_int("in_features", in_features), v.positive_int("num_classes", num_classes)
        v.positive_int_sequence("hidden", hidden, allow_empty=True)
        v.finite_float("dropout", dropout, low=0.0, high=1.0, high_open=True), v.boolean("batch_norm", batch_norm)
        super().__init__(lr=lr, weight_decay=weight_decay, cosine_schedule=cosine_schedule)
        mlp = self.record_hyperparameters(activation, mlp)
        widths = [in_features, *hidden]
        blocks = []
        for i in range(len(hidden)):
            act = self.activation_factory()
            if batch_norm:
                act = nn.Sequential(nn.BatchNorm1d(widths[i + 1]), act)
            blocks.append(MLPBlock(widths[i], widths[i + 1], act, dropout))
        self.hidden = nn.ModuleList(blocks)
        self.head = nn.Linear(widths[-1], num_classes)
        self.apply_mlp(mlp)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for block in self.hidden:
            x = block(x)
        return self.head(x)
