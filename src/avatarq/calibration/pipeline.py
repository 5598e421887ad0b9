"""`calibrate`: decoder + samples + config -> `CalibrationArtifact`."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from avatarq.calibration.artifact import CalibrationArtifact, LayerCalibration, decoder_hash
from avatarq.calibration.cache import CAPTURE_BATCH
from avatarq.calibration.config import CalibrationConfig, check_layer_names
from avatarq.calibration.layers import (
    LayerInfo,
    QuantizedLayer,
    discover_layers,
    get_layer,
    install,
)
from avatarq.calibration.masks import visibility_masks
from avatarq.calibration.precision import measured_sensitivity, omega_sensitivity, precision_plan
from avatarq.calibration.quantizers import max_activation_range, weight_scales
from avatarq.calibration.reconstruct import reconstruct
from avatarq.calibration.samples import CalibrationSamples
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError


def _max_method(
    reference: nn.Module,
    layers: list[LayerInfo],
    plan: dict[str, str],
    samples: CalibrationSamples,
    visibility: torch.Tensor | None,
    config: CalibrationConfig,
    progress: Progress | None,
) -> dict[str, LayerCalibration]:
    """Standard PTQ: per-tensor input amax over every calibration value (no masks, one FP32
    pass), per-channel weight amax, nearest rounding."""
    todo = [info for info in layers if plan[info.name] == "int8"]
    lo = {info.name: torch.tensor(np.inf) for info in todo}
    hi = {info.name: torch.tensor(-np.inf) for info in todo}
    handles = []
    for info in todo:

        def hook(module, inputs, output, name=info.name):
            x = inputs[0].detach()
            lo[name] = torch.minimum(lo[name], x.min())
            hi[name] = torch.maximum(hi[name], x.max())

        handles.append(reference.get_submodule(info.name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(samples), CAPTURE_BATCH):
                stop = start + CAPTURE_BATCH
                reference(samples.z[start:stop], samples.view[start:stop])
                if progress is not None:
                    progress("max calibration", min(stop, len(samples)), len(samples))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for info in todo:
        scale, zp = max_activation_range(
            torch.stack([lo[info.name], hi[info.name]]), config.bits, config.symmetric
        )
        w_scale = weight_scales(
            get_layer(reference, info.name).weight, info.weight_axis, config.bits
        )
        out[info.name] = LayerCalibration.for_layer(
            info,
            "int8",
            config.bits,
            config.symmetric,
            input_scale=scale,
            input_zero_point=int(round(zp)),
            weight_scale=w_scale.numpy().astype(np.float32),
            rounding="nearest",
        )
    return out


def _poca_method(
    reference: nn.Module,
    layers: list[LayerInfo],
    plan: dict[str, str],
    samples: CalibrationSamples,
    visibility: torch.Tensor | None,
    config: CalibrationConfig,
    progress: Progress | None,
) -> dict[str, LayerCalibration]:
    """POCA: masked grid search, then sequential masked reconstruction (reconstruct.py)."""
    work = copy.deepcopy(reference)
    install(
        work,
        {
            name: QuantizedLayer(get_layer(work, name), "fp16")
            for name, precision in plan.items()
            if precision == "fp16"
        },
    )
    return reconstruct(reference, work, layers, plan, samples, visibility, config, progress)


# The registry of calibration methods (CalibrationConfig.method -> implementation).
METHODS: dict[str, Callable[..., dict[str, LayerCalibration]]] = {
    "max": _max_method,
    "poca": _poca_method,
}


def _check(decoder: nn.Module, samples: CalibrationSamples) -> None:
    config = getattr(decoder, "config", None)
    if config is None:
        raise AvatarqError("calibrate needs a DeployableDecoder (it has no DAM config)")
    if samples.z_dim != config.z_dim:
        raise AvatarqError(
            f"calibration latents have Z = {samples.z_dim}, the decoder expects {config.z_dim}"
        )


def calibrate(
    decoder: nn.Module,
    samples: CalibrationSamples,
    config: CalibrationConfig = CalibrationConfig(),
    progress: Progress | None = None,
    visibility: torch.Tensor | None = None,
) -> CalibrationArtifact:
    """Calibrate ``decoder`` (a `DeployableDecoder`, left unchanged) on ``samples``.

    Steps: list the quantizable layers (execution order); measure per-layer sensitivity
    (``config.sensitivity``); choose the precision plan (``fp16_budget`` most sensitive
    layers in FP16, then ``config.precision`` overrides); compute visibility masks when the
    samples carry cameras and ``config.visibility``; calibrate the int8 layers with
    ``config.method`` ("poca": masked grid search + sequential masked reconstruction;
    "max": plain max calibration).

    Args:
        progress: called as progress(description, done, total) while working.
        visibility: bool [N, T, T] masks `visibility_masks` computed for these samples and
            this decoder, to share them between calibrations (None: computed here).

    Returns:
        the artifact (write it with ``.save(dir)``); deterministic for the same inputs on
        the same machine and thread count.

    Raises:
        AvatarqError: samples that do not fit the decoder, an unknown layer in the overrides,
            or visibility requested on a decoder without de-normalization.
    """
    _check(decoder, samples)
    reference = copy.deepcopy(decoder).float().cpu().eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    layers = discover_layers(reference)
    names = [info.name for info in layers]
    check_layer_names(config.precision, names)

    sensitivity: dict[str, float] | None = None
    if config.sensitivity != "none":
        if progress is not None:
            progress("measuring sensitivity", 0, 1)
        n = min(config.sensitivity_samples, len(samples))
        z, view = samples.z[:n], samples.view[:n]
        if config.sensitivity == "omega":
            sensitivity = omega_sensitivity(reference, layers, z, view, config.bits)
        else:
            sensitivity = measured_sensitivity(
                reference, layers, z, view, config.bits, config.symmetric
            )
    plan = precision_plan(layers, sensitivity, config.fp16_budget, config.precision)

    if not (config.visibility and config.method == "poca" and samples.M is not None):
        visibility = None
    elif visibility is not None:
        expected = (len(samples), decoder.config.tex_size, decoder.config.tex_size)
        if tuple(visibility.shape) != expected:
            raise AvatarqError(
                f"visibility masks are {list(visibility.shape)}, the samples need {list(expected)}"
            )
    else:
        if progress is not None:
            progress("rasterizing visibility", 0, len(samples))
        with torch.no_grad():
            visibility = visibility_masks(reference, samples, CAPTURE_BATCH, progress)

    calibrated = METHODS[config.method](
        reference, layers, plan, samples, visibility, config, progress
    )
    entries = []
    for info in layers:
        entry = calibrated.get(info.name) or LayerCalibration.for_layer(
            info, plan[info.name], config.bits, config.symmetric
        )
        if sensitivity is not None:
            entry.sensitivity = float(sensitivity[info.name])
        entries.append(entry)
    return CalibrationArtifact(
        model_hash=decoder_hash(decoder),
        model_config=dict(sorted(_config_dict(decoder).items())),
        samples=samples.describe(),
        config=config.to_dict(),
        layers=entries,
    )


def _config_dict(decoder: nn.Module) -> dict:
    import json

    cfg = decoder.config
    data = json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else {}
    data["denormalized"] = bool(getattr(decoder, "denormalized", False))
    return data
