"""Small CNN classifier: ``features.N.{conv,bn,act}`` stages, global average pooling and a ``head``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lit_act.models.base import ActivationSpec, LitActModule, MLPSpec
from lit_act.utils import validate as v


class ConvBlock(nn.Module):
    """``conv(3x3) -> bn -> act`` (-> 2x2 max-pool when ``pool``)."""

    def __init__(self, in_channels: int, out_channels: int, act: nn.Module, pool: bool, batch_norm: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batch_norm)
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.act = act
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.bn(self.conv(x))))


class CNNClassifier(LitActModule):
    """Convolutional classifier on ``(B, C, H, W)`` images; ``forward`` returns logits ``(B, num_classes)``.

    Args:
        in_channels: image channels (filled from the datamodule when ``None``).
        num_classes: number of classes (filled from the datamodule when ``None``).
        channels: output channels of each conv stage; every stage but the last halves the resolution.
        activation: activation name, class or factory.
        batch_norm: BatchNorm after each convolution.
        mlp: ``kanify`` arguments applied to the model at the end of ``__init__`` (``mlp=kan`` etc., see
            :func:`~lit_act.models.base.mlp_spec`); recorded in the hyperparameters so checkpoints reload alone.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: Sequence[int] = (16, 32),
                 activation: ActivationSpec = "relu", batch_norm: bool = True, lr: float = 2e-3,
                 weight_decay: float = 0.0, cosine_schedule: bool = False,
                 mlp: MLPSpec = None) -> None:
        v.positive_int("in_channels", in_channels), v.positive_int("num_classes", num_classes)
        v.positive_int_sequence("channels", channels), v.boolean("batch_norm", batch_norm)
        super().__init__(lr=lr, weight_decay=weight_decay, cosine_schedule=cosine_schedule)
        mlp = self.record_hyperparameters(activation, mlp)
        widths = [in_channels, *channels]
        self.features = nn.ModuleList(
            ConvBlock(widths[i], widths[i + 1], self.activation_factory(), pool=i < len(channels) - 1,
                      batch_norm=batch_norm)
            for i in range(len(channels))
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        self.apply_mlp(mlp)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.features:
            x = block(x)
        return self.head(self.pool(x).flatten(1))
