"""`FakeQuantDecoder`: the deployed numerics of a calibration, in torch, for validation."""

from __future__ import annotations

import copy

import torch
from torch import nn

from avatarq.calibration.artifact import CalibrationArtifact
from avatarq.calibration.layers import get_layer, install


class FakeQuantDecoder(nn.Module):
    """The decoder's inputs (z float32 [B, Z], view float32 [B, 3] for a DAM) -> its outputs
    (texture, vertices for a DAM) float32, computed the way the Q/DQ ONNX of ``artifact``
    computes them.

    Smoothing scales are folded in and the texel biases rounded to their storage format
    first. Each quantized layer (rotating its input first when it is rotated) quantizes
    its input per tensor (QuantizeLinear then DequantizeLinear, round half to even,
    saturating; an integer grid below 8 bits clips first; FP8 rounds to E4M3) and
    multiplies its weight codes by their per-output-channel or per-block scales; biases and
    activations stay float32. fp16 layers round their input, weight, bias and output to
    float16. The remaining differences to an ONNX runtime are float accumulation order,
    which can move a value across a rounding boundary of the next quantizer.

    ``decoder`` (a deployable decoder with a declaration) is copied, never changed; ``artifact`` is validated
    against it first (AvatarqError on a mismatch). ``conv_transpose_axis`` must match the
    graph's (`avatarq.export.qdq.QDQConfig`): 1 (calibrated), 0 or None (re-derived).
    """

    def __init__(
        self,
        decoder: nn.Module,
        artifact: CalibrationArtifact,
        conv_transpose_axis: int | None = 1,
    ) -> None:
        super().__init__()
        artifact.validate(decoder)
        self.decoder = copy.deepcopy(decoder).eval()
        artifact.apply_float_changes(self.decoder)
        install(
            self.decoder,
            {
                layer.name: layer.module(get_layer(self.decoder, layer.name), conv_transpose_axis)
                for layer in artifact.layers
            },
        )
        self.config = decoder.config
        self.declaration = decoder.declaration
        self.artifact = artifact
        self.eval()

    @torch.no_grad()
    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(t.float() for t in self.decoder(*(x.float() for x in inputs)))
