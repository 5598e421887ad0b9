"""The one comparator: run two decoders on the same inputs and compare what they produce.

Export validation (ONNX Runtime vs PyTorch), the engine build check (engine vs model.onnx),
``avatarq compare`` and bench fidelity all call `compare`. The result is data, not a
boolean (Polygraphy's comparator, torchao's SQNR checks): per-output max and mean absolute
errors in each output's own units, and for the judged image output (a texture) PSNR, SSIM
and the temporal metrics of `avatarq.measure.sequence` on image / peak. Its truth value is
pass/fail against the tolerances it was given.

A decoder here is anything with a ``name`` and ``run(feeds) -> outputs``: ``feeds`` maps
input names to float32 arrays [B, ...] of one batch, ``outputs`` is the tuple of output
arrays [B, ...] in the decoder's output order (engines' runners, `avatarq.export.validate`'s
wrappers of a torch module or an ONNX Runtime session). Outputs may be views of buffers the
next call overwrites: the comparator copies what it keeps.

Peak (one convention everywhere): 255 for textures in 0..255 units (de-normalization folded
into the graph), else the reference's peak-to-peak range on the first frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from avatarq.core.documents import json_float
from avatarq.core.inputs import DecoderInputs
from avatarq.errors import AvatarqError
from avatarq.measure.latency import LatencyStats
from avatarq.measure.sequence import SequenceAccumulator, SequenceComparison
from avatarq.measure.tolerances import Tolerances


class Decoder(Protocol):
    """What `compare` runs (see the module docstring)."""

    name: str

    def run(self, feeds: Mapping[str, np.ndarray]) -> Sequence[np.ndarray]: ...


@dataclass(frozen=True)
class OutputError:
    """Absolute error of one output over all frames, in the output's own units."""

    name: str
    max_abs_error: float
    mean_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "max_abs_error": json_float(self.max_abs_error),
            "mean_abs_error": json_float(self.mean_abs_error),
        }


@dataclass(eq=False)
class Comparison:
    """``candidate`` against ``reference`` on the same T inputs.

    Attributes:
        reference, candidate: decoder names.
        peak: image units per 1.0 (255 for 0..255 textures); the image metrics are on
            image / peak.
        image: PSNR (dB), SSIM, tDE, J, FE of the judged image output, per frame and
            summarized, judged against the tolerances.
        outputs: every output's absolute errors in its own units, by output name.
        image_output: the name of the judged output.
        reference_latency, candidate_latency: wall-clock per `run` call (ms).
        batch: frames per call.
        extra: what the caller adds (bundle, backends) for reports.
    """

    reference: str
    candidate: str
    peak: float
    image: SequenceComparison
    outputs: dict[str, OutputError]
    image_output: str
    reference_latency: LatencyStats
    candidate_latency: LatencyStats
    batch: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.image)

    @property
    def texture(self) -> SequenceComparison:
        """The image metrics (the texture of a DAM)."""
        return self.image

    @property
    def n_frames(self) -> int:
        return self.image.n_frames

    @property
    def tolerances(self) -> Tolerances:
        return self.image.tolerances

    @property
    def texture_max_abs_error(self) -> float:
        return self.outputs[self.image_output].max_abs_error

    @property
    def texture_mean_abs_error(self) -> float:
        return self.outputs[self.image_output].mean_abs_error

    @property
    def vertices_max_abs_error(self) -> float:
        """Max |error| of the ``vertices`` output (0 when the decoder has none)."""
        out = self.outputs.get("vertices")
        return 0.0 if out is None else out.max_abs_error

    def failures(self) -> list[str]:
        return self.image.failures()

    def summary(self) -> str:
        """One line: errors, PSNR (mean, min, over all frames), temporal metrics, latency."""
        t = self.image
        ssim = "" if t.ssim_mean is None else f", SSIM {t.ssim_mean:.4f}"
        verdict = "PASS" if self else "FAIL: " + "; ".join(t.failures())
        others = "".join(
            f"; {o.name} max|err| {o.max_abs_error:.4g}"
            for o in self.outputs.values()
            if o.name != self.image_output
        )
        return (
            f"{self.candidate} vs {self.reference} over {t.n_frames} frames: "
            f"{self.image_output} max|err| {self.texture_max_abs_error:.4g}, mean|err| "
            f"{self.texture_mean_abs_error:.4g}, PSNR {_db(t.psnr_mean)} dB (min "
            f"{_db(t.psnr_min)}, all frames {_db(t.psnr_all)}){ssim}, tDE {t.tde:.3g}, "
            f"J {t.jitter_ratio:.3f}, FE {t.flicker_excess:.3g}{others}; p50 "
            f"{self.candidate_latency.p50_ms:.2f} ms ({self.candidate}) vs "
            f"{self.reference_latency.p50_ms:.2f} ms ({self.reference}). {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "n_frames": self.n_frames,
            "batch": self.batch,
            "peak": self.peak,
            "image_output": self.image_output,
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()},
            "texture": self.image.to_dict(),
            "reference_latency": self.reference_latency.to_dict(include_samples=False),
            "candidate_latency": self.candidate_latency.to_dict(include_samples=False),
            "passed": bool(self),
            **self.extra,
        }


def _db(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2f}"


class _ErrorSum:
    def __init__(self, name: str) -> None:
        self.name, self.max, self.sum, self.count = name, 0.0, 0.0, 0

    def add(self, ref: np.ndarray, test: np.ndarray) -> None:
        if ref.shape != test.shape:
            raise AvatarqError(
                f"output {self.name}: reference has shape {list(ref.shape)}, candidate "
                f"{list(test.shape)}"
            )
        diff = np.abs(test.astype(np.float64) - ref)
        frame_max = float(diff.max()) if diff.size else 0.0
        self.max = (
            math.nan if math.isnan(frame_max) or math.isnan(self.max) else max(self.max, frame_max)
        )
        self.sum += float(diff.sum())
        self.count += diff.size

    def result(self) -> OutputError:
        return OutputError(self.name, self.max, self.sum / max(self.count, 1))


def _timed_run(
    decoder: Decoder, feeds: dict[str, np.ndarray]
) -> tuple[Sequence[np.ndarray], float]:
    start = time.perf_counter()
    outputs = decoder.run(feeds)
    wall = (time.perf_counter() - start) * 1000.0
    own = getattr(decoder, "last_inference_ms", None)
    return outputs, float(own) if isinstance(own, int | float) and own >= 0 else wall


def compare(
    reference: Decoder,
    candidate: Decoder,
    inputs: DecoderInputs,
    tolerances: Tolerances | None = None,
    *,
    output_names: Sequence[str] = ("texture", "vertices"),
    image_output: str = "texture",
    peak: float | None = None,
    batch: int = 1,
    compute_ssim: bool = True,
    min_frames: int = 2,
) -> Comparison:
    """Run both decoders on ``inputs`` (in order, ``batch`` frames per call) and compare.

    Args:
        reference, candidate: decoders (`Decoder`); outputs are matched by position and
            named by ``output_names``.
        inputs: T inputs; the temporal metrics treat them as one ordered sequence, so pass
            a smooth clip for tDE/J to mean something.
        tolerances: what the result's truth value checks (default: nothing).
        image_output: the output judged by the image metrics ([B, C, H, W] or [B, H, W]).
        peak: image units per 1.0; None: the reference's first-frame peak-to-peak range.
        batch: frames per call (the last call may be smaller).
        compute_ssim: per-frame SSIM (costly at 1024^2).
        min_frames: fewest frames accepted (2: the temporal metrics need a pair).

    Returns:
        `Comparison`; frames stream through the metrics, memory stays at a few frames.
    """
    n = len(inputs)
    if n < min_frames:
        raise AvatarqError(f"comparisons need at least {min_frames} frames, got {n}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise AvatarqError(f"batch must be an integer >= 1, got {batch!r}")
    if image_output not in output_names:
        raise AvatarqError(f"the judged output {image_output!r} is not among {list(output_names)}")
    if peak is not None and not (math.isfinite(peak) and peak > 0):
        raise AvatarqError(f"peak must be a positive number, got {peak}")
    image_index = list(output_names).index(image_output)
    acc = SequenceAccumulator(compute_ssim=compute_ssim)
    errors = [_ErrorSum(name) for name in output_names]
    scale = peak
    ref_ms: list[float] = []
    cand_ms: list[float] = []
    for start in range(0, n, batch):
        feeds = {
            k: np.ascontiguousarray(v, dtype=np.float32)
            for k, v in inputs.batch(start, start + batch).items()
        }
        ref_out, ms = _timed_run(reference, feeds)
        ref_out = [np.array(a, dtype=np.float64) for a in ref_out]
        ref_ms.append(ms)
        cand_out, ms = _timed_run(candidate, feeds)
        cand_ms.append(ms)
        if len(ref_out) < len(output_names) or len(cand_out) < len(output_names):
            raise AvatarqError(
                f"expected outputs {list(output_names)}; the reference gave {len(ref_out)}, "
                f"the candidate {len(cand_out)}"
            )
        for err, r, c in zip(errors, ref_out, cand_out, strict=False):
            err.add(r, np.asarray(c))
        ref_img, cand_img = ref_out[image_index], np.asarray(cand_out[image_index])
        if scale is None:
            span = float(ref_img[0].max() - ref_img[0].min())
            scale = span if span > 0 and math.isfinite(span) else 1.0
        for f in range(ref_img.shape[0]):
            acc.add(ref_img[f] / scale, cand_img[f].astype(np.float64) / scale)
    return Comparison(
        reference=reference.name,
        candidate=candidate.name,
        peak=float(scale),
        image=acc.result(tolerances),
        outputs={e.name: e.result() for e in errors},
        image_output=image_output,
        reference_latency=LatencyStats.from_samples(ref_ms, batch),
        candidate_latency=LatencyStats.from_samples(cand_ms, batch),
        batch=batch,
    )
