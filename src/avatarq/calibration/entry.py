"""`LayerCalibration`: what the calibration decided for one layer, and the numbers it implies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from avatarq.calibration.formats import LayerFormat, parse_format
from avatarq.calibration.hadamard import rotate_weight, rotated_shape, rotation_matrix
from avatarq.calibration.layers import QuantizedLayer
from avatarq.calibration.quantizers import (
    MIN_SCALE,
    WeightLayout,
    activation_range,
    as_float_tensor,
    weight_codes,
    weight_range,
)
from avatarq.errors import AvatarqError

ROUNDINGS = ("nearest", "adaround", "gptq")


def per_channel_amax_np(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| over every axis but ``axis`` (at least MIN_SCALE): float32 [w.shape[axis]]."""
    dims = tuple(d for d in range(w.ndim) if d != axis)
    return np.maximum(np.abs(w).max(axis=dims), MIN_SCALE).astype(np.float32)


@dataclass(frozen=True)
class GraphWeight:
    """A quantized weight as the Q/DQ graph stores it.

    Attributes:
        codes: int8 integers (also for the INT4 container) or float32 FP8 values, in the
            stored shape (the rotated shape when the layer is rotated).
        scale: float32 [C] (per channel), blocked (weight rank) or [] (per tensor).
        axis: DequantizeLinear axis (the block axis for blocks), None per tensor.
        block: block size (0: none).
        container: "int4", "int8" or "float8e4m3fn".
    """

    codes: np.ndarray
    scale: np.ndarray
    axis: int | None
    block: int
    container: str


@dataclass
class LayerCalibration:
    """The calibration of one layer.

    Attributes:
        name, kind, weight_shape, weight_axis: as `LayerInfo`.
        precision: the layer's format (`avatarq.calibration.formats`): "wXaY", "fp8",
            "fp16" or "fp32".
        symmetric: symmetric signed activation grid (else asymmetric unsigned; int only).
        input_scale, input_zero_point: per-tensor activation quantizer (quantized layers).
        weight_scale: float32 weight scales: [C_out] per output channel, or blocked (see
            `WeightLayout`) when ``weight_block`` > 0.
        weight_block: input channels per weight scale block (0: per output channel).
        rounding: "nearest" (codes = clamp(rint(w / s))), "adaround" or "gptq" (learned
            integers in ``weight_int``).
        weight_int: int8 integer weights when the rounding was learned, else None.
        rotation: Hadamard size n when the layer's input channels are rotated (0: none);
            its codes and scales then belong to the rotated weight (n input channels).
        loss: {"initial", "final", "curve", "iters", ...} of the reconstruction.
        sensitivity: output noise-to-signal ratio (or Omega) with this layer alone quantized.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_axis: int
    precision: str
    symmetric: bool = True
    input_scale: float | None = None
    input_zero_point: int | None = None
    weight_scale: np.ndarray | None = None
    weight_block: int = 0
    rounding: str | None = None
    weight_int: np.ndarray | None = None
    rotation: int = 0
    loss: dict = field(default_factory=dict)
    sensitivity: float | None = None

    @classmethod
    def for_layer(
        cls, info, precision: str | LayerFormat, symmetric: bool = True, **fields
    ) -> LayerCalibration:
        """An entry for the layer ``info`` (a `LayerInfo`) with the given format and results."""
        return cls(
            name=info.name,
            kind=info.kind,
            weight_shape=tuple(info.weight_shape),
            weight_axis=info.weight_axis,
            precision=str(precision),
            symmetric=symmetric,
            **fields,
        )

    # ------------------------------------------------------------------ derived
    @property
    def format(self) -> LayerFormat:
        return parse_format(self.precision, f"precision of {self.name!r}")

    @property
    def quantized(self) -> bool:
        return self.format.quantized

    @property
    def weight_bits(self) -> int | None:
        return self.format.weight_bits

    @property
    def act_bits(self) -> int | None:
        return self.format.act_bits

    @property
    def input_axis(self) -> int:
        return 1 - self.weight_axis

    @property
    def layout(self) -> WeightLayout:
        return WeightLayout(self.weight_axis, self.input_axis, self.weight_block)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the quantized weight (input channels padded when rotated)."""
        if self.rotation:
            return rotated_shape(tuple(self.weight_shape), self.input_axis)
        return tuple(self.weight_shape)

    def rotation_matrix(self) -> torch.Tensor | None:
        """R float32 [n, Cin] of a rotated layer, else None."""
        if not self.rotation:
            return None
        return rotation_matrix(self.weight_shape[self.input_axis])

    def stored_weight(self, weight: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The float32 weight that is quantized (rotated when the layer is)."""
        w = as_float_tensor(weight)
        r = self.rotation_matrix()
        return w if r is None else rotate_weight(w, self.input_axis, r)

    def expanded_scale(self) -> torch.Tensor:
        """The weight scale broadcastable to the stored weight: [C] per channel, or the
        blocks expanded to the stored shape."""
        scale = torch.from_numpy(np.asarray(self.weight_scale, np.float32))
        if not self.weight_block:
            return scale
        return self.layout.expand(scale, self.stored_shape)

    def integer_weight(self, weight: torch.Tensor | np.ndarray) -> np.ndarray:
        """Codes of this layer's weight: the learned integers, or nearest rounding (int8;
        float32 FP8 values for fp8 layers)."""
        if not self.quantized:
            raise AvatarqError(
                f"layer {self.name!r} is {self.precision}, it has no integer weights"
            )
        if self.weight_int is not None:
            return self.weight_int
        return weight_codes(
            self.stored_weight(weight),
            self.expanded_scale(),
            self.weight_axis,
            self.format.weight_grid,
        )

    def graph_weight(
        self, weight: torch.Tensor | np.ndarray, conv_transpose_axis: int | None = 1
    ) -> GraphWeight:
        """The quantized weight as a Q/DQ graph stores it.

        ConvTranspose layers may use another scale axis than the calibrated output axis 1:
        0 (per input channel) or None (per tensor); their integers are then re-derived from
        the float weight by max calibration along that axis (a fallback for TensorRT
        versions that reject axis 1; per-channel integer formats without rotation only).
        """
        fmt = self.format
        container = fmt.weight_container
        if self.kind != "conv_transpose" or conv_transpose_axis == self.weight_axis:
            scale = np.asarray(self.weight_scale, np.float32)
            codes = self.integer_weight(weight)
            if self.weight_block:
                return GraphWeight(codes, scale, self.input_axis, self.weight_block, container)
            return GraphWeight(codes, scale, self.weight_axis, 0, container)
        if fmt.kind != "int" or self.weight_block or self.rotation:
            raise AvatarqError(
                f"layer {self.name!r} ({self.precision}"
                f"{', blocks' if self.weight_block else ''}"
                f"{', rotated' if self.rotation else ''}) supports only the calibrated "
                f"ConvTranspose weight axis 1, not {conv_transpose_axis!r}"
            )
        w = self.stored_weight(weight).numpy()
        qmax = weight_range(fmt.weight_bits).qmax
        if conv_transpose_axis is None:
            scale = np.asarray(max(float(np.abs(w).max()), 1e-12) / qmax, np.float32)
            codes = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
            return GraphWeight(codes, scale, None, 0, container)
        scale = per_channel_amax_np(w, conv_transpose_axis) / np.float32(qmax)
        codes = weight_codes(w, scale, conv_transpose_axis, fmt.weight_bits)
        return GraphWeight(codes, scale.astype(np.float32), conv_transpose_axis, 0, container)

    def module(self, inner: nn.Module, conv_transpose_axis: int | None = 1) -> QuantizedLayer:
        """``inner`` wrapped with this calibration's numerics (see `graph_weight`)."""
        if not self.quantized:
            return QuantizedLayer(inner, self.precision, weight_axis=self.weight_axis)
        g = self.graph_weight(inner.weight, conv_transpose_axis)
        if g.block:
            scale = self.layout.expand(torch.from_numpy(g.scale), self.stored_shape)
        else:
            scale = torch.from_numpy(np.asarray(g.scale, np.float32))
        return QuantizedLayer(
            inner,
            self.precision,
            self.input_scale,
            self.input_zero_point,
            activation_range(self.format.act_grid, self.symmetric),
            torch.from_numpy(np.asarray(g.codes)),
            scale,
            g.axis if not g.block else self.weight_axis,
            self.rotation_matrix(),
        )

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "weight_axis": self.weight_axis,
            "precision": self.precision,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "symmetric": self.symmetric,
            "input_scale": self.input_scale,
            "input_zero_point": self.input_zero_point,
            "weight_block": self.weight_block,
            "rounding": self.rounding,
            "rotation": self.rotation,
            "loss": self.loss,
            "sensitivity": self.sensitivity,
        }

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        if self.weight_scale is not None:
            out[f"{self.name}/weight_scale"] = np.asarray(self.weight_scale, np.float32)
        if self.weight_int is not None:
            out[f"{self.name}/weight_int"] = np.asarray(self.weight_int, np.int8)
        return out

    @classmethod
    def from_json(
        cls, entry: dict, tensors: dict[str, np.ndarray], version: int
    ) -> LayerCalibration:
        """Read one layer entry (raises KeyError / ValueError / TypeError when malformed).

        Version 1 entries say "int8" with one ``bits`` N for weights and activations: that
        is the format wNaN.
        """
        name = entry["name"]
        precision = entry["precision"]
        if version == 1 and precision == "int8":
            precision = f"w{int(entry['bits'])}a{int(entry['bits'])}"
        try:
            fmt = parse_format(precision, f"precision of {name!r}")
        except AvatarqError as exc:
            raise ValueError(str(exc)) from None
        if version >= 2:
            if entry.get("bits") is not None:
                raise ValueError(f"layer {name!r} has bits (a version-1 field)")
            for key, bits in (("weight_bits", fmt.weight_bits), ("act_bits", fmt.act_bits)):
                if entry.get(key) is not None and entry[key] != bits:
                    raise ValueError(f"layer {name!r} has {key} {entry[key]!r}, {precision} {bits}")
        shape = entry["weight_shape"]
        if not all(
            isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 20 for d in shape
        ):
            raise ValueError(f"layer {name!r} has weight_shape {shape!r}")
        if not 0 <= entry["weight_axis"] < len(shape):
            raise ValueError(
                f"layer {name!r} has weight_axis {entry['weight_axis']} for {len(shape)}-d weights"
            )
        layer = cls(
            name=name,
            kind=entry["kind"],
            weight_shape=tuple(int(s) for s in shape),
            weight_axis=int(entry["weight_axis"]),
            precision=precision,
            symmetric=bool(entry["symmetric"]),
            input_scale=entry["input_scale"],
            input_zero_point=entry["input_zero_point"],
            weight_block=int(entry.get("weight_block", 0)),
            rounding=entry["rounding"],
            rotation=int(entry.get("rotation", 0)),
            loss=entry.get("loss", {}),
            sensitivity=entry.get("sensitivity"),
        )
        if layer.quantized:
            layer._read_tensors(tensors)
        return layer

    def _read_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        key = f"{self.name}/weight_scale"
        if key not in tensors:
            raise KeyError(f"tensors.npz lacks {key!r}")
        if tensors[key].dtype.kind != "f":
            raise ValueError(f"{key} has dtype {tensors[key].dtype}, expected float32")
        with np.errstate(over="ignore"):
            self.weight_scale = tensors[key].astype(np.float32)
        expected = self.layout.scale_shape(self.stored_shape)
        if self.weight_scale.shape != expected:
            raise ValueError(f"{key} has shape {list(self.weight_scale.shape)}")
        if not (np.isfinite(self.weight_scale).all() and (self.weight_scale > 0).all()):
            raise ValueError(f"{key} holds non-positive or non-finite scales")
        scale = self.input_scale
        if scale is None or not (math.isfinite(scale) and 0 < scale < 3e38):
            raise ValueError(f"layer {self.name!r} has input_scale {scale!r}")
        zero_point = self.input_zero_point
        if zero_point is not None and not -128 <= zero_point <= 255:
            raise ValueError(f"layer {self.name!r} has input_zero_point {zero_point!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"layer {self.name!r} has unknown rounding {self.rounding!r}")
        if self.rounding == "nearest":
            return
        wkey = f"{self.name}/weight_int"
        if wkey not in tensors:
            raise KeyError(f"tensors.npz lacks {wkey!r}")
        if tensors[wkey].dtype != np.int8:
            raise ValueError(f"{wkey} has dtype {tensors[wkey].dtype}, expected int8")
        self.weight_int = tensors[wkey]
        if self.weight_int.shape != self.stored_shape:
            raise ValueError(f"{wkey} has shape {list(self.weight_int.shape)}")
