"""calib.json as a typed document: the schema `CalibrationArtifact` reads and writes.

The JSON types of every field are checked here (pydantic, strict, no unknown keys; the
JSON Schema is published as docs/schemas/calibration.schema.json); what the numbers must
satisfy against each other and against tensors.npz (shapes, finite positive scales, known
formats) is checked by `LayerCalibration.from_json` and the artifact's loader.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from avatarq.core.documents import DOCUMENT_CONFIG

FORMAT = "avatarq-calibration"


@dataclass
class ModelRecord:
    """The decoder a calibration belongs to: its `decoder_hash` and its config as a dict."""

    __pydantic_config__ = DOCUMENT_CONFIG

    hash: str
    config: dict[str, Any]


@dataclass
class LayerRecord:
    """One layer of calib.json (see `LayerCalibration` for the meaning of each field).

    Version 1 files name the format "int8" with one ``bits`` N for weights and
    activations; version 2 files name it ("w8a8", "w4a8", "fp8", ...) and state
    ``weight_bits`` / ``act_bits``.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    name: str
    kind: str
    weight_shape: list[int]
    weight_axis: int
    precision: str
    symmetric: bool
    input_scale: float | None
    input_zero_point: int | None
    rounding: str | None
    loss: dict[str, Any] = Field(default_factory=dict)
    sensitivity: float | None = None
    weight_bits: int | None = None
    act_bits: int | None = None
    weight_block: int = 0
    rotation: int = 0
    bits: int | None = None


@dataclass
class SmoothingRecord:
    """One smoothing pair (`SmoothingPair`): producer's output channels scaled down by the
    consumer's input scales (tensors.npz "<consumer>/smoothing")."""

    __pydantic_config__ = DOCUMENT_CONFIG

    producer: str
    producer_axis: int
    consumer: str
    consumer_axis: int
    biases: list[str]
    group: int


@dataclass
class CalibrationDocument:
    """calib.json. ``method``, ``tau`` and ``bits`` repeat ``config``'s for readers."""

    __pydantic_config__ = DOCUMENT_CONFIG

    format: Literal["avatarq-calibration"]
    version: int
    model: ModelRecord
    samples: dict[str, Any]
    config: dict[str, Any]
    layers: list[LayerRecord]
    tensors: str = "tensors.npz"
    method: str | None = None
    tau: float | None = None
    bits: str | int | None = None
    smoothing: list[SmoothingRecord] = Field(default_factory=list)
    texel_biases: dict[str, str] = Field(default_factory=dict)
    allocation: dict[str, Any] = Field(default_factory=dict)
