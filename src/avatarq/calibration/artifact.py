"""The calibration artifact: a versioned, self-describing directory that export reads.

Layout of ``calib/``::

    calib.json     format, version, model hash, samples (ids, clips, hash), config, and per
                   layer (execution order): format (precision, weight / activation bits),
                   activation scale and zero point, weight axis and block size, rounding
                   mode, rotation, loss curve, sensitivity; the smoothing pairs and the
                   storage formats of the texel biases and the output offset
    tensors.npz    "<layer>/weight_scale" float32 ([C_out] or blocked) per quantized layer,
                   "<layer>/weight_int" int8 (stored weight shape) when the rounding was
                   learned, "<layer>/smoothing" float32 [C_in] per smoothed layer,
                   "<bias>/bias_scale" float32 [C] per int8 or int4 texel bias

Version 2 (formats, blocks, rotations, smoothing, bias formats). Version 1 files load too:
their "int8" layers with ``bits`` N are the format wNaN.

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

from avatarq.calibration.biases import (
    BIAS_QMAX,
    OFFSET_NAMES,
    check_stored_format,
    quantize_bias,
    quantize_offset,
)
from avatarq.calibration.document import FORMAT, CalibrationDocument
from avatarq.calibration.entry import GraphWeight, LayerCalibration, per_channel_amax_np
from avatarq.calibration.layers import discover_layers, get_layer
from avatarq.calibration.smoothing import SmoothingPair, smooth_decoder
from avatarq.core.documents import document_dict, parse_document
from avatarq.core.files import StagedDirectory, inside
from avatarq.core.npz import load_npz
from avatarq.errors import AvatarqError

__all__ = [
    "ARTIFACT_VERSION",
    "CalibrationArtifact",
    "GraphWeight",
    "LayerCalibration",
    "decoder_hash",
    "per_channel_amax_np",
]

ARTIFACT_VERSION = 2
READABLE_VERSIONS = (1, 2)
JSON_NAME = "calib.json"
TENSORS_NAME = "tensors.npz"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


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
class CalibrationArtifact:
    """What a calibration produced (see the module docstring for the files).

    Attributes:
        model_hash: `decoder_hash` of the decoder it was made from.
        model_config: the decoder's DAM config as a dict.
        samples: the samples record (count, hash, ids, clips, ...).
        config: the `CalibrationConfig` as a dict.
        layers: per-layer calibrations, execution order (coarse to fine).
        smoothing: the smoothing pairs applied (empty: none).
        smoothing_scales: {consumer layer: float32 [C_in] scales folded in}.
        texel_biases: {texel bias parameter or output offset buffer: storage format}
            (`avatarq.calibration.biases`; absent: fp32).
        bias_scales: {texel bias parameter: float32 [C]} of the int8 and int4 ones.
        allocation: the size-budget allocation (`Allocation.to_json`), empty without one.
    """

    model_hash: str
    model_config: dict
    samples: dict
    config: dict
    layers: list[LayerCalibration]
    version: int = ARTIFACT_VERSION
    smoothing: list[SmoothingPair] = field(default_factory=list)
    smoothing_scales: dict[str, np.ndarray] = field(default_factory=dict)
    texel_biases: dict[str, str] = field(default_factory=dict)
    bias_scales: dict[str, np.ndarray] = field(default_factory=dict)
    allocation: dict = field(default_factory=dict)

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
        """The precision plan: {layer: format name ("w8a8", "w4a8", "fp8", "fp16", ...)}."""
        return {layer.name: layer.precision for layer in self.layers}

    # --------------------------------------------------------------------- float changes
    def smoothed_arrays(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The float parameters the smoothing changes, from their FP32 values ``arrays``
        (name -> float32), pair by pair; returns only the changed names."""
        from avatarq.calibration.smoothing import apply_smoothing

        current = dict(arrays)
        changed: dict[str, np.ndarray] = {}
        for pair in self.smoothing:
            out = apply_smoothing(current, pair, self.smoothing_scales[pair.consumer])
            current.update(out)
            changed.update(out)
        return changed

    @torch.no_grad()
    def apply_float_changes(self, decoder: nn.Module) -> None:
        """Fold the smoothing into ``decoder`` and round its texel biases, in place."""
        if self.smoothing:
            smooth_decoder(decoder, self.smoothing, self.smoothing_scales)
        tensors = dict(decoder.named_parameters()) | dict(decoder.named_buffers())
        for name, fmt in self.texel_biases.items():
            if fmt != "fp32":
                values = tensors[name].detach().cpu().numpy()
                if name in OFFSET_NAMES:
                    _, rounded = quantize_offset(values, fmt)
                else:
                    _, _, rounded = quantize_bias(values, fmt, self.bias_scales.get(name))
                tensors[name].copy_(torch.from_numpy(rounded))

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
        tensors = dict(decoder.named_parameters()) | dict(decoder.named_buffers())
        for name in self.texel_biases:
            if name not in tensors:
                raise AvatarqError(f"the calibration names texel bias {name!r}, not in this model")

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
            "smoothing": [pair.to_json() for pair in self.smoothing],
            "texel_biases": dict(sorted(self.texel_biases.items())),
            "allocation": self.allocation,
            "tensors": TENSORS_NAME,
        }
        return json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n"

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for layer in self.layers:
            out.update(layer.tensors())
        for consumer, scale in self.smoothing_scales.items():
            out[f"{consumer}/smoothing"] = np.asarray(scale, np.float32)
        for name, scale in self.bias_scales.items():
            out[f"{name}/bias_scale"] = np.asarray(scale, np.float32)
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
        parse_document(text, CalibrationDocument, f"calibration for {path}")
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
            text = doc_path.read_bytes()
            doc = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            reason = getattr(exc, "msg", type(exc).__name__)
            raise AvatarqError(f"{doc_path} is not valid JSON ({reason}); recalibrate") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise AvatarqError(f"{doc_path} is not an avatarq calibration (format {FORMAT!r})")
        version = doc.get("version")
        if version not in READABLE_VERSIONS:
            raise AvatarqError(
                f"{doc_path} has calibration version {version!r}; this avatarq "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}; recalibrate"
            )
        try:
            doc = document_dict(parse_document(text, CalibrationDocument, str(doc_path)))
        except AvatarqError as exc:
            raise AvatarqError(f"{exc}; recalibrate") from None
        tensors = _read_npz(inside(doc_path.parent, doc.get("tensors", TENSORS_NAME), "tensors"))
        try:
            layers = [LayerCalibration.from_json(e, tensors, version) for e in doc["layers"]]
            smoothing = [SmoothingPair.from_json(p) for p in doc.get("smoothing", [])]
            biases = {
                str(k): check_stored_format(str(k), v)
                for k, v in doc.get("texel_biases", {}).items()
            }
            config = dict(doc["config"])
            if version == 1 and isinstance(config.get("bits"), int):
                config["bits"] = f"w{config['bits']}a{config['bits']}"
            artifact = cls(
                doc["model"]["hash"],
                doc["model"]["config"],
                doc["samples"],
                config,
                layers,
                ARTIFACT_VERSION,
                smoothing,
                {p.consumer: _tensor(tensors, f"{p.consumer}/smoothing") for p in smoothing},
                biases,
                {
                    k: _tensor(tensors, f"{k}/bias_scale")
                    for k, fmt in biases.items()
                    if fmt in BIAS_QMAX
                },
                dict(doc.get("allocation", {})),
            )
        except AvatarqError as exc:
            raise AvatarqError(f"{doc_path} is malformed: {exc}; recalibrate") from None
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise AvatarqError(
                f"{doc_path} is malformed ({type(exc).__name__}: {str(exc)[:100]}); recalibrate"
            ) from None
        if decoder is not None:
            artifact.validate(decoder)
        return artifact


def _tensor(tensors: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in tensors:
        raise KeyError(f"tensors.npz lacks {key!r}")
    value = tensors[key].astype(np.float32)
    if not (np.isfinite(value).all() and (value > 0).all()):
        raise ValueError(f"{key} holds non-positive or non-finite values")
    return value


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
    return load_npz(path, "calibration tensors")
