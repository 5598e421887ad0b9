"""Activation smoothing (SmoothQuant-style) folded exactly into the previous layer.

For a conv/deconv layer L whose input is LeakyReLU(P(x) + b) of a previous layer P (b its
untied texel bias, or P's own bias), per-input-channel positive scales s give

    L(LeakyReLU(P(x) + b)) = L_s(LeakyReLU(P_s(x) + b / s)),

with P_s = P with output channel c divided by s_c and L_s = L with input channel c
multiplied by s_c, because LeakyReLU(a v) = a LeakyReLU(v) for a > 0 (a nearest upsample,
a reshape of channels and a bilinear resize commute with per-channel scales too). The FP32
model is unchanged up to float rounding; the input of L has per-channel ranges
amax_c / s_c, flatter for a per-tensor quantizer, and L's weights absorb the difference:

    s_c = amax(x_c)^alpha / amax(W[:, c])^(1 - alpha)     (normalized to geometric mean 1)

Pairs (`smoothing_pairs`) are found by walking the DAM upsampling blocks: inside a block
conv1 -> conv2, between blocks conv2 -> next conv1 (when a LeakyReLU follows), the Linear
that feeds the first block through a reshape (``group`` outputs per channel), and the warp
decoder's last block -> ``outconv``. Blocks with residual convs (arch ``res``) are skipped:
a residual add mixes two paths that would both have to carry the scales.

`apply_smoothing` changes named float arrays (torch parameters or ONNX initializers, which
share names), so the fake-quant model and the exported graph fold the very same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from avatarq.errors import AvatarqError

MIN_SMOOTH = 1e-5


@dataclass(frozen=True)
class SmoothingPair:
    """A consumer layer whose input channels take scales folded into its producer.

    Attributes:
        producer: the layer before (its ``.weight``, and ``.bias`` when present).
        producer_axis: the producer weight's output-channel axis.
        consumer: the smoothed layer.
        consumer_axis: the consumer weight's input-channel axis.
        biases: untied bias parameters [1, C, H, W] added to the producer's output.
        group: producer outputs per consumer channel (a Linear reshaped to [C, h, w]: h*w).
    """

    producer: str
    producer_axis: int
    consumer: str
    consumer_axis: int
    biases: tuple[str, ...] = ()
    group: int = 1

    def to_json(self) -> dict:
        return {
            "producer": self.producer,
            "producer_axis": self.producer_axis,
            "consumer": self.consumer,
            "consumer_axis": self.consumer_axis,
            "biases": list(self.biases),
            "group": self.group,
        }

    @classmethod
    def from_json(cls, data: dict) -> SmoothingPair:
        return cls(
            str(data["producer"]),
            int(data["producer_axis"]),
            str(data["consumer"]),
            int(data["consumer_axis"]),
            tuple(str(b) for b in data["biases"]),
            int(data["group"]),
        )


def _out_axis(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.ConvTranspose2d) else 0


def smoothing_pairs(decoder: nn.Module) -> list[SmoothingPair]:
    """Every (producer, consumer) pair of ``decoder`` (a `DeployableDecoder`) that smoothing
    can fold exactly, coarse to fine."""
    from avatarq.models.layers import ConvUpsample

    pairs: list[SmoothingPair] = []
    if not hasattr(getattr(decoder, "config", None), "base_size"):
        return pairs  # not a DAM: no known exact pairs
    heads = {
        "dec.texture_decoder.upsample": ("dec.texture_fc", decoder.config.base_size**2, None),
        "warp.upsample": ("warp.mlp.2", 4, "warp.outconv"),
    }
    for prefix, (head, group, tail) in heads.items():
        try:
            blocks = decoder.get_submodule(prefix)
        except AttributeError:
            continue
        if not all(isinstance(b, ConvUpsample) for b in blocks):
            continue
        prev: tuple[str, tuple[str, ...], int] | None = (head, (), group)

        def link(producer: tuple[str, tuple[str, ...], int], consumer: str) -> None:
            name, biases, g = producer
            p_mod, c_mod = decoder.get_submodule(name), decoder.get_submodule(consumer)
            pairs.append(
                SmoothingPair(name, _out_axis(p_mod), consumer, 1 - _out_axis(c_mod), biases, g)
            )

        for i, block in enumerate(blocks):
            conv1, conv2 = f"{prefix}.{i}.conv1", f"{prefix}.{i}.conv2"
            if prev is not None:
                link(prev, f"{conv1}.deconv")
            if block.res:
                prev = None
                continue
            link((f"{conv1}.deconv", (f"{conv1}.bias",), 1), f"{conv2}.deconv")
            prev = None if block.no_activ else (f"{conv2}.deconv", (f"{conv2}.bias",), 1)
        if tail is not None and prev is not None:
            link(prev, tail)
    return pairs


def smoothing_scales(
    act_amax: torch.Tensor, weight: torch.Tensor, in_axis: int, alpha: float
) -> np.ndarray:
    """s_c = amax(x_c)^alpha / amax(W along c)^(1 - alpha), geometric mean 1; channels with
    a zero maximum keep s = 1. float32 [Cin]."""
    if not 0.0 <= alpha <= 1.0:
        raise AvatarqError(f"smoothing alpha must lie in [0, 1], got {alpha}")
    dims = [d for d in range(weight.dim()) if d != in_axis]
    w_amax = weight.detach().abs().amax(dim=dims).double()
    a = act_amax.detach().double()
    ok = (a > 0) & (w_amax > 0)
    s = torch.ones_like(a)
    s[ok] = a[ok] ** alpha / w_amax[ok] ** (1.0 - alpha)
    s = s.clamp_min(MIN_SMOOTH)
    s = s / torch.exp(torch.log(s).mean())
    return s.float().numpy()


def apply_smoothing(
    arrays: dict[str, np.ndarray], pair: SmoothingPair, scale: np.ndarray
) -> dict[str, np.ndarray]:
    """The float32 arrays ``pair`` changes, with ``scale`` (float32 [Cin], > 0) folded in.

    ``arrays`` maps parameter names to their float32 values (the producer's weight and bias
    if any, the biases, the consumer's weight); returns new arrays for the same names.
    """
    s = np.asarray(scale, np.float32)
    if s.ndim != 1 or not np.all(s > 0) or not np.all(np.isfinite(s)):
        raise AvatarqError(f"smoothing scales of {pair.consumer!r} must be positive and finite")
    out: dict[str, np.ndarray] = {}
    w = np.asarray(arrays[f"{pair.producer}.weight"], np.float32)
    per_output = np.repeat(s, pair.group)
    if w.shape[pair.producer_axis] != per_output.size:
        raise AvatarqError(
            f"smoothing {pair.producer!r} -> {pair.consumer!r}: {w.shape[pair.producer_axis]} "
            f"producer outputs, {s.size} x {pair.group} scales"
        )
    shape = [1] * w.ndim
    shape[pair.producer_axis] = -1
    out[f"{pair.producer}.weight"] = (w / per_output.reshape(shape)).astype(np.float32)
    bias = arrays.get(f"{pair.producer}.bias")
    if bias is not None:
        out[f"{pair.producer}.bias"] = (np.asarray(bias, np.float32) / per_output).astype(
            np.float32
        )
    for name in pair.biases:
        b = np.asarray(arrays[name], np.float32)
        out[name] = (b / s.reshape(1, -1, 1, 1)).astype(np.float32)
    c = np.asarray(arrays[f"{pair.consumer}.weight"], np.float32)
    shape = [1] * c.ndim
    shape[pair.consumer_axis] = -1
    out[f"{pair.consumer}.weight"] = (c * s.reshape(shape)).astype(np.float32)
    return out


def pair_parameter_names(pair: SmoothingPair) -> list[str]:
    """Every parameter name `apply_smoothing` may read or write for ``pair``."""
    return [
        f"{pair.producer}.weight",
        f"{pair.producer}.bias",
        *pair.biases,
        f"{pair.consumer}.weight",
    ]


@torch.no_grad()
def smooth_decoder(
    decoder: nn.Module, pairs: list[SmoothingPair], scales: dict[str, np.ndarray]
) -> None:
    """Fold ``scales`` ({consumer: float32 [Cin]}) into ``decoder``'s parameters in place."""
    params = dict(decoder.named_parameters())
    for pair in pairs:
        if pair.consumer not in scales:
            continue
        arrays = {
            name: params[name].detach().cpu().numpy()
            for name in pair_parameter_names(pair)
            if name in params and params[name] is not None
        }
        for name, value in apply_smoothing(arrays, pair, scales[pair.consumer]).items():
            params[name].copy_(torch.from_numpy(value))


@torch.no_grad()
def input_channel_amax(
    decoder: nn.Module, names: list[str], *inputs: torch.Tensor, batch: int = 8
) -> dict[str, torch.Tensor]:
    """{layer: max |x_c| over every sample and position of its input}: float32 [Cin].
    ``inputs``: the decoder's inputs [N, ...] (z, view for a DAM)."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:

        def hook(module, args, output, name=name):
            x = args[0].detach().abs()
            dims = [d for d in range(x.dim()) if d != 1]
            m = x.amax(dim=dims).float()
            out[name] = m if name not in out else torch.maximum(out[name], m)

        handles.append(decoder.get_submodule(name).register_forward_hook(hook))
    try:
        for start in range(0, inputs[0].shape[0], batch):
            decoder(*(x[start : start + batch] for x in inputs))
    finally:
        for h in handles:
            h.remove()
    return out
