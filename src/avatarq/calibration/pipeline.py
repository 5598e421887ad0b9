"""`calibrate`: decoder + samples + config -> `CalibrationArtifact`."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from avatarq.calibration.artifact import CalibrationArtifact, LayerCalibration, decoder_hash
from avatarq.calibration.biases import BIAS_QMAX, bias_scale, stored_formats
from avatarq.calibration.cache import CAPTURE_BATCH, CalibrationRun
from avatarq.calibration.config import CalibrationConfig, check_layer_names
from avatarq.calibration.formats import parse_format
from avatarq.calibration.hadamard import rotated_shape, rotation_matrix
from avatarq.calibration.layers import (
    LayerInfo,
    QuantizedLayer,
    discover_layers,
    get_layer,
    install,
    is_quantized,
    rotate_input,
    side_output_layers,
)
from avatarq.calibration.masks import texture_size, visibility_masks
from avatarq.calibration.precision import (
    allocate_formats,
    measured_sensitivity,
    omega_sensitivity,
    precision_plan,
)
from avatarq.calibration.quantizers import layer_block, max_activation_range
from avatarq.calibration.reconstruct import initial_weight_scale, reconstruct
from avatarq.calibration.samples import CalibrationSamples, check_samples, decoder_args
from avatarq.calibration.smoothing import (
    SmoothingPair,
    input_channel_amax,
    smooth_decoder,
    smoothing_pairs,
    smoothing_scales,
)
from avatarq.core.progress import Progress
from avatarq.errors import AvatarqError


def _max_method(run: CalibrationRun, work: nn.Module) -> dict[str, LayerCalibration]:
    """Standard PTQ: per-tensor input amax over every calibration value (no masks, one FP32
    pass), per-channel (or per-block) weight amax, nearest rounding; ``work`` is unused."""
    reference, layers, plan = run.reference, run.layers, run.plan
    samples, config, progress = run.samples, run.config, run.progress
    todo = [info for info in layers if is_quantized(plan[info.name])]
    lo = {info.name: torch.tensor(np.inf) for info in todo}
    hi = {info.name: torch.tensor(-np.inf) for info in todo}
    rotations = {
        info.name: rotation_matrix(info.in_channels) if config.hadamard else None for info in todo
    }
    handles = []
    for info in todo:

        def hook(module, inputs, output, name=info.name):
            x = inputs[0].detach()
            if rotations[name] is not None:
                x = rotate_input(x, rotations[name])
            lo[name] = torch.minimum(lo[name], x.min())
            hi[name] = torch.maximum(hi[name], x.max())

        handles.append(reference.get_submodule(info.name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            for start in range(0, len(samples), CAPTURE_BATCH):
                stop = start + CAPTURE_BATCH
                reference(*decoder_args(reference, samples, start, stop))
                if progress is not None:
                    progress("max calibration", min(stop, len(samples)), len(samples))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for info in todo:
        fmt = parse_format(plan[info.name])
        scale, zp = max_activation_range(
            torch.stack([lo[info.name], hi[info.name]]), fmt.act_grid, config.symmetric
        )
        entry = LayerCalibration.for_layer(
            info,
            fmt,
            config.symmetric,
            input_scale=scale,
            input_zero_point=int(round(zp)),
            weight_block=layer_block(
                rotated_shape(info.weight_shape, info.input_axis)[info.input_axis]
                if rotations[info.name] is not None
                else info.in_channels,
                config.weight_block,
            ),
            rounding="nearest",
            rotation=0 if rotations[info.name] is None else int(rotations[info.name].shape[0]),
        )
        weight = entry.stored_weight(get_layer(reference, info.name).weight)
        entry.weight_scale = (
            initial_weight_scale(weight, entry.layout, fmt, config.weight_search)
            .numpy()
            .astype(np.float32)
        )
        out[info.name] = entry
    return out


def _poca_method(run: CalibrationRun, work: nn.Module) -> dict[str, LayerCalibration]:
    """POCA: masked grid search, then sequential masked reconstruction (reconstruct.py).
    ``work``: the decoder later layers' inputs come from (texel biases as stored)."""
    work = copy.deepcopy(work)
    install(
        work,
        {
            name: QuantizedLayer(get_layer(work, name), "fp16")
            for name, precision in run.plan.items()
            if precision == "fp16"
        },
    )
    return reconstruct(run, work)


# The registry of calibration methods (CalibrationConfig.method -> implementation).
METHODS: dict[str, Callable[[CalibrationRun, nn.Module], dict[str, LayerCalibration]]] = {
    "max": _max_method,
    "poca": _poca_method,
}


def _check(decoder: nn.Module, samples: CalibrationSamples) -> None:
    config = getattr(decoder, "config", None)
    if config is None:
        raise AvatarqError(
            "calibrate needs a deployable decoder (a DAM's DeployableDecoder, or any module "
            "wrapped by avatarq.models.declare)"
        )
    if hasattr(config, "z_dim") and "z" in samples.inputs.arrays:
        if samples.z_dim != config.z_dim:
            raise AvatarqError(
                f"calibration latents have Z = {samples.z_dim}, the decoder expects {config.z_dim}"
            )
    check_samples(decoder, samples)


def calibrate(
    decoder: nn.Module,
    samples: CalibrationSamples,
    config: CalibrationConfig = CalibrationConfig(),
    progress: Progress | None = None,
    visibility: torch.Tensor | None = None,
) -> CalibrationArtifact:
    """Calibrate ``decoder`` (a `DeployableDecoder`, left unchanged) on ``samples``.

    Steps: list the quantizable layers (execution order); with ``config.smooth``, fold
    smoothing scales into a copy of the decoder (smoothing.py); measure per-layer
    sensitivity (``config.sensitivity``); choose the precision plan (the exact allocation
    under ``config.size_budget``, or the ``fp16_budget`` most sensitive layers in FP16 and
    the rest in ``config.bits``; then ``config.precision`` overrides); compute visibility
    masks when the samples carry cameras and ``config.visibility``; calibrate the quantized
    layers with ``config.method`` ("poca": masked grid search + sequential masked
    reconstruction, GPTQ / AdaRound / Hadamard as configured; "max": plain max calibration).

    Args:
        progress: called as progress(description, done, total) while working.
        visibility: bool [N, T, T] masks `visibility_masks` computed for these samples and
            this decoder, to share them between calibrations (None: computed here).

    Returns:
        the artifact (write it with ``.save(dir)``); deterministic for the same inputs on
        the same machine and thread count.

    Raises:
        AvatarqError: samples that do not fit the decoder, an unknown layer in the overrides,
            a size budget no allocation fits, or visibility requested on a decoder without
            de-normalization.
    """
    _check(decoder, samples)
    reference = copy.deepcopy(decoder).float().cpu().eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    layers = discover_layers(reference)
    names = [info.name for info in layers]
    check_layer_names(config.precision, names)
    say = progress or (lambda *_: None)

    pairs, scales = _smooth(reference, layers, samples, config, say)
    n = min(config.sensitivity_samples, len(samples))
    args = decoder_args(reference, samples, 0, n)
    allocation = None
    if config.size_budget is not None:
        allocation = allocate_formats(reference, layers, args, config, say)
        plan = {**allocation.formats, **config.precision}
    sensitivity: dict[str, float] | None = None
    if config.sensitivity != "none":
        say("measuring sensitivity", 0, 1)
        if config.sensitivity == "omega":
            sensitivity = omega_sensitivity(reference, layers, *args, bits=config.bits)
        else:
            sensitivity = measured_sensitivity(
                reference, layers, *args, bits=config.bits, symmetric=config.symmetric
            )
    if allocation is None:
        plan = precision_plan(
            layers, sensitivity, config.fp16_budget, config.precision, config.bits
        )
    for name in side_output_layers(reference, layers):  # a declared decoder's other outputs
        if name not in config.precision:
            plan[name] = "fp32"

    if not (config.visibility and config.method == "poca" and samples.M is not None):
        visibility = None
    elif visibility is not None:
        expected = (len(samples), *texture_size(decoder))
        if tuple(visibility.shape) != expected:
            raise AvatarqError(
                f"visibility masks are {list(visibility.shape)}, the samples need {list(expected)}"
            )
    else:
        say("rasterizing visibility", 0, len(samples))
        with torch.no_grad():
            visibility = visibility_masks(reference, samples, CAPTURE_BATCH, progress)

    formats = stored_formats(reference, config.bias_format) if config.bias_format != "fp32" else {}
    params = dict(reference.named_parameters())
    bias_scales = {
        name: bias_scale(params[name].detach().numpy(), fmt)
        for name, fmt in formats.items()
        if fmt in BIAS_QMAX
    }
    artifact = CalibrationArtifact(
        model_hash=decoder_hash(decoder),
        model_config=dict(sorted(_config_dict(decoder).items())),
        samples=samples.describe(),
        config=config.to_dict(),
        layers=[],
        texel_biases=formats,
        bias_scales=bias_scales,
    )
    work = copy.deepcopy(reference)
    artifact.apply_float_changes(work)  # texel biases as the graph stores them
    run = CalibrationRun(reference, layers, plan, samples, visibility, config, progress)
    calibrated = METHODS[config.method](run, work)
    for info in layers:
        entry = calibrated.get(info.name) or LayerCalibration.for_layer(
            info, plan[info.name], config.symmetric
        )
        if sensitivity is not None:
            entry.sensitivity = float(sensitivity[info.name])
        artifact.layers.append(entry)
    artifact.smoothing, artifact.smoothing_scales = pairs, scales
    if allocation is not None:
        artifact.allocation = allocation.to_json()
    return artifact


def _smooth(
    reference: nn.Module,
    layers: list[LayerInfo],
    samples: CalibrationSamples,
    config: CalibrationConfig,
    say: Progress,
) -> tuple[list[SmoothingPair], dict[str, np.ndarray]]:
    """With ``config.smooth``: the pairs whose consumer is not overridden to a float format,
    their scales from the calibration samples' input maxima, folded into ``reference``."""
    if not config.smooth:
        return [], {}
    say("smoothing", 0, 1)
    floats = {n for n, p in config.precision.items() if not is_quantized(p)}
    pairs = [p for p in smoothing_pairs(reference) if p.consumer not in floats]
    consumers = [p.consumer for p in pairs]
    amax = input_channel_amax(reference, consumers, *decoder_args(reference, samples))
    scales = {
        p.consumer: smoothing_scales(
            amax[p.consumer],
            get_layer(reference, p.consumer).weight,
            p.consumer_axis,
            config.smooth_alpha,
        )
        for p in pairs
    }
    smooth_decoder(reference, pairs, scales)
    return pairs, scales


def _config_dict(decoder: nn.Module) -> dict:
    import json

    cfg = decoder.config
    data = json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else {}
    data["denormalized"] = bool(getattr(decoder, "denormalized", False))
    return data
