"""Hadamard rotation of a layer's input channels (incoherence processing before quantization).

With R = H[:, :Cin] (the first Cin columns of the normalized Walsh-Hadamard matrix H of
size n, the next power of two >= Cin; R^T R = I), a layer y = W x equals y = W' x' with
x' = R x (n channels) and W' = W R^T (n input channels): exactly in real arithmetic, to
float rounding in float32. Quantizing W' per output channel and x' per tensor spreads
outlying channels over all of them, which is what makes low-bit grids fit.

Where the graph carries the inverse: the weight side needs nothing (W' is what is stored
and quantized); the input side needs x' = R x computed in float before the layer's input
quantizer: a MatMul with R^T for Linear layers, a 1x1 Conv with R for Conv/ConvTranspose
(ConvTranspose contracts its input channels the same way). In the DAM decoders every
quantized layer's input comes from a LeakyReLU (or is the graph input z or view), and a
rotation does not commute with LeakyReLU, so it can NOT be folded into the previous layer's
weights (unlike the positive per-channel scales of smoothing): each rotated layer costs one
extra float op of n x Cin MACs per input position (about 1/16 of a k4 ConvTranspose with
Cout = Cin). A Cin that is not a power of two is padded: the rotated weight and input have
n channels (texture_fc: 264 -> 512, doubling its weights).
"""

from __future__ import annotations

import numpy as np
import torch

from avatarq.errors import AvatarqError


def hadamard_size(channels: int) -> int:
    """The smallest power of two >= ``channels``."""
    if channels < 1:
        raise AvatarqError(f"a rotation needs at least one channel, got {channels}")
    return 1 << (channels - 1).bit_length()


def hadamard_matrix(n: int) -> np.ndarray:
    """The normalized Walsh-Hadamard matrix (Sylvester order): float64 [n, n], symmetric,
    orthonormal; n a power of two."""
    if n < 1 or n & (n - 1):
        raise AvatarqError(f"a Hadamard matrix needs a power-of-two size, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotation_matrix(channels: int) -> torch.Tensor:
    """R = H[:, :channels]: float32 [n, channels] with R^T R = I."""
    n = hadamard_size(channels)
    return torch.from_numpy(hadamard_matrix(n)[:, :channels].astype(np.float32))


def rotate_weight(weight: torch.Tensor, in_axis: int, rotation: torch.Tensor) -> torch.Tensor:
    """W' = W R^T along ``in_axis``: the weight with n input channels (float32, computed in
    float64)."""
    w = weight.detach().double().movedim(in_axis, -1)
    out = w @ rotation.double().t()
    return out.movedim(-1, in_axis).float().contiguous()


def rotated_shape(shape: tuple[int, ...], in_axis: int) -> tuple[int, ...]:
    """A weight shape with its input-channel axis padded to the rotation size."""
    out = list(shape)
    out[in_axis] = hadamard_size(out[in_axis])
    return tuple(out)
