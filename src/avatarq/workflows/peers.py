"""Calibration methods side by side on one decoder, one calibration set and one ordered clip.

Each method turns the decoder's float32 ONNX graph into an INT8 Q/DQ graph; ONNX Runtime (CPU)
then decodes the same ordered clip with every graph, and the textures are compared with the
FP32 graph's (metrics.md: PSNR, tDE, jitter ratio J, flicker excess FE), over every texel
and over the texels the clip's camera sees. Methods:

- avatarq's own: "max" (standard PTQ: per-tensor max of every activation, no masks) and POCA
  at any tau, with or without the temporal term (`CalibrationConfig`);
- ONNX Runtime's ``quantize_static`` (QDQ format, per-channel weights) with MinMax, Entropy or
  Percentile calibration, on the same calibration latents.

`compare_calibrations` runs them; `PeerStudy.markdown` is the table docs/benchmarks.md shows.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.calibration.config import CalibrationConfig
from avatarq.core.documents import attributes
from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError

ORT_METHODS = ("MinMax", "Entropy", "Percentile")
#: The layer ops avatarq quantizes; ONNX Runtime's default set also quantizes Add, Mul,
#: LeakyRelu, Reshape, Transpose, ... (its QDQ registry).
LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
TEXTURE_PEAK = 255.0


@dataclass(frozen=True)
class PeerMethod:
    """One way to calibrate and quantize the decoder.

    Attributes:
        name: the row label.
        calibration: avatarq's settings (None: an ONNX Runtime method).
        ort_method: ONNX Runtime calibration method, one of `ORT_METHODS`.
        ort_symmetric: symmetric activations (ORT's ``ActivationSymmetric``; TensorRT's form).
        ort_layer_ops_only: quantize only `LAYER_OPS` inputs (avatarq's placement) instead of
            ORT's default op set.
        data_free: calibrate avatarq's way on samples drawn from the latent prior
            (`avatarq.calibration.samples.samples_from_prior`: no capture, no visibility)
            instead of the capture's samples.
    """

    name: str
    calibration: CalibrationConfig | None = None
    ort_method: str = "MinMax"
    ort_symmetric: bool = False
    ort_layer_ops_only: bool = False
    data_free: bool = False

    def __post_init__(self) -> None:
        if self.calibration is None and self.ort_method not in ORT_METHODS:
            raise AvatarqError(
                f"unknown ONNX Runtime calibration method {self.ort_method!r}; "
                f"expected one of {', '.join(ORT_METHODS)}"
            )

    @property
    def tool(self) -> str:
        return "avatarq" if self.calibration is not None else "onnxruntime"

    def settings(self) -> dict[str, Any]:
        if self.calibration is not None:
            return {**self.calibration.to_dict(), "data_free": self.data_free}
        return {
            "method": self.ort_method,
            "quant_format": "QDQ",
            "per_channel": True,
            "activation_type": "QInt8",
            "weight_type": "QInt8",
            "activation_symmetric": self.ort_symmetric,
            "op_types": list(LAYER_OPS) if self.ort_layer_ops_only else "default",
        }


def default_methods(
    taus: Sequence[float] = (0.9, 0.5, 0.2, 0.0),
    temporal_weights: Sequence[float] = (0.5, 2.0),
    iters: int = 100,
) -> list[PeerMethod]:
    """The comparison docs/benchmarks.md shows: ORT quantize_static (MinMax, Entropy, and
    MinMax restricted to avatarq's layers with symmetric activations), avatarq max, POCA at
    each of ``taus`` and POCA tau 0 with each temporal weight."""
    methods = [
        PeerMethod("ORT quantize_static MinMax", ort_method="MinMax"),
        PeerMethod("ORT quantize_static Entropy", ort_method="Entropy"),
        PeerMethod(
            "ORT quantize_static MinMax, symmetric, layer inputs only",
            ort_method="MinMax",
            ort_symmetric=True,
            ort_layer_ops_only=True,
        ),
        PeerMethod("avatarq max (standard PTQ, no masks)", CalibrationConfig(method="max")),
    ]
    for tau in taus:
        methods.append(
            PeerMethod(f"avatarq POCA tau {tau:g}", CalibrationConfig(tau=tau, iters=iters))
        )
    for weight in temporal_weights:
        methods.append(
            PeerMethod(
                f"avatarq POCA tau 0 + temporal term {weight:g}",
                CalibrationConfig(tau=0.0, iters=iters, temporal_weight=weight),
            )
        )
    return methods


TEMPORAL_METRICS = ("tde", "jitter_ratio", "flicker_excess")
"""The temporal metrics of a `SequenceComparison` a `PeerRow` holds, everywhere and seen."""


@dataclass
class PeerRow:
    """One method's result. PSNR in dB; tDE and FE in [0, 1] texture units; seconds wall.
    ``*_visible``: the same metric over the texels the clip's camera sees in each frame."""

    name: str
    tool: str
    settings: dict[str, Any]
    psnr: float
    psnr_min: float
    psnr_visible: float
    tde: float
    tde_visible: float
    jitter_ratio: float
    jitter_ratio_visible: float
    flicker_excess: float
    flicker_excess_visible: float
    calibration_seconds: float
    quantize_nodes: int


@dataclass
class StudyRecord:
    """Rows of a study plus what they were measured on (model, samples, clip, machine),
    as JSON: {"setup": {...}, "rows": [{...}, ...]}."""

    rows: list[Any]
    setup: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {"setup": self.setup, "rows": [asdict(r) for r in self.rows]}, indent=1, default=str
        )


@dataclass
class PeerStudy(StudyRecord):
    """Every `PeerRow` plus what they were measured on."""

    rows: list[PeerRow]

    def markdown(self) -> str:
        """The comparison table (one row per method) in GitHub markdown."""
        header = (
            "| method | PSNR all (min) | PSNR seen | tDE all | tDE seen | J all | J seen "
            "| FE seen | calibration | Q nodes |"
        )
        lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(
                f"| {r.name} | {_db(r.psnr)} ({_db(r.psnr_min)}) | {_db(r.psnr_visible)} "
                f"| {_sci(r.tde)} | {_sci(r.tde_visible)} | {r.jitter_ratio:.3f} "
                f"| {r.jitter_ratio_visible:.3f} | {_sci(r.flicker_excess_visible)} "
                f"| {r.calibration_seconds:.0f} s | {r.quantize_nodes} |"
            )
        return "\n".join(lines)


def model_record(decoder: Any) -> dict[str, Any]:
    """The decoder a study ran on, for its setup record: arch, z_dim, tex_size, n_vertices."""
    return attributes(decoder.config, ("arch", "z_dim", "tex_size", "n_vertices"))


def replace_marked_block(text: str, key: str, block: str) -> str:
    """``text`` with the lines between ``<!-- calibration-peers:KEY:begin -->`` and its end
    marker replaced by ``block`` (the marked block is appended when ``text`` has none)."""
    begin, end = f"<!-- calibration-peers:{key}:begin -->", f"<!-- calibration-peers:{key}:end -->"
    new = f"{begin}\n{block.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: new, text)
    return text.rstrip("\n") + "\n\n" + new + "\n"


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.1f} dB"


def _sci(x: float) -> str:
    return f"{x:.2e}"


class _DataReader:
    """ONNX Runtime CalibrationDataReader over calibration latents, one sample per feed, with
    the ``len`` / ``set_range`` ORT's strided calibration (CalibStridedMinMax) uses."""

    def __init__(self, z: np.ndarray, view: np.ndarray) -> None:
        self._z, self._view = z, view
        self.set_range(0, z.shape[0])

    def __len__(self) -> int:
        return int(self._z.shape[0])

    def set_range(self, start_index: int, end_index: int) -> None:
        self._next, self._end = start_index, min(end_index, len(self))

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= self._end:
            return None
        i = self._next
        self._next += 1
        return {"z": self._z[i : i + 1], "view": self._view[i : i + 1]}


def _stride(n: int, most: int = 8) -> int:
    """The largest divisor of n that is <= most (ORT needs the stride to divide n)."""
    return max(d for d in range(1, most + 1) if n % d == 0)


@dataclass
class StudySubject:
    """What a study measures: the checkpoint's model, its capture, the de-normalized
    deployable decoder and that decoder's FP32 graph (saved as ``workdir/fp32.onnx``)."""

    model: Any
    capture: Any
    decoder: Any
    fp32_model: Any
    fp32_path: Path
    workdir: Path

    @classmethod
    def load(
        cls, checkpoint: str | Path, capture_root: str | Path, workdir: str | Path, names: list[str]
    ) -> StudySubject:
        """``names``: the compared methods' labels (each must be unique)."""
        from avatarq.data.capture import MultifaceCapture
        from avatarq.data.encode import capture_normalization
        from avatarq.export.onnx_export import export_onnx, save_onnx
        from avatarq.models.checkpoint import load_checkpoint
        from avatarq.models.deploy import DeployableDecoder

        if len(set(names)) != len(names):
            raise AvatarqError("every compared method needs its own name")
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        model = load_checkpoint(checkpoint)
        capture = MultifaceCapture(capture_root)
        decoder = DeployableDecoder(model, capture_normalization(capture))
        fp32_model = export_onnx(decoder)
        fp32_path = workdir / "fp32.onnx"
        save_onnx(fp32_model, fp32_path)
        return cls(model, capture, decoder, fp32_model, fp32_path, workdir)


def ort_pre_process(fp32_path: Path, out_path: Path) -> None:
    """ONNX Runtime's recommended step before ``quantize_static``: symbolic shape inference,
    graph optimization (fusions) and ONNX shape inference."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(fp32_path), str(out_path))


def ort_quantize_static(
    fp32_path: Path,
    out_path: Path,
    z: np.ndarray,
    view: np.ndarray,
    method: PeerMethod,
    weight_bits: int = 8,
) -> None:
    """Quantize ``fp32_path`` with ONNX Runtime's ``quantize_static`` (QDQ, per-channel int8
    weights, or int4 with ``weight_bits`` 4; int8 activations) calibrated on z float32
    [N, Z], view float32 [N, 3]."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    # Unstrided, ORT keeps every intermediate tensor of every sample in memory (tens of
    # gigabytes at 1024^2 for the histogram methods); strided, it merges every few samples.
    extra: dict[str, Any] = {
        "ActivationSymmetric": method.ort_symmetric,
        "CalibStridedMinMax": _stride(z.shape[0]),
    }
    quantize_static(
        str(fp32_path),
        str(out_path),
        _DataReader(z, view),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(LAYER_OPS) if method.ort_layer_ops_only else None,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt4 if weight_bits == 4 else QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method.ort_method),
        extra_options=extra,
    )


def decode_clip(session: Any, z: np.ndarray, view: np.ndarray, batch: int = 4) -> np.ndarray:
    """float32 [T, 3, S, S] textures in [0, 1] from a session of a de-normalized decoder."""
    out = []
    for start in range(0, z.shape[0], batch):
        tex, _ = session.run(
            None, {"z": z[start : start + batch], "view": view[start : start + batch]}
        )
        out.append(tex / np.float32(TEXTURE_PEAK))
    return np.concatenate(out)


def _count_quantize_nodes(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(node.op_type == "QuantizeLinear" for node in model.graph.node)


def _measure(reference: np.ndarray, test: np.ndarray, seen: np.ndarray) -> tuple[Any, Any]:
    from avatarq.measure import compare_sequences

    everywhere = compare_sequences(reference, test, compute_ssim=False)
    visible = compare_sequences(reference, test, mask=seen[:, None], compute_ssim=False)
    return everywhere, visible


def compare_calibrations(
    checkpoint: str | Path,
    capture_root: str | Path,
    workdir: str | Path,
    methods: Sequence[PeerMethod] | None = None,
    n_random: int = 64,
    seed: int = 0,
    segment: str | None = None,
    camera: str | None = None,
    max_frames: int = 32,
    threads: int = 0,
    progress: Progress | None = None,
    clip: Any = None,
) -> PeerStudy:
    """Calibrate and quantize ``checkpoint``'s decoder with each of ``methods`` and measure
    every Q/DQ graph against the FP32 graph on one ordered clip.

    Args:
        checkpoint: Multiface DAM checkpoint (with its encoder).
        capture_root: the capture it was trained on: normalization, calibration samples
            (``n_random`` random (frame, camera) pairs + 2 clips of 8 frames, ``seed``; the
            same set for every method) and the evaluation clip (``segment``, default the
            first; ``camera``, default the frontal one; its first ``max_frames`` frames).
        workdir: where the FP32 and quantized graphs are written (kept for inspection).
        threads: ONNX Runtime intra-op threads (0: its default).
        clip: a `BenchSequence` with a camera to evaluate on instead of a capture segment,
            e.g. `avatarq.workflows.subject.TestSubject.heldout_sequence()`, whose frames
            no calibration sample comes from (its first ``max_frames`` frames are used).
    """
    import torch

    from avatarq.bench.sequences import sequence_from_capture
    from avatarq.calibration.from_files import load_samples
    from avatarq.calibration.masks import visibility_masks
    from avatarq.calibration.pipeline import calibrate
    from avatarq.calibration.samples import CalibrationSamples, samples_from_prior
    from avatarq.core.ort import make_session
    from avatarq.export.onnx_export import save_onnx
    from avatarq.export.qdq import quantize_onnx

    say = or_silent(progress)
    methods = list(methods) if methods is not None else default_methods()
    subject = StudySubject.load(checkpoint, capture_root, workdir, [m.name for m in methods])
    model, capture, decoder = subject.model, subject.capture, subject.decoder
    fp32_model, fp32_path, workdir = subject.fp32_model, subject.fp32_path, subject.workdir
    ort_input = workdir / "fp32_ort_preprocessed.onnx"
    ort_input.unlink(missing_ok=True)

    say(f"encoding {n_random} calibration samples and the evaluation clip")
    samples = load_samples(model, capture.root, capture, n_random=n_random, seed=seed)
    if clip is None:
        segment = segment or next(capture.clips())[0]
        clip = sequence_from_capture(
            capture, segment, checkpoint, camera=camera, max_frames=max_frames
        )
    else:
        from avatarq.bench.sequences import BenchSequence

        if clip.M is None:
            raise AvatarqError("the evaluation clip needs a camera (M) for its visibility masks")
        if max_frames is not None and len(clip) > max_frames:
            clip = BenchSequence(clip.inputs.subset(range(max_frames)), clip.capture_root)
    clip_samples = CalibrationSamples(clip.inputs, capture.topology)
    say("rasterizing visibility masks (calibration samples and clip)")
    start = time.perf_counter()
    with torch.no_grad():
        visibility = visibility_masks(decoder, samples)
        mask_seconds = time.perf_counter() - start
        seen = visibility_masks(decoder, clip_samples).numpy()

    z = np.ascontiguousarray(clip.z, dtype=np.float32)
    view = np.ascontiguousarray(clip.view, dtype=np.float32)
    reference = decode_clip(make_session(fp32_path, "cpu", threads), z, view, batch=4)

    rows = []
    for index, method in enumerate(methods):
        say(f"[{index + 1}/{len(methods)}] {method.name}")
        path = workdir / f"method_{index:02d}.onnx"
        start = time.perf_counter()
        if method.calibration is None:
            if not ort_input.is_file():
                ort_pre_process(fp32_path, ort_input)
            ort_quantize_static(ort_input, path, samples.z.numpy(), samples.view.numpy(), method)
        elif method.data_free:
            prior = samples_from_prior(decoder.config.z_dim, n_random, seed=seed)
            artifact = calibrate(decoder, prior, method.calibration)
            save_onnx(quantize_onnx(fp32_model, artifact), path)
        else:
            artifact = calibrate(decoder, samples, method.calibration, visibility=visibility)
            save_onnx(quantize_onnx(fp32_model, artifact), path)
        seconds = time.perf_counter() - start
        poca = method.calibration is not None and method.calibration.method == "poca"
        if poca and not method.data_free:
            seconds += mask_seconds
        test = decode_clip(make_session(path, "cpu", threads), z, view, batch=4)
        everywhere, visible = _measure(reference, test, seen)
        rows.append(
            PeerRow(
                name=method.name,
                tool=method.tool,
                settings=method.settings(),
                psnr=everywhere.psnr_mean,
                psnr_min=everywhere.psnr_min,
                psnr_visible=visible.psnr_mean,
                **attributes(everywhere, TEMPORAL_METRICS),
                **attributes(visible, TEMPORAL_METRICS, suffix="_visible"),
                calibration_seconds=seconds,
                quantize_nodes=_count_quantize_nodes(path),
            )
        )
        say(
            f"    PSNR {everywhere.psnr_mean:.2f} dB, tDE {everywhere.tde:.3g}, "
            f"J {everywhere.jitter_ratio:.3f} ({seconds:.0f} s)"
        )
    setup = {
        "model": model_record(decoder),
        "samples": {"count": len(samples), "hash": samples.hash, "seed": seed},
        "clip": {"source": clip.source, "frames": len(clip.ids)},
        "visibility_mask_seconds": mask_seconds,
        "ort_threads": threads,
    }
    return PeerStudy(rows, setup)
