"""Sequential layer-wise reconstruction (POCA / AdaRound / BRECQ style).

For each quantized layer, coarse to fine: take this layer's input x from the decoder with
every earlier layer already quantized, and its FP32 output y and mask M (masks.py) from the
FP32 decoder (cache.py: crops for fine layers); initialize the activation scale by the
masked shrinking grid search and the weight scales by per-channel (or per-block) max or
least-error shrink; optionally pick the weight integers by mask-weighted GPTQ (gptq.py);
minimize the masked MSE ``sum((layer_q(x) - y)^2 * M) / (C * sum(M))``, divided by the
masked mean of y^2 (so the loss reads as the layer's output noise-to-signal ratio), with
Adam over the log-scales (LSQ with straight-through rounding) and, optionally, AdaRound's
rounding variables, plus an optional temporal term on consecutive clip frames; freeze the
layer and move on. A rotated layer (Hadamard) does all of this on its rotated input and
weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from avatarq.calibration import gptq
from avatarq.calibration.artifact import LayerCalibration
from avatarq.calibration.cache import (
    GROUP_SLACK,
    CalibrationRun,
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
from avatarq.calibration.formats import LayerFormat, parse_format
from avatarq.calibration.hadamard import rotate_weight, rotation_matrix
from avatarq.calibration.layers import (
    LayerInfo,
    get_layer,
    install,
    is_quantized,
    layer_forward,
    rotate_input,
)
from avatarq.calibration.quantizers import (
    WeightLayout,
    activation_range,
    adaround_beta,
    adaround_init,
    adaround_integers,
    adaround_regularizer,
    adaround_weight,
    fake_quantize,
    layer_block,
    mse_weight_scales,
    search_activation_range,
    weight_range,
    weight_scales,
)
from avatarq.calibration.samples import CalibrationSamples
from avatarq.core.progress import or_silent

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
    run: CalibrationRun, work: nn.Module, info: LayerInfo, gen: torch.Generator
) -> LayerCache:
    """One layer's cache: inputs from ``work`` (earlier layers quantized), targets from the
    FP32 ``run.reference``."""
    plan = plan_crops(run, info, gen)
    targets = reference_targets(run, [info], {info.name: plan})
    x = capture_inputs(work, [info.name], {info.name: plan}, run.samples)[info.name]
    return make_cache(x, targets[info.name], plan, run.samples)


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


def initial_weight_scale(
    weight: torch.Tensor, layout: WeightLayout, fmt: LayerFormat, search: str
) -> torch.Tensor:
    """Compact weight scales before any learning: amax ("max") or least-error shrink ("mse")."""
    if search == "mse":
        return mse_weight_scales(weight, layout, fmt.weight_grid)
    return weight_scales(weight, layout.axis, fmt.weight_grid, layout)


class TrainableLayer(nn.Module):
    """A layer with learnable quantizers: log-scale offsets (LSQ) and AdaRound alphas.

    ``codes`` fixes the weight integers (GPTQ): only the activation scale is then learned.
    ``rotation`` R [n, Cin] rotates the input channels and the weight (Hadamard).
    """

    def __init__(
        self,
        module: nn.Module,
        info: LayerInfo,
        config: CalibrationConfig,
        input_scale: float,
        input_zero_point: float,
        fmt: LayerFormat | None = None,
        codes: torch.Tensor | None = None,
        rotation: torch.Tensor | None = None,
        w_scale0: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        fmt = fmt or parse_format(config.bits)
        self.module = module
        self.fmt = fmt
        self.axis = info.weight_axis
        self.act_range = activation_range(fmt.act_grid, config.symmetric)
        self.w_range = weight_range(fmt.weight_grid)
        self.rotation = rotation
        w = module.weight.detach()
        if rotation is not None:
            w = rotate_weight(w, info.input_axis, rotation)
        block = layer_block(w.shape[info.input_axis], config.weight_block)
        self.layout = WeightLayout(info.weight_axis, info.input_axis, block)
        self.register_buffer("weight", w.clone())
        self.register_buffer("act_scale0", torch.tensor(input_scale, dtype=torch.float32))
        self.register_buffer("act_zp", torch.tensor(input_zero_point, dtype=torch.float32))
        if w_scale0 is None:
            w_scale0 = initial_weight_scale(w, self.layout, fmt, config.weight_search)
        self.register_buffer("w_scale0", w_scale0.float())
        self.codes = None if codes is None else codes.float()
        self.log_act = nn.Parameter(torch.zeros(()))
        learn_w = config.learn_weight_scale and not config.adaround and codes is None
        self.log_w = nn.Parameter(torch.zeros_like(self.w_scale0)) if learn_w else None
        self.alpha = (
            nn.Parameter(adaround_init(w, self.full_scale(self.w_scale0), self.axis))
            if config.adaround
            else None
        )

    def act_scale(self) -> torch.Tensor:
        return self.act_scale0 * torch.exp(self.log_act)

    def w_scale(self) -> torch.Tensor:
        """The compact weight scale ([C] or blocked)."""
        return self.w_scale0 if self.log_w is None else self.w_scale0 * torch.exp(self.log_w)

    def full_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """A compact scale broadcast to the weight's shape."""
        return self.layout.expand(scale, tuple(self.weight.shape))

    def quant_weight(self, hard: bool, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The fake-quantized weight (only output ``rows`` of a Linear weight if given)."""
        weight, alpha = self.weight, self.alpha
        if self.codes is not None:
            q = self.codes * self.full_scale(self.w_scale0)
            return q if rows is None else q[rows]
        scale = self.full_scale(self.w_scale())
        scale0 = self.full_scale(self.w_scale0)
        if rows is not None:
            weight, scale, scale0 = weight[rows], scale[rows], scale0[rows]
            alpha = None if alpha is None else alpha[rows]
        if alpha is not None:
            return adaround_weight(weight, scale0, alpha, self.axis, self.fmt.weight_grid, hard)
        return fake_quantize(weight, scale, 0.0, self.w_range, ste=not hard)

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
        if self.rotation is not None:
            x = rotate_input(x, self.rotation)
        xq = fake_quantize(x, self.act_scale(), self.act_zp, self.act_range, ste=not hard)
        if rows is not None:
            bias = None if self.module.bias is None else self.module.bias[rows]
            return torch.nn.functional.linear(xq, self.quant_weight(hard, rows), bias)
        return cache.output(self.module, xq, self.quant_weight(hard))

    def frozen(self) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(activation scale, float32 compact weight scales, int8 learned weights or None)."""
        with torch.no_grad():
            act = float(self.act_scale().float())
            w_scale = self.w_scale().float().numpy().astype(np.float32)
            w_int = None
            if self.codes is not None:
                w_int = self.codes.numpy().astype(np.int8)
            elif self.alpha is not None:
                w_int = adaround_integers(
                    self.weight,
                    self.full_scale(self.w_scale0),
                    self.alpha,
                    self.axis,
                    self.fmt.weight_grid,
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
def _init_activation(
    cache: LayerCache,
    config: CalibrationConfig,
    fmt: LayerFormat,
    rotation: torch.Tensor | None = None,
) -> tuple[float, float]:
    x = cache.x if rotation is None else rotate_input(cache.x, rotation)
    scale, zp, _ = search_activation_range(
        x, cache.in_mask, fmt.act_grid, config.symmetric, init=config.range_init
    )
    return scale, zp


def reconstruct(run: CalibrationRun, work: nn.Module) -> dict[str, LayerCalibration]:
    """Calibrate the quantized layers of ``run.plan`` one after another (POCA).

    ``work`` is a copy of ``run.reference`` (the FP32 decoder) whose float layers are
    already installed; each calibrated layer is installed into ``work`` before later inputs
    are captured. Returns {layer: calibration} for the quantized layers.
    """
    reference, layers, plan = run.reference, run.layers, run.plan
    samples, config = run.samples, run.config
    todo = [info for info in layers if is_quantized(plan[info.name])]
    say = or_silent(run.progress)
    say("caching FP32 targets", 0, len(todo))
    gen = torch.Generator().manual_seed(config.seed)
    crops = {info.name: plan_crops(run, info, gen) for info in todo}
    targets = reference_targets(run, todo, crops)
    upstream = upstream_layers(reference, layers)
    cost = cumulative_cost(layers)
    final = {name for name, precision in plan.items() if not is_quantized(precision)}
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
        fmt = parse_format(plan[info.name])
        calibration = calibrate_layer(reference, info, cache, config, index, fmt)
        out[info.name] = calibration
        install(work, {info.name: calibration.module(get_layer(work, info.name))})
        final.add(info.name)
        del cache
    say("calibrated", len(todo), len(todo))
    return out


def gptq_codes(
    module: nn.Module,
    info: LayerInfo,
    cache: LayerCache,
    layer: TrainableLayer,
    config: CalibrationConfig,
) -> tuple[torch.Tensor, dict]:
    """GPTQ integers of ``layer``'s (stored) weight with its initial scales, from the
    mask-weighted Hessian of ``cache``; and {"nearest", "gptq"}: the masked output error of
    nearest rounding and of GPTQ on the cache, relative to the masked output energy."""
    g = cache.geometry
    window = None if g is None else (g.out_start, g.size)
    rotate = None
    if layer.rotation is not None:
        rotation = layer.rotation

        def rotate(x: torch.Tensor) -> torch.Tensor:
            return rotate_input(x, rotation)

    h = gptq.layer_hessian(module, cache.x, cache.mask, window, rotate)
    w2 = gptq.to_matrix(layer.weight, info.kind)
    s2 = gptq.to_matrix(layer.full_scale(layer.w_scale0), info.kind)
    q2 = gptq.gptq_round(w2, s2, h, layer.w_range, config.gptq_damp, config.gptq_act_order)
    rtn = gptq.nearest_integers(w2, s2, layer.w_range)
    norm = max(float(torch.diagonal(h).sum()) / 2.0, 1e-30)
    errors = {
        "nearest": gptq.masked_output_error(w2, rtn * s2, h) / norm,
        "gptq": gptq.masked_output_error(w2, q2 * s2, h) / norm,
    }
    return gptq.from_matrix(q2, info.kind, tuple(layer.weight.shape)), errors


def calibrate_layer(
    reference: nn.Module,
    info: LayerInfo,
    cache: LayerCache,
    config: CalibrationConfig,
    index: int,
    fmt: LayerFormat | None = None,
) -> LayerCalibration:
    """Grid-search init, optional GPTQ rounding, masked LSQ (+ AdaRound) reconstruction,
    frozen calibration."""
    fmt = fmt or parse_format(config.bits)
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
    module = get_layer(reference, info.name)
    rotation = rotation_matrix(info.in_channels) if config.hadamard else None
    act_scale, act_zp = _init_activation(cache, config, fmt, rotation)
    layer = TrainableLayer(module, info, config, act_scale, act_zp, fmt, rotation=rotation)
    gptq_errors = None
    if config.gptq and fmt.kind == "int" and gptq.supported(module):
        codes, gptq_errors = gptq_codes(module, info, cache, layer, config)
        layer = TrainableLayer(
            module, info, config, act_scale, act_zp, fmt, codes, rotation, layer.w_scale0
        )
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
    if gptq_errors is not None:
        loss["gptq"] = gptq_errors
    rounding = "nearest"
    if layer.codes is not None:
        rounding = "gptq"
    elif w_int is not None:
        rounding = "adaround"
    return LayerCalibration.for_layer(
        info,
        fmt,
        config.symmetric,
        input_scale=scale,
        input_zero_point=int(round(act_zp)),
        weight_scale=w_scale,
        weight_block=layer.layout.block,
        rounding=rounding,
        weight_int=w_int,
        rotation=0 if rotation is None else int(rotation.shape[0]),
        loss=loss,
    )
