"""`CalibrationConfig`: every knob of `avatarq.calibration.calibrate`, as plain data."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields

from avatarq.calibration.biases import check_bias_format
from avatarq.calibration.formats import DEFAULT_BITS, canonical_bits, parse_format
from avatarq.calibration.quantizers import RANGE_INITS
from avatarq.errors import AvatarqError

CONFIG_VERSION = 2
READABLE_CONFIG_VERSIONS = (1, 2)
METHODS = ("poca", "max")
SENSITIVITY = ("error", "omega", "none")
WEIGHT_SEARCH = ("max", "mse")

#: Method defaults per ``bits`` (the `None` fields of `CalibrationConfig`), chosen by the
#: low-bit measurement in docs/benchmarks.md ("Low bit widths"); other formats: all off.
METHOD_DEFAULTS: dict[str, dict[str, object]] = {
    "w8a8": {"gptq": False, "smooth": False, "hadamard": False, "weight_search": "max"},
    "w4a8": {"gptq": True, "smooth": False, "hadamard": False, "weight_search": "max"},
}
_OFF = {"gptq": False, "smooth": False, "hadamard": False, "weight_search": "max"}


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
        bits: the quantized layers' format (`avatarq.calibration.formats`): "w8a8" (default),
            "w6a6", "w4a8", "w4a4", any "wXaY" with X, Y in 2..8, or "fp8"; an int N means
            "wNaN" (what version-1 configs hold).
        symmetric: symmetric signed activations (TensorRT); False: asymmetric unsigned
            activations for ONNX Runtime targets (integer formats only).
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
        gptq: second-order weight rounding (GPTQ) with the mask-weighted Hessian of each
            layer's input (None: the default of ``bits``, `METHOD_DEFAULTS`).
        gptq_damp: GPTQ's dampening, a fraction of the mean Hessian diagonal.
        gptq_act_order: GPTQ quantizes input columns in order of decreasing Hessian diagonal.
        weight_block: input channels per weight scale (0: one scale per output channel); a
            layer whose input channels it does not divide keeps per-channel scales.
        weight_search: initial weight scales: "max" (per-channel amax) or "mse" (the shrink
            of amax with the least rounding error per scale); None: the default of ``bits``.
        learn_weight_scale: refine per-channel weight scales with LSQ (nearest rounding).
        smooth: SmoothQuant-style per-channel scales folded into the previous layer (None:
            the default of ``bits``); smooth_alpha: its migration strength in [0, 1].
        hadamard: rotate each quantized layer's input channels by a normalized Walsh-
            Hadamard matrix (None: the default of ``bits``).
        bias_format: storage of the untied texel biases and the output offset: "fp32",
            "fp16", "int8" or "int4" (`avatarq.calibration.biases`).
        crop: output crop side (texels) for layers whose output is larger (memory and time
            bound on fine layers); crops_per_sample: crops cached per sample for such layers.
        patience: stop a layer when the windowed loss improved < 0.1% this many checks in a row.
        seed: seed of every random draw (batches, crops).
        sensitivity: per-layer sensitivity measure: "error" (output noise-to-signal with that
            layer alone quantized), "omega" (Hessian quadratic form dw^T H dw), or "none".
        sensitivity_samples: samples used to measure sensitivity (and allocation's Omega).
        fp16_budget: number of layers, most sensitive first, kept in FP16.
        size_budget: per-layer bit allocation under a size budget ("3.5MB": megabytes of
            layer weights, scales and texel biases; "4.5bpp": average stored bits per layer
            weight); None: every layer in ``bits``.
        precision: per-layer overrides {layer name: format}; "int8" means ``bits``.
    """

    method: str = "poca"
    tau: float = 0.0
    bits: str = DEFAULT_BITS
    symmetric: bool = True
    visibility: bool = True
    range_init: str = "max"
    iters: int = 100
    lr: float = 5e-3
    batch: int = 16
    temporal_weight: float = 0.0
    adaround: bool = False
    adaround_lambda: float = 0.01
    gptq: bool | None = None
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    weight_block: int = 0
    weight_search: str | None = None
    learn_weight_scale: bool = True
    smooth: bool | None = None
    smooth_alpha: float = 0.5
    hadamard: bool | None = None
    bias_format: str = "fp32"
    crop: int = 64
    crops_per_sample: int = 4
    patience: int = 3
    seed: int = 0
    sensitivity: str = "error"
    sensitivity_samples: int = 2
    fp16_budget: int = 0
    size_budget: str | None = None
    precision: dict[str, str] = field(default_factory=dict)
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version not in READABLE_CONFIG_VERSIONS:
            raise AvatarqError(
                f"calibration config version {self.version} is not supported "
                f"(expected {CONFIG_VERSION})"
            )
        object.__setattr__(self, "version", CONFIG_VERSION)
        object.__setattr__(self, "bits", canonical_bits(self.bits))
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
        for name in ("iters", "temporal_weight", "adaround_lambda", "fp16_budget", "gptq_damp"):
            if getattr(self, name) < 0:
                raise AvatarqError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("batch", "crops_per_sample", "patience", "sensitivity_samples"):
            if getattr(self, name) < 1:
                raise AvatarqError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise AvatarqError(f"lr must be > 0, got {self.lr}")
        if self.crop < 4 or self.crop % 2:
            raise AvatarqError(f"crop must be an even number >= 4, got {self.crop}")
        if self.weight_block < 0 or self.weight_block == 1:
            raise AvatarqError(
                f"weight_block must be 0 (per channel) or a block size >= 2, got {self.weight_block}"
            )
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise AvatarqError(f"smooth_alpha must lie in [0, 1], got {self.smooth_alpha}")
        check_bias_format(self.bias_format)
        defaults = METHOD_DEFAULTS.get(self.bits, _OFF)
        for name, value in defaults.items():
            if getattr(self, name) is None:
                # a learned rounding the user asked for replaces the default GPTQ rounding
                if name == "gptq" and self.adaround:
                    value = False
                object.__setattr__(self, name, value)
        if self.weight_search not in WEIGHT_SEARCH:
            raise AvatarqError(
                f"weight_search must be one of {', '.join(WEIGHT_SEARCH)}, got {self.weight_search!r}"
            )
        self._check_combinations()
        if self.size_budget is not None:
            from avatarq.calibration.allocate import parse_size_budget

            parse_size_budget(self.size_budget)
        precision = {}
        for layer, value in self.precision.items():
            precision[layer] = parse_format(value, f"precision of {layer!r}", legacy=self.bits).name
        object.__setattr__(self, "tau", float(self.tau))
        object.__setattr__(self, "precision", dict(sorted(precision.items())))

    def _check_combinations(self) -> None:
        fmt = parse_format(self.bits)
        if self.adaround and self.gptq:
            raise AvatarqError("adaround and gptq both choose the weight rounding; pick one")
        if fmt.kind == "fp8":
            if not self.symmetric:
                raise AvatarqError("fp8 activations are symmetric only; drop --asymmetric")
            for name in ("adaround", "gptq"):
                if getattr(self, name):
                    raise AvatarqError(f"{name} rounds to an integer grid; fp8 rounds to nearest")
            if self.weight_block:
                raise AvatarqError("fp8 weights use per-channel scales; weight_block must be 0")

    @property
    def format(self):  # -> LayerFormat
        return parse_format(self.bits)

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


def parse_precision(
    spec: str, layer_names: list[str] | None = None, bits: str = DEFAULT_BITS
) -> dict[str, str]:
    """Parse ``layer=w4a8,layer2=fp16`` into {layer: format name}; "int8" means ``bits``.

    Raises:
        AvatarqError: a malformed item, an unknown format, or (with ``layer_names``) a
            layer the decoder does not have; the message names it.
    """
    out: dict[str, str] = {}
    for item in (p.strip() for p in spec.split(",")):
        if not item:
            continue
        layer, sep, value = item.partition("=")
        layer, value = layer.strip(), value.strip().lower()
        if not sep or not layer or not value:
            raise AvatarqError(f"precision override {item!r} must look like layer=w8a8")
        fmt = parse_format(value, f"precision override {item!r}", legacy=bits)
        if layer_names is not None:
            check_layer_names([layer], layer_names)
        out[layer] = fmt.name
    return out


def check_layer_names(names, layer_names: list[str]) -> None:
    """Raise AvatarqError naming the first of ``names`` that is not a quantizable layer."""
    valid = set(layer_names)
    for name in names:
        if name not in valid:
            hint = ", ".join(layer_names[:4]) + (" ..." if len(layer_names) > 4 else "")
            raise AvatarqError(f"unknown layer {name!r} in precision overrides; layers are {hint}")
