"""The calibration artifact: a versioned, self-describing directory that export reads.

Layout of ``calib/``::

    calib.json     format, version, model hash, samples (ids, clips, hash), config, and per
                   layer (execution order): precision, bits, activation scale and zero point,
                   weight axis, rounding mode, loss curve, sensitivity
    tensors.npz    "<layer>/weight_scale" float32 [C_out] per quantized layer, and
                   "<layer>/weight_int" int8 (weight shape) when the rounding was learned

Writing is deterministic: sorted JSON keys and a zip with fixed timestamps, so the same
calibration writes the same bytes. Loading validates the format and version, and
`CalibrationArtifact.validate(decoder)` checks the model hash and that every quantizable
layer is described; failures raise `AvatarqError` with one line.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatarq.calibration.layers import PRECISIONS, QuantizedLayer, discover_layers, get_layer
from avatarq.calibration.quantizers import (
    MIN_SCALE,
    activation_range,
    quantize_weight,
    weight_range,
)
from avatarq.core.files import StagedDirectory
from avatarq.errors import AvatarqError

FORMAT = "avatarq-calibration"
ARTIFACT_VERSION = 1
JSON_NAME = "calib.json"
TENSORS_NAME = "tensors.npz"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def per_channel_amax_np(w: np.ndarray, axis: int) -> np.ndarray:
    """max |w| over every axis but ``axis`` (at least MIN_SCALE): float32 [w.shape[axis]]."""
    dims = tuple(d for d in range(w.ndim) if d != axis)
    return np.maximum(np.abs(w).max(axis=dims), MIN_SCALE).astype(np.float32)


def decoder_hash(decoder: nn.Module) -> str:
    """sha256 (hex) of the decoder's configuration and every tensor of its state_dict.

    Layers wrapped by a calibration (`QuantizedLayer`) hash as the plain layer they wrap.
    """
    h = hashlib.sha256()
    config = getattr(decoder, "config", None)
    if config is not None and hasattr(config, "to_json"):
        h.update(config.to_json().encode())
    state = {}
    for key, value in decoder.state_dict().items():
        parts = key.split(".")
        if "inner" in parts:
            key = ".".join(p for p in parts if p != "inner")
        elif parts[-1] in ("input_scale", "input_zero_point", "weight_dq"):
            continue
        state[key] = value
    for key in sorted(state):
        a = np.ascontiguousarray(state[key].detach().cpu().numpy())
        h.update(f"{key}:{a.dtype.str}:{list(a.shape)}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class LayerCalibration:
    """The calibration of one layer.

    Attributes:
        name, kind, weight_shape, weight_axis: as `LayerInfo`.
        precision: "int8" (quantized at ``bits`` in the 8-bit container), "fp16" or "fp32".
        bits: integer bit width (int8 layers).
        symmetric: symmetric signed activation grid (else asymmetric unsigned).
        input_scale, input_zero_point: per-tensor activation quantizer (int8 layers).
        weight_scale: float32 [C_out] per-output-channel weight scales (int8 layers).
        rounding: "nearest" (integers = clamp(rint(w / s))) or "adaround" (learned).
        weight_int: int8 weight integers when the rounding was learned, else None.
        loss: {"initial", "final", "curve", "iters"} of the masked reconstruction loss.
        sensitivity: output noise-to-signal ratio (or Omega) with this layer alone quantized.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_axis: int
    precision: str
    bits: int = 8
    symmetric: bool = True
    input_scale: float | None = None
    input_zero_point: int | None = None
    weight_scale: np.ndarray | None = None
    rounding: str | None = None
    weight_int: np.ndarray | None = None
    loss: dict = field(default_factory=dict)
    sensitivity: float | None = None

    @classmethod
    def for_layer(
        cls, info, precision: str, bits: int, symmetric: bool, **fields
    ) -> LayerCalibration:
        """An entry for the layer ``info`` (a `LayerInfo`) with the given plan and results."""
        return cls(
            name=info.name,
            kind=info.kind,
            weight_shape=info.weight_shape,
            weight_axis=info.weight_axis,
            precision=precision,
            bits=bits,
            symmetric=symmetric,
            **fields,
        )

    @property
    def quantized(self) -> bool:
        return self.precision == "int8"

    def integer_weight(self, weight: torch.Tensor) -> np.ndarray:
        """int8 integers of this layer's weight (the learned ones, or nearest rounding)."""
        if not self.quantized:
            raise AvatarqError(
                f"layer {self.name!r} is {self.precision}, it has no integer weights"
            )
        if self.weight_int is not None:
            return self.weight_int
        return quantize_weight(
            weight, torch.from_numpy(self.weight_scale), self.weight_axis, self.bits
        )

    def graph_weight(
        self, weight: torch.Tensor | np.ndarray, conv_transpose_axis: int | None = 1
    ) -> tuple[np.ndarray, np.ndarray, int | None]:
        """The int8 weight as a Q/DQ graph stores it: (q int8 [weight shape], scale float32
        [C] or [] for per tensor, axis or None).

        ConvTranspose layers may use another scale axis than the calibrated output axis 1:
        0 (per input channel) or None (per tensor); their integers are then re-derived from
        the float weight by max calibration along that axis (a fallback for TensorRT
        versions that reject axis 1).
        """
        w = weight.detach().float().cpu().numpy() if torch.is_tensor(weight) else weight
        w = np.array(w, np.float32, copy=True)
        if self.kind != "conv_transpose" or conv_transpose_axis == self.weight_axis:
            scale = np.asarray(self.weight_scale, np.float32)
            return self.integer_weight(torch.from_numpy(w)), scale, self.weight_axis
        qmax = weight_range(self.bits).qmax
        if conv_transpose_axis is None:
            scale = np.asarray(max(float(np.abs(w).max()), 1e-12) / qmax, np.float32)
            return np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8), scale, None
        scale = torch.from_numpy(per_channel_amax_np(w, conv_transpose_axis) / np.float32(qmax))
        q = quantize_weight(torch.from_numpy(w), scale, conv_transpose_axis, self.bits)
        return q, scale.numpy(), conv_transpose_axis

    def module(self, inner: nn.Module, conv_transpose_axis: int | None = 1) -> QuantizedLayer:
        """``inner`` wrapped with this calibration's numerics (see `graph_weight`)."""
        if not self.quantized:
            return QuantizedLayer(inner, self.precision, weight_axis=self.weight_axis)
        q, scale, axis = self.graph_weight(inner.weight, conv_transpose_axis)
        return QuantizedLayer(
            inner,
            "int8",
            self.input_scale,
            self.input_zero_point,
            activation_range(self.bits, self.symmetric),
            torch.from_numpy(q),
            torch.from_numpy(scale),
            axis,
        )

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "weight_axis": self.weight_axis,
            "precision": self.precision,
            "bits": self.bits,
            "symmetric": self.symmetric,
            "input_scale": self.input_scale,
            "input_zero_point": self.input_zero_point,
            "rounding": self.rounding,
            "loss": self.loss,
            "sensitivity": self.sensitivity,
        }


@dataclass
class CalibrationArtifact:
    """What a calibration produced (see the module docstring for the files).

    Attributes:
        model_hash: `decoder_hash` of the decoder it was made from.
        model_config: the decoder's DAM config as a dict.
        samples: the samples record (count, hash, ids, clips, ...).
        config: the `CalibrationConfig` as a dict.
        layers: per-layer calibrations, execution order (coarse to fine).
    """

    model_hash: str
    model_config: dict
    samples: dict
    config: dict
    layers: list[LayerCalibration]
    version: int = ARTIFACT_VERSION

    def __getitem__(self, name: str) -> LayerCalibration:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise AvatarqError(f"the calibration has no layer {name!r}")

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def precision(self) -> dict[str, str]:
        """The precision plan: {layer: "int8" | "fp16" | "fp32"}."""
        return {layer.name: layer.precision for layer in self.layers}

    # --------------------------------------------------------------------- validation
    def validate(self, decoder: nn.Module) -> None:
        """Check that this artifact was made for ``decoder``.

        Raises:
            AvatarqError: wrong model hash, a quantizable layer the artifact does not
                describe (or one it describes that the decoder lacks), a weight-shape mismatch.
        """
        actual = decoder_hash(decoder)
        if actual != self.model_hash:
            raise AvatarqError(
                f"the calibration was made for model {self.model_hash[:12]}, this model is "
                f"{actual[:12]}; recalibrate with this checkpoint (and the same normalization)"
            )
        infos = {info.name: info for info in discover_layers(decoder)}
        for name in infos:
            if name not in self.layer_names:
                raise AvatarqError(f"the calibration is missing layer {name!r}; recalibrate")
        for layer in self.layers:
            if layer.name not in infos:
                raise AvatarqError(f"the calibration names layer {layer.name!r}, not in this model")
            shape = tuple(get_layer(decoder, layer.name).weight.shape)
            if shape != tuple(layer.weight_shape):
                raise AvatarqError(
                    f"layer {layer.name!r} has weight shape {list(shape)}, the calibration "
                    f"{list(layer.weight_shape)}"
                )

    # --------------------------------------------------------------------- files
    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": self.version,
            "model": {"hash": self.model_hash, "config": self.model_config},
            "samples": self.samples,
            "config": self.config,
            "method": self.config.get("method"),
            "tau": self.config.get("tau"),
            "bits": self.config.get("bits"),
            "layers": [layer.to_json() for layer in self.layers],
            "tensors": TENSORS_NAME,
        }
        return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for layer in self.layers:
            if layer.weight_scale is not None:
                out[f"{layer.name}/weight_scale"] = np.asarray(layer.weight_scale, np.float32)
            if layer.weight_int is not None:
                out[f"{layer.name}/weight_int"] = np.asarray(layer.weight_int, np.int8)
        return out

    def save(self, path: str | Path) -> Path:
        """Write ``path/calib.json`` and ``path/tensors.npz`` (same inputs, same bytes),
        atomically: the folder appears whole or not at all. An existing folder is replaced
        only when it holds a calibration."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise AvatarqError(f"calibration output {path} exists and is not a directory")
        if path.is_dir() and any(path.iterdir()) and not (path / JSON_NAME).is_file():
            raise AvatarqError(
                f"calibration output {path} is a folder that holds no calibration; refusing to "
                "replace it (choose another output)"
            )
        text = self.to_json()  # fails before anything is written
        with StagedDirectory(path, replace=True) as stage:
            (stage.path / TENSORS_NAME).write_bytes(_npz_bytes(self.tensors()))
            (stage.path / JSON_NAME).write_text(text)
            stage.commit()
        return path

    @classmethod
    def load(cls, path: str | Path, decoder: nn.Module | None = None) -> CalibrationArtifact:
        """Read an artifact directory (and validate it against ``decoder`` when given)."""
        path = Path(path)
        doc_path = path / JSON_NAME if path.is_dir() else path
        if not doc_path.is_file():
            raise AvatarqError(
                f"calibration not found: {doc_path} (expected a directory with {JSON_NAME})"
            )
        try:
            doc = json.loads(doc_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "msg", type(exc).__name__)
            raise AvatarqError(f"{doc_path} is not valid JSON ({reason}); recalibrate") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise AvatarqError(f"{doc_path} is not an avatarq calibration (format {FORMAT!r})")
        if doc.get("version") != ARTIFACT_VERSION:
            raise AvatarqError(
                f"{doc_path} has calibration version {doc.get('version')!r}; this avatarq "
                f"reads version {ARTIFACT_VERSION}; recalibrate"
            )
        tensors = _read_npz(doc_path.parent / doc.get("tensors", TENSORS_NAME))
        try:
            layers = [_layer_from_json(entry, tensors) for entry in doc["layers"]]
            artifact = cls(
                doc["model"]["hash"],
                doc["model"]["config"],
                doc["samples"],
                doc["config"],
                layers,
                doc["version"],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise AvatarqError(
                f"{doc_path} is malformed ({type(exc).__name__}: {exc}); recalibrate"
            ) from None
        if decoder is not None:
            artifact.validate(decoder)
        return artifact


def _layer_from_json(entry: dict, tensors: dict[str, np.ndarray]) -> LayerCalibration:
    name = entry["name"]
    if entry["precision"] not in PRECISIONS:
        raise ValueError(f"layer {name!r} has unknown precision {entry['precision']!r}")
    layer = LayerCalibration(
        name=name,
        kind=entry["kind"],
        weight_shape=tuple(int(s) for s in entry["weight_shape"]),
        weight_axis=int(entry["weight_axis"]),
        precision=entry["precision"],
        bits=int(entry["bits"]),
        symmetric=bool(entry["symmetric"]),
        input_scale=entry["input_scale"],
        input_zero_point=entry["input_zero_point"],
        rounding=entry["rounding"],
        loss=entry.get("loss", {}),
        sensitivity=entry.get("sensitivity"),
    )
    if layer.quantized:
        key = f"{name}/weight_scale"
        if key not in tensors:
            raise KeyError(f"tensors.npz lacks {key!r}")
        layer.weight_scale = tensors[key].astype(np.float32)
        if layer.weight_scale.shape != (layer.weight_shape[layer.weight_axis],):
            raise ValueError(f"{key} has shape {list(layer.weight_scale.shape)}")
        if not (np.isfinite(layer.weight_scale).all() and (layer.weight_scale > 0).all()):
            raise ValueError(f"{key} holds non-positive or non-finite scales")
        if not (layer.input_scale and layer.input_scale > 0):
            raise ValueError(f"layer {name!r} has input_scale {layer.input_scale!r}")
        if layer.rounding == "adaround":
            wkey = f"{name}/weight_int"
            if wkey not in tensors:
                raise KeyError(f"tensors.npz lacks {wkey!r}")
            layer.weight_int = tensors[wkey].astype(np.int8)
            if layer.weight_int.shape != layer.weight_shape:
                raise ValueError(f"{wkey} has shape {list(layer.weight_int.shape)}")
        elif layer.rounding != "nearest":
            raise ValueError(f"layer {name!r} has unknown rounding {layer.rounding!r}")
    return layer


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (readable by np.load) with fixed timestamps and sorted members."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise AvatarqError(f"calibration tensors not found: {path}; recalibrate")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise AvatarqError(
            f"{path} is not a readable .npz ({type(exc).__name__}); recalibrate"
        ) from None
