"""`CalibrationConfig`: every knob of `avatarq.calibration.calibrate`, as plain data."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from avatarq.calibration.layers import PRECISIONS
from avatarq.calibration.quantizers import RANGE_INITS, check_bits
from avatarq.errors import AvatarqError

CONFIG_VERSION = 1
METHODS = ("poca", "max")
SENSITIVITY = ("error", "omega", "none")


@dataclass(frozen=True)
class CalibrationConfig:
    """How a decoder is calibrated.

    Attributes:
        method: "poca" (masked grid search + masked layer-wise reconstruction) or "max"
            (plain max calibration of activations and weights, no masks: standard PTQ).
        tau: shape-wise std-mask threshold in [0, 1): the fraction of output positions with
            the largest across-channel std dropped per layer (0.9 keeps 10%, POCA's shipped
            setting; 0 keeps all). Default 0: measured on the trained synthetic avatar, 0.9
            fits every per-tensor activation range to the 10% flattest positions and clips
            the rest (texture PSNR vs FP32 36 dB instead of 82 dB, tDE 6x higher), so
            masking by camera visibility alone is the default.
        bits: integer bit width of weights and activations (8-bit container; 6 clips it).
        symmetric: symmetric signed activations (TensorRT); False: asymmetric unsigned
            activations for ONNX Runtime targets. Weights are always symmetric per-channel.
        visibility: use camera visibility masks when the samples carry cameras.
        range_init: where the activation grid search starts: "max" (the largest masked
            value over all samples; the first candidate clips nothing) or "mean" (POCA's
            code: the mean of per-sample maxima, so every candidate clips some samples).
        iters: Adam iterations per layer (upper bound; stops early on a plateau).
        lr: Adam learning rate of the log-scales (and 10x for AdaRound's alphas), cosine decay.
        batch: calibration items (samples or crops) per Adam step.
        temporal_weight: weight of the temporal term mean |(e_t - e_{t-1}) * M| on clips.
        adaround: learn the weight rounding (AdaRound) instead of rounding to nearest.
        adaround_lambda: weight of AdaRound's rounding regularizer.
        learn_weight_scale: refine per-channel weight scales with LSQ (nearest rounding).
        crop: output crop side (texels) for layers whose output is larger (memory and time
            bound on fine layers); crops_per_sample: crops cached per sample for such layers.
        patience: stop a layer when the windowed loss improved < 0.1% this many checks in a row.
        seed: seed of every random draw (batches, crops).
        sensitivity: per-layer sensitivity measure: "error" (output noise-to-signal with that
            layer alone quantized), "omega" (Hessian quadratic form dw^T H dw), or "none".
        sensitivity_samples: samples used to measure sensitivity.
        fp16_budget: number of layers, most sensitive first, kept in FP16.
        precision: per-layer overrides {layer name: "int8" | "fp16" | "fp32"}.
    """

    method: str = "poca"
    tau: float = 0.0
    bits: int = 8
    symmetric: bool = True
    visibility: bool = True
    range_init: str = "max"
    iters: int = 100
    lr: float = 5e-3
    batch: int = 16
    temporal_weight: float = 0.0
    adaround: bool = False
    adaround_lambda: float = 0.01
    learn_weight_scale: bool = True
    crop: int = 64
    crops_per_sample: int = 4
    patience: int = 3
    seed: int = 0
    sensitivity: str = "error"
    sensitivity_samples: int = 2
    fp16_budget: int = 0
    precision: dict[str, str] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != CONFIG_VERSION:
            raise AvatarqError(
                f"calibration config version {self.version} is not supported "
                f"(expected {CONFIG_VERSION})"
            )
        if self.method not in METHODS:
            raise AvatarqError(
                f"unknown calibration method {self.method!r}; expected one of {METHODS}"
            )
        if self.sensitivity not in SENSITIVITY:
            raise AvatarqError(
                f"unknown sensitivity measure {self.sensitivity!r}; expected one of {SENSITIVITY}"
            )
        if self.range_init not in RANGE_INITS:
            raise AvatarqError(
                f"unknown range_init {self.range_init!r}; expected one of {RANGE_INITS}"
            )
        for name in ("tau", "lr", "temporal_weight", "adaround_lambda"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise AvatarqError(f"{name} must be a finite number, got {value!r}")
        if not 0.0 <= float(self.tau) < 1.0:
            raise AvatarqError(f"tau must lie in [0, 1), got {self.tau}")
        check_bits(self.bits)
        for name in ("iters", "temporal_weight", "adaround_lambda", "fp16_budget"):
            if getattr(self, name) < 0:
                raise AvatarqError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch", "crops_per_sample", "patience", "sensitivity_samples"):
            if getattr(self, name) < 1:
                raise AvatarqError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise AvatarqError(f"lr must be > 0, got {self.lr}")
        if self.crop < 4 or self.crop % 2:
            raise AvatarqError(f"crop must be an even number >= 4, got {self.crop}")
        for layer, value in self.precision.items():
            if value not in PRECISIONS:
                raise AvatarqError(
                    f"precision of {layer!r} must be one of {', '.join(PRECISIONS)}, got {value!r}"
                )
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "precision", dict(sorted(self.precision.items())))

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> CalibrationConfig:
        if not isinstance(data, dict):
            raise AvatarqError(
                f"a calibration config must be a JSON object, got {type(data).__name__}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AvatarqError(f"unknown calibration config field {unknown[0]!r}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> CalibrationConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AvatarqError(f"calibration config is not valid JSON ({exc.msg})") from None
        return cls.from_dict(data)


def parse_precision(spec: str, layer_names: list[str] | None = None) -> dict[str, str]:
    """Parse ``layer=int8,layer2=fp16`` into {layer: precision}.

    Raises:
        AvatarqError: a malformed item, an unknown precision, or (with ``layer_names``) a
            layer the decoder does not have; the message names it.
    """
    out: dict[str, str] = {}
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        layer, sep, value = item.partition("=")
        layer, value = layer.strip(), value.strip().lower()
        if not sep or not layer or not value:
            raise AvatarqError(f"precision override {item!r} must look like layer=int8")
        if value not in PRECISIONS:
            raise AvatarqError(
                f"precision override {item!r}: {value!r} is not one of {', '.join(PRECISIONS)}"
            )
        if layer_names is not None:
            check_layer_names([layer], layer_names)
        out[layer] = value
    return out


def check_layer_names(names, layer_names: list[str]) -> None:
    """Raise AvatarqError naming the first of ``names`` that is not a quantizable layer."""
    valid = set(layer_names)
    for name in names:
        if name not in valid:
            hint = ", ".join(layer_names[:4]) + (" ..." if len(layer_names) > 4 else "")
            raise AvatarqError(f"unknown layer {name!r} in precision overrides; layers are {hint}")
