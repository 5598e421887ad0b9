"""Weight-normalized layers and the building blocks of the Multiface DAM family.

Parameter names match the public Multiface checkpoints (``weight``, ``bias``, ``g``;
``conv1.deconv``, ``conv1.bias``, ``res1`` ...), so their state_dicts load unchanged.

Weight normalization: w_eff = W * g / ||W||_F with the Frobenius norm over the WHOLE
weight tensor and g one entry per output channel (dim 0 of Linear/Conv weights, dim 1 of
ConvTranspose weights [Cin, Cout, kH, kW]).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LEAKY_SLOPE = 0.2


def _weight_norm(weight: torch.Tensor, g: torch.Tensor, out_dim: int) -> torch.Tensor:
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    return weight * g.view(shape) / torch.sqrt(torch.sum(weight**2))


class _WeightNormed:
    """Whole-tensor weight normalization: weight * g / ||weight||, g [C_out] along
    ``G_DIM`` of the weight (a mixin of the layers below; Multiface's parameter names)."""

    G_DIM = 0
    weight: torch.Tensor
    g: torch.Tensor

    def _add_gain(self, out_channels: int) -> None:
        self.g = nn.Parameter(torch.ones(out_channels))

    def effective_weight(self) -> torch.Tensor:
        return _weight_norm(self.weight, self.g, self.G_DIM)


class LinearWN(_WeightNormed, nn.Linear):
    """Linear layer with whole-tensor weight normalization. x [B, in] -> [B, out]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=True)
        self._add_gain(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class Conv2dWN(_WeightNormed, nn.Conv2d):
    """Conv2d with whole-tensor weight normalization; bias always present."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0):
        super().__init__(cin, cout, kernel, stride, padding, bias=True)
        self._add_gain(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding)


class ConvTranspose2dWN(_WeightNormed, nn.ConvTranspose2d):
    """ConvTranspose2d with whole-tensor weight normalization (g along weight dim 1)."""

    G_DIM = 1

    def __init__(self, cin: int, cout: int, kernel: int = 4, stride: int = 2, padding: int = 1):
        super().__init__(cin, cout, kernel, stride, padding, bias=True)
        self._add_gain(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.effective_weight(), self.bias, self.stride, self.padding)


class DeconvTexelBias(nn.Module):
    """x2 upsampling layer followed by an untied bias.

    [B, cin, H, W] -> [B, cout, 2H, 2W]. ``deconv`` is a ConvTranspose2d(k4, s2, p1), or for
    the ``bilinear`` variant a nearest x2 upsample followed by a 3x3 Conv2d. ``bias`` is
    [1, cout, 2H, 2W] (untied texel bias) or [1, cout, 1, 1] for the ``non`` variant.
    """

    def __init__(
        self, cin: int, cout: int, out_size: int, bilinear: bool = False, non: bool = False
    ) -> None:
        super().__init__()
        self.bilinear = bilinear
        if bilinear:
            self.deconv: nn.Module = Conv2dWN(cin, cout, 3, 1, 1)
        else:
            self.deconv = ConvTranspose2dWN(cin, cout, 4, 2, 1)
        bias_size = 1 if non else out_size
        self.bias = nn.Parameter(torch.zeros(1, cout, bias_size, bias_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bilinear:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.deconv(x) + self.bias


class _TwoConvs(nn.Module):
    """``conv1`` then ``conv2``, LeakyReLU after each unless ``no_activ`` (then none after the
    second); with ``res`` a 3x3 residual conv (``res1``, ``res2``) after each."""

    no_activ = False
    res = False

    def _add_residuals(self, chidden: int, cout: int) -> None:
        self.res = True
        self.res1 = Conv2dWN(chidden, chidden, 3, 1, 1)
        self.res2 = Conv2dWN(cout, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), LEAKY_SLOPE)
        if self.res:
            h = F.leaky_relu(self.res1(h) + h, LEAKY_SLOPE)
        h = self.conv2(h)
        if not self.no_activ:
            h = F.leaky_relu(h, LEAKY_SLOPE)
        if self.res:
            h = self.res2(h) + h
            if not self.no_activ:
                h = F.leaky_relu(h, LEAKY_SLOPE)
        return h


class ConvUpsample(_TwoConvs):
    """Two DeconvTexelBias layers (x4 in total), LeakyReLU after each unless ``no_activ``
    (then none after the second); ``res`` adds a 3x3 residual conv after each."""

    def __init__(
        self,
        cin: int,
        chidden: int,
        cout: int,
        in_size: int,
        no_activ: bool = False,
        res: bool = False,
        bilinear: bool = False,
        non: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = DeconvTexelBias(cin, chidden, in_size * 2, bilinear, non)
        self.conv2 = DeconvTexelBias(chidden, cout, in_size * 4, bilinear, non)
        self.no_activ = no_activ
        if res:
            self._add_residuals(chidden, cout)


class ConvDownsample(_TwoConvs):
    """Two Conv2dWN(k4, s2, p1) with LeakyReLU (/4 in total); ``res`` adds 3x3 residuals."""

    def __init__(self, cin: int, chidden: int, cout: int, res: bool = False) -> None:
        super().__init__()
        self.conv1 = Conv2dWN(cin, chidden, 4, 2, 1)
        self.conv2 = Conv2dWN(chidden, cout, 4, 2, 1)
        if res:
            self._add_residuals(chidden, cout)
