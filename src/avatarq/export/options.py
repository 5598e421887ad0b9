"""`ExportOptions`: every knob of `avatarq export`, versioned and validated."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from avatarq.core.documents import DOCUMENT_CONFIG
from avatarq.errors import AvatarqError

EXPORT_OPTIONS_VERSION = 1
MAX_BATCH_LIMIT = 4096


@dataclass(frozen=True)
class ExportOptions:
    """Options of `avatarq export` (recorded in the manifest).

    Attributes:
        fp16: float16 inside, float32 at the graph's inputs and outputs.
        camera: fold this camera's colour correction into the texture (None: none applied).
        max_batch: upper bound of the dynamic batch dimension (1..4096).
        validate: run the graph with ONNX Runtime and compare with PyTorch.
        n_validation: number of (z, view) samples used by the validation (2..4096).
        seed: seed for validation inputs when no capture is given (>= 0).
        int8: write the calibration's precision plan (any format: w8a8, w4a8, fp8, mixed)
            as Q/DQ nodes.
        fp8: the same for an FP8 calibration: ``calib`` must be one (bits fp8); without
            it, calibrate on the fly at fp8.
        calib: a calibration artifact directory (`avatarq calibrate`); None with ``int8``
            calibrates on the fly with POCA defaults on ``calib_data``, the capture, or
            data-free (latents drawn from the prior) when neither is given.
        calib_data: capture root or latents .npz for on-the-fly calibration.
        conv_transpose_axis: weight-scale axis of ConvTranspose Q/DQ (1, 0 or None).
        reference: keep the FP32 graph in the bundle (``reference/model.onnx``) when the
            bundle is not FP32, so bench and compare need nothing else.
        version: schema version.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    fp16: bool = False
    camera: int | None = None
    max_batch: int = 64
    validate: bool = True
    n_validation: int = 8
    seed: int = 0
    int8: bool = False
    fp8: bool = False
    calib: str | None = None
    calib_data: str | None = None
    conv_transpose_axis: int | None = 1
    reference: bool = True
    version: int = EXPORT_OPTIONS_VERSION

    def __post_init__(self) -> None:
        if self.version != EXPORT_OPTIONS_VERSION:
            raise AvatarqError(
                f"export options version {self.version!r} is not supported (expected "
                f"{EXPORT_OPTIONS_VERSION})"
            )
        for name, low, high in (
            ("max_batch", 1, MAX_BATCH_LIMIT),
            ("n_validation", 2, 4096),
            ("seed", 0, 2**32 - 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise AvatarqError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        if self.camera is not None and (
            isinstance(self.camera, bool) or not isinstance(self.camera, int) or self.camera < 0
        ):
            raise AvatarqError(f"camera must be a camera index >= 0, got {self.camera!r}")
        if self.conv_transpose_axis not in (0, 1, None):
            raise AvatarqError(
                f"conv_transpose_axis must be 1, 0 or None, got {self.conv_transpose_axis!r}"
            )
        quantized = "--fp8" if self.fp8 else "--int8"
        if (self.int8 or self.fp8) and self.fp16:
            raise AvatarqError(
                f"{quantized} and --fp16 are exclusive: FP16 layers of a quantized plan come "
                "from the calibration"
            )
        if self.int8 and self.fp8:
            raise AvatarqError("--int8 and --fp8 are exclusive: the calibration's bits decide")
        if self.calib is not None and not (self.int8 or self.fp8):
            raise AvatarqError("a calibration artifact (--calib) needs --int8 or --fp8")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
