"""Sequential layer-wise reconstruction (POCA / AdaRound / BRECQ style).

For each int8 layer, coarse to fine: take this layer's input x from the decoder with every
earlier layer already quantized, and its FP32 output y and mask M (masks.py) from the FP32
decoder (cache.py: crops for fine layers); initialize the activation scale by the masked
shrinking grid search and the weight scales by per-channel max; minimize the masked MSE
``sum((layer_q(x) - y)^2 * M) / (C * sum(M))``, divided by the masked mean of y^2 (so the
loss reads as the layer's output noise-to-signal ratio), with Adam over the log-scales
(LSQ with straight-through rounding) and, optionally, AdaRound's rounding variables, plus
an optional temporal term on consecutive clip frames; freeze the layer and move on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from avatarq.calibration.artifact import LayerCalibration
from avatarq.calibration.cache import (
    GROUP_SLACK,
    CropGeometry,
    CropPlan,
    Targets,
    capture_inputs,
    cumulative_cost,
    plan_crops,
    reference_targets,
    upstream_layers,
)
from avatarq.calibration.config import CalibrationConfig
from avatarq.calibration.layers import LayerInfo, get_layer, install, layer_forward
from avatarq.calibration.quantizers import (
    activation_range,
    adaround_beta,
    adaround_init,
    adaround_integers,
    adaround_regularizer,
    adaround_weight,
    channel_shape,
    fake_quantize,
    search_activation_range,
    weight_range,
    weight_scales,
)
from avatarq.calibration.samples import CalibrationSamples
from avatarq.core.progress import Progress

EVAL_BATCH = 64
ROW_SAMPLE = 4096  # output rows of a large Linear layer per Adam step
PLATEAU_REL = 1e-3
ADAROUND_LR_FACTOR = 10.0


# ------------------------------------------------------------------ the cache
@dataclass
class LayerCache:
    """Calibration data of one layer: items are whole samples or crops of samples.

    Attributes:
        x: float32 [I, *in] inputs (from the decoder with earlier layers quantized).
        y: float32 [I, *out] FP32 outputs (the crop's window for cropped layers).
        mask: float32 [I, 1, h, w] output masks, None for Linear layers.
        in_mask: float32 [I, 1, hi, wi] input masks (zero outside the image), or None.
        pairs: int64 [P, 2] (previous, current) item indices of consecutive clip frames.
        geometry: crop geometry, None when whole outputs are cached.
        energy: masked mean of y^2 over every item; losses are divided by it (so they read
            as the layer's output noise-to-signal ratio and stay far from float denormals).
    """

    x: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor | None
    in_mask: torch.Tensor | None
    pairs: torch.Tensor
    geometry: CropGeometry | None
    energy: float = 1.0

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def output(self, module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's output on items ``x`` (cut to the crop window for cropped layers)."""
        y = layer_forward(module, x, weight)
        g = self.geometry
        if g is None:
            return y
        return y[..., g.out_start : g.out_start + g.size, g.out_start : g.out_start + g.size]


def make_cache(
    x: torch.Tensor, targets: Targets, plan: CropPlan, samples: CalibrationSamples
) -> LayerCache:
    """Assemble a layer's cache from its input items and FP32 targets (same item order)."""
    k = plan.k
    pairs = [(p * k + c, q * k + c) for p, q in samples.pairs for c in range(k)]
    energy = float(masked_mse(targets.y, torch.zeros(()), targets.mask))
    return LayerCache(
        x,
        targets.y,
        targets.mask,
        targets.in_mask,
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        plan.geometry,
        energy if energy > 0 else 1.0,
    )


def build_cache(
    work: nn.Module,
    reference: nn.Module,
    info: LayerInfo,
    samples: CalibrationSamples,
    visibility: torch.Tensor | None,
    config: CalibrationConfig,
    gen: torch.Generator,
) -> LayerCache:
    """One layer's cache: inputs from ``work`` (earlier layers quantized), targets from the
    FP32 ``reference``."""
    plan = plan_crops(get_layer(reference, info.name), info, samples, visibility, config, gen)
    targets = reference_targets(reference, [info], {info.name: plan}, samples, visibility, config)
    x = capture_inputs(work, [info.name], {info.name: plan}, samples)[info.name]
    return make_cache(x, targets[info.name], plan, samples)


# ------------------------------------------------------------------ the trainable layer
def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """sum((pred - target)^2 * M) / (C * sum(M)); plain mean without a mask."""
    err = (pred - target) ** 2
    if mask is None:
        return err.mean()
    return (err * mask).sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)


def masked_temporal(
    e_now: torch.Tensor, e_prev: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """mean |(e_t - e_{t-1}) * M| over the masked elements."""
    diff = (e_now - e_prev).abs()
    if mask is None:
        return diff.mean()
    return (diff * mask).sum() / (mask.sum() * diff.shape[1]).clamp_min(1.0)


class TrainableLayer(nn.Module):
    """A layer with learnable quantizers: log-scale offsets (LSQ) and AdaRound alphas."""

    def __init__(
        self,
        module: nn.Module,
        info: LayerInfo,
        config: CalibrationConfig,
        input_scale: float,
        input_zero_point: float,
    ) -> None:
        super().__init__()
        self.module = module
        self.axis = info.weight_axis
        self.bits = config.bits
        self.act_range = activation_range(config.bits, config.symmetric)
        self.w_range = weight_range(config.bits)
        w = module.weight.detach()
        self.register_buffer("weight", w.clone())
        self.register_buffer("act_scale0", torch.tensor(input_scale, dtype=torch.float32))
        self.register_buffer("act_zp", torch.tensor(input_zero_point, dtype=torch.float32))
        self.register_buffer("w_scale0", weight_scales(w, self.axis, config.bits))
        self.log_act = nn.Parameter(torch.zeros(()))
        learn_w = config.learn_weight_scale and not config.adaround
        self.log_w = nn.Parameter(torch.zeros_like(self.w_scale0)) if learn_w else None
        self.alpha = (
            nn.Parameter(adaround_init(w, self.w_scale0, self.axis)) if config.adaround else None
        )

    def act_scale(self) -> torch.Tensor:
        return self.act_scale0 * torch.exp(self.log_act)

    def w_scale(self) -> torch.Tensor:
        return self.w_scale0 if self.log_w is None else self.w_scale0 * torch.exp(self.log_w)

    def quant_weight(self, hard: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight (only output ``rows`` of a Linear weight if given)."""
        weight, w_scale0 = self.weight, self.w_scale0
        alpha = self.alpha
        scale = self.w_scale()
        if rows is not None:
            weight, w_scale0, scale = weight[rows], w_scale0[rows], scale[rows]
            alpha = None if alpha is None else alpha[rows]
        if alpha is not None:
            return adaround_weight(weight, w_scale0, alpha, self.axis, self.bits, hard)
        s = scale.view(channel_shape(weight.dim(), self.axis))
        return fake_quantize(weight, s, 0.0, self.w_range, ste=not hard)

    def forward(
        self,
        x: torch.Tensor,
        cache: LayerCache,
        hard: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Quantized output on items ``x``; ``rows`` restricts a Linear layer's outputs (the
        loss of a Linear layer is a sum over output rows, so a random subset of rows is an
        unbiased estimate: it keeps steps on the 21918-row mesh layer cheap)."""
        xq = fake_quantize(x, self.act_scale(), self.act_zp, self.act_range, ste=not hard)
        if rows is not None:
            bias = None if self.module.bias is None else self.module.bias[rows]
            return torch.nn.functional.linear(xq, self.quant_weight(hard, rows), bias)
        return cache.output(self.module, xq, self.quant_weight(hard))

    def frozen(self) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(activation scale, float32 weight scales [C], int8 AdaRound weights or None)."""
        with torch.no_grad():
            act = float(self.act_scale().float())
            w_scale = self.w_scale().float().numpy().astype(np.float32)
            w_int = None
            if self.alpha is not None:
                w_int = adaround_integers(
                    self.weight, self.w_scale0, self.alpha, self.axis, self.bits
                )
        return act, w_scale, w_int


@torch.no_grad()
def evaluate(layer: TrainableLayer, cache: LayerCache) -> tuple[float, float | None]:
    """(masked MSE over every item, temporal term over every pair or None), hard rounding."""
    total = weight_sum = 0.0
    preds = []
    for start in range(0, len(cache), EVAL_BATCH):
        sl = slice(start, start + EVAL_BATCH)
        pred = layer(cache.x[sl], cache, hard=True)
        preds.append(pred - cache.y[sl])
        m = None if cache.mask is None else cache.mask[sl]
        w = float(pred[:, :1].numel()) if m is None else float(m.sum())
        total += float(masked_mse(pred, cache.y[sl], m)) * max(w, 1.0)
        weight_sum += max(w, 1.0)
    temporal = None
    if len(cache.pairs):
        err = torch.cat(preds)
        p, q = cache.pairs[:, 0], cache.pairs[:, 1]
        temporal = float(
            masked_temporal(err[q], err[p], None if cache.mask is None else cache.mask[q])
        )
    rms = math.sqrt(cache.energy)
    return total / weight_sum / cache.energy, None if temporal is None else temporal / rms


def optimize(
    layer: TrainableLayer, cache: LayerCache, config: CalibrationConfig, gen: torch.Generator
) -> list[float]:
    """Adam on the layer's quantizer parameters; returns the masked-MSE curve per step."""
    groups = [{"params": [layer.log_act] + ([layer.log_w] if layer.log_w is not None else [])}]
    if layer.alpha is not None:
        groups.append({"params": [layer.alpha], "lr": config.lr * ADAROUND_LR_FACTOR})
    opt = torch.optim.Adam(groups, lr=config.lr)
    iters = config.iters
    base = [g["lr"] for g in opt.param_groups]
    use_temporal = config.temporal_weight > 0 and len(cache.pairs) > 0
    curve: list[float] = []
    window = max(5, iters // 20)
    best = math.inf
    stale = 0
    for step in range(iters):
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, iters)))
        idx = torch.randint(len(cache), (config.batch,), generator=gen)
        rows = None
        if cache.mask is None and cache.y.dim() == 2 and cache.y.shape[1] > ROW_SAMPLE:
            rows = torch.randperm(cache.y.shape[1], generator=gen)[:ROW_SAMPLE]

        def target(items: torch.Tensor, rows: torch.Tensor | None = rows) -> torch.Tensor:
            y = cache.y[items]
            return y if rows is None else y[:, rows]

        mask = None if cache.mask is None else cache.mask[idx]
        pred = layer(cache.x[idx], cache, rows=rows)
        loss = masked_mse(pred, target(idx), mask) / cache.energy
        objective = loss
        if use_temporal:
            pick = cache.pairs[torch.randint(len(cache.pairs), (config.batch,), generator=gen)]
            p, q = pick[:, 0], pick[:, 1]
            e_prev = layer(cache.x[p], cache, rows=rows) - target(p)
            e_now = layer(cache.x[q], cache, rows=rows) - target(q)
            mq = None if cache.mask is None else cache.mask[q]
            temporal = masked_temporal(e_now, e_prev, mq) / math.sqrt(cache.energy)
            objective = objective + config.temporal_weight * temporal
        if layer.alpha is not None:
            beta = adaround_beta(step, iters)
            if beta is not None:
                alpha = layer.alpha if rows is None else layer.alpha[rows]
                reg = adaround_regularizer(alpha, beta) / alpha.numel()
                objective = objective + config.adaround_lambda * reg
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()
        curve.append(loss.item())
        if layer.alpha is None and len(curve) % window == 0:
            recent = sum(curve[-window:]) / window
            if recent < best * (1 - PLATEAU_REL):
                best, stale = recent, 0
            else:
                stale += 1
                if stale >= config.patience:
                    break
    return curve


# ------------------------------------------------------------------ the driver
def _init_activation(cache: LayerCache, config: CalibrationConfig) -> tuple[float, float]:
    scale, zp, _ = search_activation_range(
        cache.x, cache.in_mask, config.bits, config.symmetric, init=config.range_init
    )
    return scale, zp


def reconstruct(
    reference: nn.Module,
    work: nn.Module,
    layers: list[LayerInfo],
    plan: dict[str, str],
    samples: CalibrationSamples,
    visibility: torch.Tensor | None,
    config: CalibrationConfig,
    progress: Progress | None = None,
) -> dict[str, LayerCalibration]:
    """Calibrate the int8 layers of ``plan`` one after another (POCA).

    ``reference`` is the FP32 decoder; ``work`` a copy whose fp16 layers are already
    installed; each calibrated layer is installed into ``work`` before later inputs are
    captured. Returns {layer: calibration} for the int8 layers.
    """
    todo = [info for info in layers if plan[info.name] == "int8"]
    say = progress or (lambda *_: None)
    say("caching FP32 targets", 0, len(todo))
    gen = torch.Generator().manual_seed(config.seed)
    crops = {
        info.name: plan_crops(
            get_layer(reference, info.name), info, samples, visibility, config, gen
        )
        for info in todo
    }
    targets = reference_targets(reference, todo, crops, samples, visibility, config)
    upstream = upstream_layers(reference, layers)
    cost = cumulative_cost(layers)
    final = {name for name, precision in plan.items() if precision != "int8"}
    inputs: dict[str, torch.Tensor] = {}
    out: dict[str, LayerCalibration] = {}
    for index, info in enumerate(todo):
        say(f"calibrating {info.name}", index, len(todo))
        if info.name not in inputs:
            group = [info.name] + [
                m.name
                for m in todo[index + 1 :]
                if m.name not in inputs
                and upstream[m.name] <= final
                and cost[m.name] <= cost[info.name] + GROUP_SLACK
            ]
            inputs.update(capture_inputs(work, group, crops, samples))
        cache = make_cache(inputs.pop(info.name), targets.pop(info.name), crops[info.name], samples)
        calibration = calibrate_layer(reference, info, cache, config, index)
        out[info.name] = calibration
        install(work, {info.name: calibration.module(get_layer(work, info.name))})
        final.add(info.name)
        del cache
    say("calibrated", len(todo), len(todo))
    return out


def calibrate_layer(
    reference: nn.Module, info: LayerInfo, cache: LayerCache, config: CalibrationConfig, index: int
) -> LayerCalibration:
    """Grid-search init, masked LSQ (+ AdaRound) reconstruction, frozen calibration."""
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    act_scale, act_zp = _init_activation(cache, config)
    layer = TrainableLayer(get_layer(reference, info.name), info, config, act_scale, act_zp)
    initial, temporal_initial = evaluate(layer, cache)
    start = {k: v.detach().clone() for k, v in layer.named_parameters(recurse=False)}
    curve = optimize(layer, cache, config, gen) if config.iters else []
    final, temporal_final = evaluate(layer, cache)

    def objective(mse: float, temporal: float | None) -> float:
        return mse + config.temporal_weight * (temporal or 0.0)

    reverted = objective(final, temporal_final) > objective(initial, temporal_initial)
    if reverted:  # the stochastic steps ended worse on the whole cache: keep the start
        with torch.no_grad():
            for k, v in layer.named_parameters(recurse=False):
                v.copy_(start[k])
        final, temporal_final = initial, temporal_initial
    scale, w_scale, w_int = layer.frozen()
    loss = {
        "initial": initial,
        "final": final,
        "iters": len(curve),
        "items": len(cache),
        "reverted": reverted,
        "curve": [float(np.float32(v)) for v in curve],
    }
    if temporal_initial is not None:
        loss["temporal_initial"] = temporal_initial
        loss["temporal_final"] = temporal_final
    return LayerCalibration.for_layer(
        info,
        "int8",
        config.bits,
        config.symmetric,
        input_scale=scale,
        input_zero_point=int(round(act_zp)),
        weight_scale=w_scale,
        rounding="adaround" if w_int is not None else "nearest",
        weight_int=w_int,
        loss=loss,
    )
