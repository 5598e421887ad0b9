"""Decoders for the ONNX Runtime engine tests: Multiface's own initialization, Q/DQ graphs.

`multiface_init` gives a DAM the weights Multiface's public code starts training from
(uniform Glorot with LeakyReLU gain, ConvTranspose taps repeated over each 2x2 block,
weight-norm gains g = ||W||), plus random untied texel biases as a trained model has.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint


def _glorot(module: nn.Module, alpha: float) -> None:
    gain = math.sqrt(2.0 / (1.0 + alpha**2))
    if isinstance(module, nn.ConvTranspose2d):
        fan = (module.in_channels + module.out_channels) * module.kernel_size[0] ** 2 // 4
    elif isinstance(module, nn.Conv2d):
        fan = (module.in_channels + module.out_channels) * module.kernel_size[0] ** 2
    elif isinstance(module, nn.Linear):
        fan = module.in_features + module.out_features
    else:
        return
    bound = gain * math.sqrt(2.0 / fan) * math.sqrt(3.0)
    module.weight.data.uniform_(-bound, bound)
    module.bias.data.zero_()
    if isinstance(module, nn.ConvTranspose2d):
        for a, b in ((0, 1), (1, 0), (1, 1)):
            module.weight.data[:, :, a::2, b::2] = module.weight.data[:, :, 0::2, 0::2]
    if hasattr(module, "g"):
        module.g.data[:] = torch.sqrt(torch.sum(module.weight.data**2))


def multiface_init(model: DeepAppearanceModel, texel_bias_std: float = 0.1) -> DeepAppearanceModel:
    """Multiface's initialization of ``model.dec`` (in place), texel biases N(0, std^2)."""
    dec = model.dec
    with torch.no_grad():
        dec.apply(lambda m: _glorot(m, 0.2))
        _glorot(dec.mesh_fc, 1.0)
        _glorot(dec.texture_decoder.upsample[-1].conv2.deconv, 1.0)
        for name, p in dec.texture_decoder.named_parameters():
            if name.endswith(("conv1.bias", "conv2.bias")):
                p.normal_(0.0, texel_bias_std)
    return model


def multiface_checkpoint(path: Path, config: DAMConfig, seed: int = 0) -> Path:
    """A Multiface-initialized checkpoint of ``config`` at ``path``."""
    torch.manual_seed(seed)
    save_checkpoint(multiface_init(DeepAppearanceModel(config).eval()), path)
    return path


def smooth_clip(z_dim: int, n: int, seed: int, sigma: float = 1.0):
    """A smooth (z [n, Z], view [n, 3]) clip (`avatarq.core.inputs.smooth_clip`), z scaled
    by ``sigma``."""
    from avatarq.core.inputs import smooth_clip as clip

    inputs = clip(z_dim, n, seed=seed)
    return (inputs.z * sigma).astype(np.float32), inputs.view


def qdq_graph(checkpoint: Path, model_onnx: Path, n_samples: int = 16) -> onnx.ModelProto:
    """avatarq's own INT8 Q/DQ graph of the bundle graph ``model_onnx``: max calibration
    on a smooth latent clip, then `quantize_onnx`."""
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_latents
    from avatarq.core.inputs import DecoderInputs
    from avatarq.export.qdq import quantize_onnx
    from avatarq.models import DeployableDecoder, load_checkpoint

    decoder = DeployableDecoder(load_checkpoint(checkpoint))
    z, view = smooth_clip(decoder.config.z_dim, 4 * n_samples, seed=1)
    latents = DecoderInputs.from_z_view(z, view)
    samples = samples_from_latents(latents, n_random=n_samples, n_clips=0)
    artifact = calibrate(decoder, samples, CalibrationConfig(method="max"))
    return quantize_onnx(onnx.load(str(model_onnx)), artifact)


def int8_bundle(root: Path, config: DAMConfig, name: str = "dam_int8.avq") -> Path:
    """An INT8 bundle of a Multiface-initialized ``config`` (max calibration on a smooth
    latent clip) at ``root / name``; the checkpoint is ``root / dam.pt``."""
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_latents
    from avatarq.core.inputs import DecoderInputs
    from avatarq.export import ExportOptions, export_bundle
    from avatarq.models import DeployableDecoder, load_checkpoint

    checkpoint = multiface_checkpoint(root / "dam.pt", config)
    decoder = DeployableDecoder(load_checkpoint(checkpoint))
    z, view = smooth_clip(config.z_dim, 64, seed=1)
    latents = DecoderInputs.from_z_view(z, view)
    samples = samples_from_latents(latents, n_random=16, n_clips=0)
    calibrate(decoder, samples, CalibrationConfig(method="max")).save(root / "calib")
    options = ExportOptions(int8=True, calib=str(root / "calib"), validate=False)
    export_bundle(checkpoint, root / name, options=options)
    return root / name
