"""What reconstruction optimizes on: per-layer caches of inputs, FP32 targets and masks.

Fine layers are cached as crops: an output window of ``crop`` x ``crop`` texels and the
input window that determines it exactly (zeros outside the image, which is what the
layer's own padding supplies), so time and memory do not grow with the texture size.
Crop centres are drawn where the sample's camera sees the texture; the frames of a clip
share their crop windows (the temporal term compares the same texels).

Costs are kept low in two ways: the FP32 targets and masks of every layer come from ONE
pass of the FP32 decoder, and a capture pass of the partly quantized decoder stops at the
last layer it needs, also picking up the inputs of later layers whose upstream layers are
all final already (the mesh layer's input is final once ``z_fc`` is calibrated, but its
hook fires after the whole texture decoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from avatarq.calibration.config import CalibrationConfig
from avatarq.calibration.layers import LayerInfo, get_layer
from avatarq.calibration.masks import input_mask, layer_mask, pool_mask
from avatarq.calibration.samples import CalibrationSamples, decoder_args
from avatarq.core.progress import Progress
from avatarq.errors import InternalError
from avatarq.models.declaration import declaration_of

CAPTURE_BATCH = 8
# a capture pass may run this fraction of the decoder's MACs further to pick up a later layer
GROUP_SLACK = 0.05


@dataclass
class CalibrationRun:
    """What one calibration works on.

    Attributes:
        reference: the FP32 decoder (eval mode).
        layers: its quantizable layers in forward order.
        plan: {layer name: precision} ("w8a8", "fp16", ...) for every layer.
        samples: the N calibration inputs.
        visibility: texel visibility V [N, H, W] in {0, 1} per sample, or None (no masks).
        config: the calibration settings.
        progress: called with (stage, done, total), or None.
    """

    reference: nn.Module
    layers: list[LayerInfo]
    plan: dict[str, str]
    samples: CalibrationSamples
    visibility: torch.Tensor | None
    config: CalibrationConfig
    progress: Progress | None = None


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


@torch.no_grad()
def capture(model: nn.Module, name: str, *args: torch.Tensor, what: str) -> torch.Tensor:
    """The input (``what="input"``) or output of submodule ``name`` for a batch of the
    decoder's inputs ``args`` (z, view for a DAM)."""
    box: list[torch.Tensor] = []

    def hook(module, inputs, output):
        box.append((inputs[0] if what == "input" else output).detach())
        raise _Stop

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        model(*args)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not box:
        raise InternalError(f"layer {name!r} did not run")
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
        return oa // self.align + self.offset


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
        d = -((k - p - 1) // s)  # ceil((p - k + 1) / s)
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


@dataclass(frozen=True)
class CropPlan:
    """How one layer is cached: whole (geometry None, k = 1) or as k crops per sample."""

    geometry: CropGeometry | None
    k: int
    positions: tuple[tuple[tuple[int, int], ...], ...] = ()

    def inputs(self, x: torch.Tensor, sample0: int) -> list[torch.Tensor]:
        """Items of a batch of inputs x [b, ...] whose first sample has index ``sample0``."""
        g = self.geometry
        if g is None:
            return [x]
        return [
            crop2d(x[j : j + 1], g.input_start(oy), g.input_start(ox), g.in_size, g.in_size)
            for j in range(x.shape[0])
            for oy, ox in self.positions[sample0 + j]
        ]

    def outputs(self, y: torch.Tensor, sample0: int) -> list[torch.Tensor]:
        """Items of a batch of outputs (or output masks) y [b, C, H, W]."""
        g = self.geometry
        if g is None:
            return [y]
        return [
            y[j : j + 1, :, oy : oy + g.size, ox : ox + g.size]
            for j in range(y.shape[0])
            for oy, ox in self.positions[sample0 + j]
        ]


def plan_crops(run: CalibrationRun, info: LayerInfo, gen: torch.Generator) -> CropPlan:
    """Where the crops of layer ``info``'s outputs lie per sample (one plan per clip,
    positions drawn from ``gen`` weighted by visibility); uncropped for small layers."""
    config, samples, visibility = run.config, run.samples, run.visibility
    module = get_layer(run.reference, info.name)
    if not info.spatial or info.out_shape[-1] <= config.crop:
        return CropPlan(None, 1)
    geometry = crop_geometry(module, config.crop)
    if geometry is None:
        return CropPlan(None, 1)
    n, size, k = len(samples), info.out_shape[-1], config.crops_per_sample
    weights = pool_mask(visibility, size)[:, 0] if visibility is not None else None
    group_of = list(range(n))
    for clip in samples.clips:
        for i in clip:
            group_of[i] = clip[0]
    positions: list[tuple[tuple[int, int], ...]] = [()] * n
    for i in range(n):
        if group_of[i] == i:
            w = weights[i] if weights is not None else torch.ones(size, size)
            positions[i] = tuple(_crop_positions(w, k, config.crop, geometry.align, gen))
    return CropPlan(geometry, k, tuple(positions[group_of[i]] for i in range(n)))


# ------------------------------------------------------------------ FP32 targets
@dataclass
class Targets:
    """FP32 side of a layer's cache: outputs, output masks and input masks per item."""

    y: torch.Tensor
    mask: torch.Tensor | None
    in_mask: torch.Tensor | None


@torch.no_grad()
def reference_targets(
    run: CalibrationRun, layers: list[LayerInfo], plans: dict[str, CropPlan]
) -> dict[str, Targets]:
    """One FP32 pass over the samples: each layer's output items, mask M = V_l * S and the
    mask carried to its input resolution (zero outside the image for crops)."""
    parts: dict[str, dict[str, list]] = {info.name: {"y": [], "m": [], "im": []} for info in layers}
    state = {"start": 0, "vis": None}
    handles = []
    for info in layers:

        def hook(module, inputs, output, info=info):
            plan, start = plans[info.name], state["start"]
            y = output.detach()
            m = layer_mask(y, state["vis"], run.config.tau)
            im = (
                input_mask(m, info.in_shape[-1])
                if m is not None and len(info.in_shape) == 3
                else None
            )
            bucket = parts[info.name]
            bucket["y"] += plan.outputs(y, start) if y.dim() == 4 else [y]
            bucket["m"] += plan.outputs(m, start) if m is not None else [None]
            bucket["im"] += plan.inputs(im, start) if im is not None else [None]

        handles.append(get_layer(run.reference, info.name).register_forward_hook(hook))
    try:
        for start in range(0, len(run.samples), CAPTURE_BATCH):
            stop = min(start + CAPTURE_BATCH, len(run.samples))
            state["start"] = start
            state["vis"] = None if run.visibility is None else run.visibility[start:stop]
            run.reference(*decoder_args(run.reference, run.samples, start, stop))
    finally:
        for h in handles:
            h.remove()

    def cat(items: list) -> torch.Tensor | None:
        return None if any(i is None for i in items) else torch.cat(items).contiguous()

    return {
        name: Targets(torch.cat(p["y"]).contiguous(), cat(p["m"]), cat(p["im"]))
        for name, p in parts.items()
    }


@torch.no_grad()
def capture_inputs(
    work: nn.Module,
    names: list[str],
    plans: dict[str, CropPlan],
    samples: CalibrationSamples,
) -> dict[str, torch.Tensor]:
    """One pass of ``work`` over the samples collecting the input items of ``names``; each
    batch stops as soon as every one of them has run."""
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    state = {"start": 0, "seen": set()}
    handles = []
    for name in names:

        def hook(module, inputs, output, name=name):
            parts[name] += plans[name].inputs(inputs[0].detach(), state["start"])
            state["seen"].add(name)
            if len(state["seen"]) == len(names):
                raise _Stop

        handles.append(work.get_submodule(name).register_forward_hook(hook))
    try:
        for start in range(0, len(samples), CAPTURE_BATCH):
            stop = min(start + CAPTURE_BATCH, len(samples))
            state["start"], state["seen"] = start, set()
            try:
                work(*decoder_args(work, samples, start, stop))
            except _Stop:
                pass
            if len(state["seen"]) != len(names):
                raise InternalError(f"layers {sorted(set(names) - state['seen'])} did not run")
    finally:
        for h in handles:
            h.remove()
    return {name: torch.cat(p).contiguous() for name, p in parts.items()}


# ------------------------------------------------------------------ the graph
def upstream_layers(decoder: nn.Module, layers: list[LayerInfo]) -> dict[str, frozenset[str]]:
    """{layer: the layers whose weights its input depends on} (walks the autograd graph of
    one batch-1 forward; nothing is differentiated)."""
    modules = {info.name: get_layer(decoder, info.name) for info in layers}
    owner = {id(m.weight): name for name, m in modules.items()}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(module, args, output) -> None:
            inputs.setdefault(name, args[0])

        return hook

    handles = [m.register_forward_hook(keep(name)) for name, m in modules.items()]
    flags = {name: m.weight.requires_grad for name, m in modules.items()}
    try:
        for m in modules.values():
            m.weight.requires_grad_(True)
        with torch.enable_grad():
            decoder(*declaration_of(decoder).example_inputs(1))
    finally:
        for h in handles:
            h.remove()
        for name, m in modules.items():
            m.weight.requires_grad_(flags[name])
    out = {}
    for name, x in inputs.items():
        found: set[str] = set()
        seen: set[int] = set()
        stack = [x.grad_fn] if x.grad_fn is not None else []
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None and id(var) in owner:
                found.add(owner[id(var)])
            stack.extend(f for f, _ in fn.next_functions)
        out[name] = frozenset(found)
    return out


def layer_macs(info: LayerInfo) -> int:
    """Multiply-accumulates of one sample through the layer."""
    w = 1
    for d in info.weight_shape:
        w *= d
    if info.kind == "linear":
        return w
    if info.kind == "conv_transpose":
        return w * info.in_shape[-1] * info.in_shape[-2]
    return w * info.out_shape[-1] * info.out_shape[-2]


def cumulative_cost(layers: list[LayerInfo]) -> dict[str, float]:
    """Fraction of the decoder's layer MACs done when each layer's output is ready."""
    total = sum(layer_macs(info) for info in layers) or 1
    out, acc = {}, 0
    for info in layers:
        acc += layer_macs(info)
        out[info.name] = acc / total
    return out
