"""Sequential layer-wise reconstruction (POCA / AdaRound / BRECQ style).

For each int8 layer, coarse to fine: run the decoder with every earlier layer already
quantized and cache this layer's input x; run the FP32 decoder and cache the layer's FP32
output y and its mask M (masks.py); initialize the activation scale by the masked
shrinking grid search and the weight scales by per-channel max; minimize the masked MSE
``sum(((layer_q(x) - y) * M)^2) / (C * sum(M))`` with Adam over the log-scales (LSQ with
straight-through rounding) and, optionally, AdaRound's rounding variables, plus an
optional temporal term on consecutive clip frames; freeze the layer and move on.

Fine layers are calibrated on crops: an output window of ``crop`` x ``crop`` texels and
the input window that determines it exactly (zero outside the image, as the layer's own
padding), so time and memory do not grow with the texture size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from avatarq.calibration.artifact import LayerCalibration
from avatarq.calibration.config import CalibrationConfig
from avatarq.calibration.layers import LayerInfo, get_layer, install, layer_forward
from avatarq.calibration.masks import input_mask, layer_mask, pool_mask
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

CAPTURE_BATCH = 8
EVAL_BATCH = 64
PLATEAU_REL = 1e-3
ADAROUND_LR_FACTOR = 10.0

Progress = Callable[[str, int, int], None]


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def capture(
    model: nn.Module, name: str, z: torch.Tensor, view: torch.Tensor, what: str
) -> torch.Tensor:
    """The input (``what="input"``) or output of submodule ``name`` for a batch (z, view)."""
    box: list[torch.Tensor] = []

    def hook(module, inputs, output):
        box.append((inputs[0] if what == "input" else output).detach())
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        model(z, view)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box[0]


# ------------------------------------------------------------------ crops
@dataclass(frozen=True)
class CropGeometry:
    """Which input window determines an output window of a conv layer exactly.

    For an output window starting at row ``oa`` (a multiple of ``align``) and ``size``
    rows long, the input window starts at ``input_start(oa)`` and is ``in_size`` rows long;
    running the layer (with its own padding) on that window gives the wanted output rows
    at ``out_start`` .. ``out_start + size``. Columns work the same way.
    """

    size: int
    in_size: int
    out_start: int
    align: int
    offset: int

    def input_start(self, oa: int) -> int:
        return oa // self.align + self.offset if self.align > 1 else oa + self.offset


def crop_geometry(module: nn.Module, size: int) -> CropGeometry | None:
    """Geometry for ConvTranspose2d (any k, s, p) and stride-1 Conv2d; None otherwise."""

    def same(v) -> int | None:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        return v[0] if v[0] == v[1] else None

    k, s, p = same(module.kernel_size), same(module.stride), same(module.padding)
    if None in (k, s, p) or same(module.dilation) != 1 or module.groups != 1:
        return None
    if isinstance(module, nn.ConvTranspose2d):
        if same(module.output_padding) != 0 or size % s:
            return None
        d = -((k - p - 1) // s)
        return CropGeometry(size, (size - 1 + p) // s - d + 1, -s * d, s, d)
    if isinstance(module, nn.Conv2d) and s == 1:
        return CropGeometry(size, size + k - 1, p, 1, -p)
    return None


def crop2d(t: torch.Tensor, y0: int, x0: int, h: int, w: int) -> torch.Tensor:
    """t[..., y0:y0+h, x0:x0+w] with zeros where the window leaves the tensor."""
    out = t.new_zeros(*t.shape[:-2], h, w)
    H, W = t.shape[-2:]
    ys, ye = max(y0, 0), min(y0 + h, H)
    xs, xe = max(x0, 0), min(x0 + w, W)
    if ys < ye and xs < xe:
        out[..., ys - y0 : ye - y0, xs - x0 : xe - x0] = t[..., ys:ye, xs:xe]
    return out


def _crop_positions(
    weights: torch.Tensor, k: int, size: int, align: int, gen: torch.Generator
) -> list[tuple[int, int]]:
    """k window origins in an output map; centres drawn where ``weights`` [H, W] > 0."""
    h, w = weights.shape
    flat = weights.reshape(-1).float()
    if float(flat.sum()) <= 0:
        flat = torch.ones_like(flat)
    centres = torch.multinomial(flat, k, replacement=True, generator=gen)
    out = []
    for c in centres.tolist():
        cy, cx = divmod(c, w)
        oy = min(max(cy - size // 2, 0), h - size) // align * align
        ox = min(max(cx - size // 2, 0), w - size) // align * align
        out.append((oy, ox))
    return out


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


def build_cache(
    work: nn.Module,
    reference: nn.Module,
    info: LayerInfo,
    samples: CalibrationSamples,
    visibility: torch.Tensor | None,
    config: CalibrationConfig,
    gen: torch.Generator,
) -> LayerCache:
    """Run ``work`` (earlier layers quantized) and ``reference`` (FP32) over the samples."""
    module = get_layer(reference, info.name)
    n = len(samples)
    geometry = None
    k = 1
    if info.spatial and info.out_shape[-1] > config.crop:
        geometry = crop_geometry(module, config.crop)
        k = config.crops_per_sample if geometry is not None else 1
    positions: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    if geometry is not None:
        size = info.out_shape[-1]
        weights = (
            pool_mask(visibility, size)[:, 0]
            if visibility is not None
            else torch.ones(n, size, size)
        )
        group_of = list(range(n))
        for clip in samples.clips:
            for i in clip:
                group_of[i] = clip[0]
        for i in range(n):
            if group_of[i] == i:
                positions[i] = _crop_positions(weights[i], k, config.crop, geometry.align, gen)
        for i in range(n):
            positions[i] = positions[group_of[i]]
    xs, ys, ms, ims = [], [], [], []
    for start in range(0, n, CAPTURE_BATCH):
        stop = min(start + CAPTURE_BATCH, n)
        z, view = samples.z[start:stop], samples.view[start:stop]
        x = capture(work, info.name, z, view, "input")
        y = capture(reference, info.name, z, view, "output")
        vis = None if visibility is None else visibility[start:stop]
        m = layer_mask(y, vis, config.tau)
        im = input_mask(m, x.shape[-1]) if m is not None and x.dim() == 4 else None
        if geometry is None:
            xs.append(x)
            ys.append(y)
            ms.append(m)
            ims.append(im)
            continue
        g = geometry
        for j in range(stop - start):
            for oy, ox in positions[start + j]:
                iy, ix = g.input_start(oy), g.input_start(ox)
                xs.append(crop2d(x[j : j + 1], iy, ix, g.in_size, g.in_size))
                ys.append(y[j : j + 1, :, oy : oy + g.size, ox : ox + g.size])
                ms.append(m[j : j + 1, :, oy : oy + g.size, ox : ox + g.size])
                ims.append(crop2d(im[j : j + 1], iy, ix, g.in_size, g.in_size))
    mask = None if any(m is None for m in ms) else torch.cat(ms)
    in_m = None if any(m is None for m in ims) else torch.cat(ims)
    pairs = [(p * k + c, q * k + c) for p, q in samples.pairs for c in range(k)]
    y_all = torch.cat(ys).contiguous()
    energy = float(masked_mse(y_all, torch.zeros(()), mask))
    return LayerCache(
        torch.cat(xs).contiguous(),
        y_all,
        mask,
        in_m,
        torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
        geometry,
        energy if energy > 0 else 1.0,
    )


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

    def quant_weight(self, hard: bool) -> torch.Tensor:
        if self.alpha is not None:
            return adaround_weight(
                self.weight, self.w_scale0, self.alpha, self.axis, self.bits, hard
            )
        s = self.w_scale().view(channel_shape(self.weight.dim(), self.axis))
        return fake_quantize(self.weight, s, 0.0, self.w_range, ste=not hard)

    def forward(self, x: torch.Tensor, cache: LayerCache, hard: bool = False) -> torch.Tensor:
        xq = fake_quantize(x, self.act_scale(), self.act_zp, self.act_range, ste=not hard)
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
        mask = None if cache.mask is None else cache.mask[idx]
        pred = layer(cache.x[idx], cache)
        loss = masked_mse(pred, cache.y[idx], mask) / cache.energy
        objective = loss
        if use_temporal:
            pick = cache.pairs[torch.randint(len(cache.pairs), (config.batch,), generator=gen)]
            p, q = pick[:, 0], pick[:, 1]
            e_prev = layer(cache.x[p], cache) - cache.y[p]
            e_now = layer(cache.x[q], cache) - cache.y[q]
            mq = None if cache.mask is None else cache.mask[q]
            temporal = masked_temporal(e_now, e_prev, mq) / math.sqrt(cache.energy)
            objective = objective + config.temporal_weight * temporal
        if layer.alpha is not None:
            beta = adaround_beta(step, iters)
            if beta is not None:
                reg = adaround_regularizer(layer.alpha, beta) / layer.alpha.numel()
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
    scale, zp, _ = search_activation_range(cache.x, cache.in_mask, config.bits, config.symmetric)
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
    installed; each calibrated layer is installed into ``work`` before the next one is
    cached. Returns {layer: calibration} for the int8 layers.
    """
    out: dict[str, LayerCalibration] = {}
    todo = [info for info in layers if plan[info.name] == "int8"]
    for index, info in enumerate(todo):
        if progress is not None:
            progress(f"calibrating {info.name}", index, len(todo))
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + index)
        cache = build_cache(work, reference, info, samples, visibility, config, gen)
        act_scale, act_zp = _init_activation(cache, config)
        module = get_layer(reference, info.name)
        layer = TrainableLayer(module, info, config, act_scale, act_zp)
        initial, temporal_initial = evaluate(layer, cache)
        curve = optimize(layer, cache, config, gen) if config.iters else []
        final, temporal_final = evaluate(layer, cache)
        scale, w_scale, w_int = layer.frozen()
        loss = {
            "initial": initial,
            "final": final,
            "iters": len(curve),
            "items": len(cache),
            "curve": [float(np.float32(v)) for v in curve],
        }
        if temporal_initial is not None:
            loss["temporal_initial"] = temporal_initial
            loss["temporal_final"] = temporal_final
        calibration = LayerCalibration(
            name=info.name,
            kind=info.kind,
            weight_shape=info.weight_shape,
            weight_axis=info.weight_axis,
            precision="int8",
            bits=config.bits,
            symmetric=config.symmetric,
            input_scale=scale,
            input_zero_point=int(round(act_zp)),
            weight_scale=w_scale,
            rounding="adaround" if w_int is not None else "nearest",
            weight_int=w_int,
            loss=loss,
        )
        out[info.name] = calibration
        install(work, {info.name: calibration.module(get_layer(work, info.name))})
        del cache
    if progress is not None:
        progress("calibrated", len(todo), len(todo))
    return out
