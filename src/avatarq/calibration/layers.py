"""The quantizable layers of a decoder and the module that runs one of them quantized.

A quantizable layer is a plain ``nn.Linear``, ``nn.Conv2d`` or ``nn.ConvTranspose2d`` of
the deployable decoder, named by its module path (``dec.texture_decoder.upsample.0.conv1
.deconv``, ``dec.mesh_fc`` ...): the same name as its checkpoint key and its ONNX weight
initializer. Layers are listed in execution order, which for the DAM family is coarse to
fine (what sequential reconstruction needs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avatarq.calibration.formats import parse_format
from avatarq.calibration.quantizers import (
    Grid,
    activation_range,
    dequantize_weight,
    fake_quantize,
)
from avatarq.errors import AvatarqError, InternalError

QUANTIZABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
KINDS = {nn.Linear: "linear", nn.Conv2d: "conv", nn.ConvTranspose2d: "conv_transpose"}
FLOAT_PRECISIONS = ("fp16", "fp32")


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable layer.

    Attributes:
        name: module path inside the decoder.
        kind: "linear" | "conv" | "conv_transpose".
        weight_shape: shape of the (plain, folded) weight.
        weight_axis: the output-channel axis of the weight (0; 1 for ConvTranspose2d,
            whose weight is [Cin, Cout, kH, kW]).
        in_shape, out_shape: per-sample activation shapes ([F] or [C, H, W]).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_axis: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def spatial(self) -> bool:
        return len(self.out_shape) == 3

    @property
    def out_channels(self) -> int:
        return self.weight_shape[self.weight_axis]

    @property
    def input_axis(self) -> int:
        """The input-channel axis of the weight (1; 0 for ConvTranspose2d)."""
        return 1 - self.weight_axis

    @property
    def in_channels(self) -> int:
        return self.weight_shape[self.input_axis]


def _kind(module: nn.Module) -> str:
    for cls, kind in KINDS.items():
        if type(module) is cls:
            return kind
    raise InternalError(f"{type(module).__name__} is not a quantizable layer")


def _unwrap(module: nn.Module) -> nn.Module:
    return module.inner if isinstance(module, QuantizedLayer) else module


def discover_layers(decoder: nn.Module) -> list[LayerInfo]:
    """Quantizable layers of ``decoder`` in execution order (one batch-1 forward on CPU).

    ``decoder`` takes its declared inputs (z [B, Z], view [B, 3] for a DAM), fed
    `DecoderDeclaration.example_inputs`; layers already wrapped in `QuantizedLayer` are
    reported under their original name.
    """
    order: list[LayerInfo] = []
    handles = []
    for name, module in decoder.named_modules():
        if isinstance(module, QuantizedLayer) or (
            type(module) in KINDS and not _inside_wrapper(decoder, name)
        ):

            def hook(mod, inputs, output, name=name):
                inner = _unwrap(mod)
                order.append(
                    LayerInfo(
                        name,
                        _kind(inner),
                        tuple(inner.weight.shape),
                        1 if isinstance(inner, nn.ConvTranspose2d) else 0,
                        tuple(inputs[0].shape[1:]),
                        tuple(output.shape[1:]),
                    )
                )

            handles.append(module.register_forward_hook(hook))
    try:
        from avatarq.models.declaration import declaration_of

        with torch.no_grad():
            decoder(*declaration_of(decoder).example_inputs(1))
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    unique = []
    for info in order:
        if info.name not in seen:
            seen.add(info.name)
            unique.append(info)
    return unique


def _inside_wrapper(root: nn.Module, name: str) -> bool:
    parts = name.split(".")
    for i in range(1, len(parts)):
        if isinstance(root.get_submodule(".".join(parts[:i])), QuantizedLayer):
            return True
    return False


def layer_forward(
    module: nn.Module,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None | str = "module",
) -> torch.Tensor:
    """Run ``module`` (Linear / Conv2d / ConvTranspose2d) on ``x`` with another ``weight``
    (and ``bias``; the default "module" keeps the module's own bias)."""
    if isinstance(bias, str):
        bias = module.bias
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    if isinstance(module, nn.ConvTranspose2d):
        return F.conv_transpose2d(
            x,
            weight,
            bias,
            module.stride,
            module.padding,
            module.output_padding,
            module.groups,
            module.dilation,
        )
    if isinstance(module, nn.Conv2d):
        return F.conv2d(
            x, weight, bias, module.stride, module.padding, module.dilation, module.groups
        )
    raise InternalError(f"{type(module).__name__} is not a quantizable layer")


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def is_quantized(precision: str) -> bool:
    """Whether a precision string names a Q/DQ format (wXaY, fp8, legacy int8)."""
    return precision not in FLOAT_PRECISIONS


def rotate_input(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """Apply a channel rotation R float32 [n, Cin] to x: [B, Cin] -> [B, n] (x @ R^T), or
    [B, Cin, H, W] -> [B, n, H, W] (a 1x1 convolution with R), as the ONNX graph does."""
    if x.dim() == 2:
        return x @ rotation.t()
    return F.conv2d(x, rotation[:, :, None, None])


class QuantizedLayer(nn.Module):
    """A quantizable layer with its deployed numerics (what the exported ONNX computes).

    A quantized precision (a format "wXaY" or "fp8"; "int8" is accepted as before): the
    input goes through a per-tensor Q/DQ with (``input_scale``, ``input_zero_point``) on
    ``input_range`` (an integer grid clipped inside the 8-bit container, or FP8); the
    weight is ``weight_int`` (int8 integers, or float32 FP8 values) times ``weight_scale``
    (per output channel [C] along ``weight_axis``, or full-rank: expanded blocks); bias
    float32. With ``rotation`` R (float32 [n, Cin]) the input is rotated first (`rotate_input`)
    and ``weight_int`` holds the rotated weight (n input channels).
    precision "fp16": input, weight and bias are rounded to float16, the output too (a
    float16 layer between casts). precision "fp32": the layer unchanged. Input and output
    are float32 in every case.
    """

    def __init__(
        self,
        inner: nn.Module,
        precision: str = "fp32",
        input_scale: float = 1.0,
        input_zero_point: float = 0.0,
        input_range: Grid | None = None,
        weight_int: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
        weight_axis: int | None = 0,
        rotation: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        try:
            parse_format(precision, "precision", legacy="w8a8")
        except AvatarqError:
            raise InternalError(f"unknown precision {precision!r}") from None
        self.inner = inner
        self.precision = precision
        self.quantized = is_quantized(precision)
        self.input_range = input_range or activation_range(8)
        self.register_buffer("input_scale", torch.tensor(float(input_scale), dtype=torch.float32))
        self.register_buffer(
            "input_zero_point", torch.tensor(float(input_zero_point), dtype=torch.float32)
        )
        self.weight_axis = weight_axis
        self.rotation = None if rotation is None else rotation.float()
        if self.quantized:
            if weight_int is None or weight_scale is None:
                raise InternalError("a quantized layer needs weight codes and their scales")
            self.register_buffer(
                "weight_dq", dequantize_weight(weight_int, weight_scale, weight_axis)
            )
        elif precision == "fp16":
            self.register_buffer("weight_dq", _fp16(inner.weight.detach()))
        else:
            self.weight_dq = None

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is not None:
            x = rotate_input(x, self.rotation)
        return fake_quantize(x, self.input_scale, self.input_zero_point, self.input_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.precision == "fp32":
            return self.inner(x)
        if self.precision == "fp16":
            bias = self.inner.bias
            bias16 = None if bias is None else _fp16(bias.detach())
            return _fp16(layer_forward(self.inner, _fp16(x), self.weight_dq, bias16))
        return layer_forward(self.inner, self.quantize_input(x), self.weight_dq)


def install(decoder: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
    """Replace (in place) each named layer of ``decoder`` by its `QuantizedLayer`."""
    for name, wrapped in layers.items():
        parent_name, _, attr = name.rpartition(".")
        parent = decoder.get_submodule(parent_name) if parent_name else decoder
        setattr(parent, attr, wrapped)


def get_layer(decoder: nn.Module, name: str) -> nn.Module:
    """The plain layer called ``name`` (through a `QuantizedLayer` wrapper if any)."""
    return _unwrap(decoder.get_submodule(name))


def side_output_layers(decoder: nn.Module, layers: list[LayerInfo]) -> list[str]:
    """Layers that feed neither the texture nor the mesh: only a declared decoder's other
    outputs (kept float by `calibrate` unless its precision overrides say otherwise).

    Found from the autograd graph of one batch-1 forward on the declaration's example
    inputs: a layer whose weight the judged outputs do not depend on. [] for a DAM.
    """
    from avatarq.models.declaration import declaration_of

    declaration = declaration_of(decoder)
    judged = 2 if declaration.mesh else 1
    if len(declaration.outputs) <= judged or not layers:
        return []
    weights = [get_layer(decoder, info.name).weight for info in layers]
    flags = [w.requires_grad for w in weights]
    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            outputs = decoder(*declaration.example_inputs(1))
            total = sum(o.float().sum() for o in outputs[:judged])
            grads = torch.autograd.grad(total, weights, allow_unused=True)
    finally:
        for w, flag in zip(weights, flags, strict=True):
            w.requires_grad_(flag)
    return [info.name for info, g in zip(layers, grads, strict=True) if g is None]
