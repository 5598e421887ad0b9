"""Settings and results of `avatarq bench`: `BenchConfig`, `RunnerResult`, `BenchResult`.

Both round-trip through plain JSON (`to_dict` / `from_dict`); `environment()` records
versions, devices and the git revision for the report.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.core.documents import DOCUMENT_CONFIG
from avatarq.errors import AvatarqError
from avatarq.measure import Gate, GateResult, SequenceComparison, parse_gates
from avatarq.measure.latency import LatencyStats
from avatarq.measure.perceptual import PerceptualConfig, PerceptualResult

BENCH_CONFIG_VERSION = 1
REPORT_SCHEMA_VERSION = 1
RENDER_CHOICES = ("auto", "torch", "nvdiffrast", "none")
GATE_SPACES = ("texture", "screen")
STAGES = ("decode", "copy", "render", "end_to_end")
DEVICES = ("auto", "cpu", "cuda")
LATENCY_METRICS = frozenset({"p50_ms", "p90_ms", "p99_ms", "mean_ms", "fps"})
#: Gate metrics that read no texture- or screen-space comparison.
SPACELESS_METRICS = LATENCY_METRICS | {"jod"}

# --------------------------------------------------------------------------- config


def _count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AvatarqError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run (round-trips through `to_dict` / `from_dict`).

    Attributes:
        runners: `avatarq.engines` backend names to benchmark (``onnx``, ``onnxruntime``,
            ``torch``, ``tensorrt``, ``tensorrt-rtx``); empty = `default_runners`.
        render: ``auto`` (nvdiffrast with CUDA, else the torch rasterizer; nothing is
            rendered when the sequence has no camera or the bundle no topology),
            ``torch``, ``nvdiffrast`` (both required to work) or ``none``.
        resolution: (H, W) rendered; None = the sequence camera's image size. Another size
            renders the same camera scaled (see `BenchSequence.projection_at`).
        warmup: untimed iterations before timing, per runner.
        iters: timed iterations per runner.
        batch: frames per decode call (timing and fidelity pass).
        gates: gate texts, e.g. ("psnr>=40", "J<=0.5", "p99_ms<=20"); a single
            comma-separated string is accepted too. Stored canonically ("jitter_ratio<=0.5").
        compute_ssim: SSIM per frame (the costliest metric).
        gate_space: ``texture`` or ``screen``: which fidelity metrics the gates read.
        gate_stage: the latency stage the latency gates read (`STAGES`).
        interleave: time the reference and the runners round-robin, one iteration each in
            turn, instead of one after the other: load from other processes then hits all
            alike, so ratios are fairer on a shared machine; each runner's weights are then
            evicted from caches by the others, so absolute times are those of a cold-ish
            cache.
        device: where runners run: ``auto`` (CUDA when torch sees a GPU), ``cpu``, ``cuda``.
        threads: ONNX Runtime intra-op threads (0: its default).
        perceptual: None, or a perceptual video metric scored per runner on the clip in
            JOD (`avatarq.measure.perceptual`): ``fvvdp`` (FovVideoVDP) or ``cvvdp``
            (ColorVideoVDP); on the rendered frames (cropped to the FP32 foreground of the
            first frame) when rendering, else on the textures; needs the optional extra.
        perceptual_display: the display model the clip is judged on.
        perceptual_size: longest side (pixels) the frames are reduced to for the metric.
        frame_rate: frames per second the clip plays at (the perceptual metric's time
            axis; 30 = Multiface's capture rate).
        vq: also run every runner behind the latent codec: z is coded with the bundle's
            codebook (or ``codebook``) and decoded before the decoder sees it (runner
            ``NAME+vq``); the reference keeps the unquantized z.
        codebook: a codebook .npz (``avatarq vq -o``) instead of the bundle's; implies vq.
        version: schema version.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    runners: tuple[str, ...] = ()
    render: str = "auto"
    resolution: tuple[int, int] | None = None
    warmup: int = 3
    iters: int = 20
    batch: int = 1
    gates: tuple[str, ...] = ()
    compute_ssim: bool = True
    gate_space: str = "texture"
    gate_stage: str = "end_to_end"
    interleave: bool = False
    device: str = "auto"
    threads: int = 0
    perceptual: str | None = None
    perceptual_display: str = "standard_fhd"
    perceptual_size: int = 256
    frame_rate: float = 30.0
    vq: bool = False
    codebook: str | None = None
    version: int = BENCH_CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.version != BENCH_CONFIG_VERSION:
            raise AvatarqError(
                f"bench config version {self.version!r} is not supported (expected "
                f"{BENCH_CONFIG_VERSION})"
            )
        runners = (self.runners,) if isinstance(self.runners, str) else tuple(self.runners)
        if not all(isinstance(r, str) and r for r in runners):
            raise AvatarqError(f"runners must be backend names, got {self.runners!r}")
        if len(set(runners)) != len(runners):
            raise AvatarqError(f"runners are named more than once: {', '.join(runners)}")
        object.__setattr__(self, "runners", runners)
        if self.render not in RENDER_CHOICES:
            raise AvatarqError(
                f"unknown render choice {self.render!r}; expected {', '.join(RENDER_CHOICES)}"
            )
        if self.resolution is not None:
            res = self.resolution
            if (
                not isinstance(res, tuple | list)
                or len(res) != 2
                or not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in res)
            ):
                raise AvatarqError(f"resolution must be (H, W) positive integers, got {res!r}")
            object.__setattr__(self, "resolution", (int(res[0]), int(res[1])))
        _count("warmup", self.warmup, 0)
        _count("iters", self.iters, 1)
        _count("batch", self.batch, 1)
        _count("threads", self.threads, 0)
        if self.codebook is not None:
            object.__setattr__(self, "codebook", str(self.codebook))
            object.__setattr__(self, "vq", True)
        for name in ("compute_ssim", "interleave", "vq"):
            if not isinstance(getattr(self, name), bool):
                raise AvatarqError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.gate_space not in GATE_SPACES:
            raise AvatarqError(
                f"gate_space must be one of {', '.join(GATE_SPACES)}, got {self.gate_space!r}"
            )
        if self.gate_stage not in STAGES:
            raise AvatarqError(
                f"gate_stage must be one of {', '.join(STAGES)}, got {self.gate_stage!r}"
            )
        if self.device not in DEVICES:
            raise AvatarqError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        # validates the perceptual settings even when no metric is asked for
        settings = PerceptualConfig(
            self.perceptual or "fvvdp",
            self.perceptual_display,
            self.frame_rate,
            self.perceptual_size,
        )
        object.__setattr__(self, "frame_rate", settings.fps)
        texts = (self.gates,) if isinstance(self.gates, str) else tuple(self.gates)
        gates = [g for text in texts for g in parse_gates(text)] if texts else []
        object.__setattr__(self, "gates", tuple(str(g) for g in gates))
        metrics = {g.metric for g in gates}
        if "ssim" in metrics and not self.compute_ssim:
            raise AvatarqError("gate on ssim needs SSIM: drop the gate or compute SSIM")
        if "jod" in metrics and self.perceptual is None:
            raise AvatarqError(
                "gate on jod needs a perceptual metric: add --perceptual fvvdp (or cvvdp)"
            )
        if self.gate_space == "screen" and self.render == "none" and metrics - SPACELESS_METRICS:
            raise AvatarqError(
                "screen-space gates need rendering; use gate_space texture or a render backend"
            )

    def perceptual_config(self) -> PerceptualConfig | None:
        """The `PerceptualConfig` of this run, or None when no perceptual metric is asked for."""
        if self.perceptual is None:
            return None
        return PerceptualConfig(
            self.perceptual, self.perceptual_display, self.frame_rate, self.perceptual_size
        )

    def parsed_gates(self) -> list[Gate]:
        return parse_gates(",".join(self.gates)) if self.gates else []

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runners"] = list(self.runners)
        d["gates"] = list(self.gates)
        d["resolution"] = None if self.resolution is None else list(self.resolution)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchConfig:
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise AvatarqError(f"unknown bench config field(s) {unknown}")
        d = dict(data)
        for key in ("runners", "gates"):
            if key in d:
                d[key] = tuple(d[key])
        if d.get("resolution") is not None:
            d["resolution"] = tuple(d["resolution"])
        return cls(**d)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FrameStrip:
    """One frame of the reference and of a runner, for the report's strip.

    Attributes:
        space: ``texture`` or ``screen``.
        frame: index in the sequence; frame_id its label.
        psnr: PSNR of this frame (the lowest of the sequence, which is why it was kept).
        reference, deployed: float32 [H, W, 3], display orientation (row 0 = top; textures
            are flipped from the decoder's row 0 = v 0), values as measured (about 0..1).
            Screen frames are cropped to the FP32 foreground plus a margin.
        mask: float32 [H, W] foreground of the reference (screen), or None (texture).
    """

    space: str
    frame: int
    frame_id: str
    psnr: float
    reference: np.ndarray
    deployed: np.ndarray
    mask: np.ndarray | None = None


@dataclass
class CodecRecord:
    """The latent codec a runner's z went through before its decoder (``bench --vq``)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    kind: str
    codebook: str
    codebook_size: int
    stages: int
    groups: int
    bits_per_frame: int
    bytes_per_frame: int
    source: str


@dataclass(eq=False)
class RunnerResult:
    """Everything measured for one runner (or the reference, which has no comparisons).

    Attributes:
        name: backend name (``onnx``, ``tensorrt``, ...), or ``reference``.
        label: the runner's own description (model file, precision, device).
        latency: stage name (`STAGES`; ``decode`` and ``end_to_end`` only, without
            rendering) -> stats.
        texture: comparison with the reference in texture space (None for the reference).
        screen: comparison in screen space (None when not rendered).
        gates: results of the configured gates.
        perceptual: the perceptual score of the clip (None when not asked for).
        perceptual_space: ``screen`` or ``texture``: what ``perceptual`` was scored on.
        codec: the latent codec z went through before this runner's decoder (``vq``);
            None for the plain runners.
    """

    name: str
    label: str
    latency: dict[str, LatencyStats]
    texture: SequenceComparison | None = None
    screen: SequenceComparison | None = None
    gates: list[GateResult] = field(default_factory=list)
    perceptual: PerceptualResult | None = None
    perceptual_space: str | None = None
    codec: CodecRecord | None = None

    @property
    def passed(self) -> bool:
        return all(self.gates)

    def gate_values(self, space: str, stage: str) -> dict[str, float]:
        comparison = self.screen if space == "screen" else self.texture
        values: dict[str, float] = {}
        if comparison is not None:
            values.update(comparison.gate_values())
        if stage in self.latency:
            values.update(self.latency[stage].gate_values())
        if self.perceptual is not None:
            values.update(self.perceptual.gate_values())
        return values

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "latency": {k: v.to_dict() for k, v in self.latency.items()},
            "texture": None if self.texture is None else self.texture.to_dict(),
            "screen": None if self.screen is None else self.screen.to_dict(),
            "gates": [g.to_dict() for g in self.gates],
            "passed": self.passed,
            "perceptual": None if self.perceptual is None else self.perceptual.to_dict(),
            "perceptual_space": self.perceptual_space,
            "codec": None if self.codec is None else asdict(self.codec),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunnerResult:
        def comparison(x: Any) -> SequenceComparison | None:
            return None if x is None else SequenceComparison.from_dict(x)

        return cls(
            name=d["name"],
            label=d["label"],
            latency={k: LatencyStats.from_dict(v) for k, v in d["latency"].items()},
            texture=comparison(d["texture"]),
            screen=comparison(d["screen"]),
            gates=[
                GateResult(
                    Gate(g["metric"], g["op"], g["threshold"]), float(g["value"]), g["passed"]
                )
                for g in d["gates"]
            ],
            perceptual=(
                None if d.get("perceptual") is None else PerceptualResult.from_dict(d["perceptual"])
            ),
            perceptual_space=d.get("perceptual_space"),
            codec=None if d.get("codec") is None else CodecRecord(**d["codec"]),
        )


@dataclass
class BenchSetup:
    """What a bench run ran on: its settings and descriptive records (paths, labels,
    versions) of the bundle, the sequence and the render stage. Shared by `BenchResult`
    and its report document."""

    __pydantic_config__ = DOCUMENT_CONFIG

    config: BenchConfig
    bundle: dict[str, Any]
    sequence: dict[str, Any]
    render: dict[str, Any]


@dataclass(eq=False)
class BenchResult(BenchSetup):
    """The outcome of `run_bench`: settings, what ran where, every number, gate verdicts.

    Truthy when every gate of every runner passed; `exit_code` is then 0, else 1 (the
    status `avatarq bench` exits with). `strips` (images for the report) are not part of
    `to_dict`.
    """

    reference: RunnerResult
    runners: list[RunnerResult]
    environment: dict[str, Any]
    skipped: dict[str, str] = field(default_factory=dict)
    created: str = ""
    seconds: float = 0.0
    strips: dict[str, list[FrameStrip]] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.runners)

    def __bool__(self) -> bool:
        return self.passed

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1

    def failures(self) -> list[str]:
        """One line per failed gate, e.g. 'onnxruntime: psnr>=40: 38.2 FAIL'."""
        return [f"{r.name}: {g}" for r in self.runners for g in r.gates if not g]

    def latency_ratios(self, runner: RunnerResult) -> dict[str, float]:
        """p50 of each stage of ``runner`` over the reference's p50, same run."""
        out = {}
        for stage, stats in runner.latency.items():
            ref = self.reference.latency.get(stage)
            if ref is not None and ref.p50_ms > 0:
                out[stage] = stats.p50_ms / ref.p50_ms
        return out

    def verdict(self) -> str:
        """One sentence: which gates passed or failed, or what was measured without gates."""
        n_gates = sum(len(r.gates) for r in self.runners)
        names = ", ".join(r.name for r in self.runners)
        if n_gates == 0:
            return (
                f"No gates were set; {len(self.runners)} runner(s) ({names}) were measured "
                "against the FP32 reference."
            )
        if self.passed:
            return f"PASS: all {n_gates} gate checks held for {names}."
        fails = self.failures()
        return f"FAIL: {len(fails)} of {n_gates} gate checks failed ({'; '.join(fails)})."

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (non-finite numbers as strings, see `avatarq.core.documents.json_float`)."""
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "created": self.created,
            "seconds": self.seconds,
            "passed": self.passed,
            "exit_code": self.exit_code,
            "verdict": self.verdict(),
            "config": self.config.to_dict(),
            "bundle": self.bundle,
            "sequence": self.sequence,
            "render": self.render,
            "reference": self.reference.to_dict(),
            "runners": [
                {**r.to_dict(), "latency_p50_ratio_vs_reference": self.latency_ratios(r)}
                for r in self.runners
            ],
            "skipped": self.skipped,
            "environment": self.environment,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BenchResult:
        """Inverse of `to_dict` (derived fields are recomputed; no strips)."""
        version = d.get("schema_version")
        if version != REPORT_SCHEMA_VERSION:
            raise AvatarqError(
                f"bench report schema_version is {version!r}; this avatarq reads "
                f"{REPORT_SCHEMA_VERSION}"
            )
        try:
            return cls(
                config=BenchConfig.from_dict(d["config"]),
                bundle=d["bundle"],
                sequence=d["sequence"],
                render=d["render"],
                reference=RunnerResult.from_dict(d["reference"]),
                runners=[RunnerResult.from_dict(r) for r in d["runners"]],
                environment=d["environment"],
                skipped=d.get("skipped", {}),
                created=d.get("created", ""),
                seconds=float(d.get("seconds", 0.0)),
            )
        except KeyError as exc:
            raise AvatarqError(f"bench report lacks field {exc}") from None


# --------------------------------------------------------------------------- environment


def _versions(extra: Sequence[str] = ()) -> dict[str, str]:
    dists = [
        "numpy",
        "torch",
        "onnx",
        "onnxruntime",
        "onnxruntime-gpu",
        "matplotlib",
        "diffrp-nvdiffrast",
        "nvdiffrast",
        "tensorrt",
        "tensorrt-rtx",
        *extra,
    ]
    from avatarq import __version__

    out = {"avatarq": __version__, "python": platform.python_version()}
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git(here: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout.strip()


def _git_revision() -> dict[str, Any] | None:
    """The git commit of the avatarq source tree running the bench: None when avatarq is not
    run from its own checkout (an installed copy inside some other repository included)."""
    package = Path(__file__).resolve().parent.parent  # .../src/avatarq
    try:
        top = Path(_git(package, "rev-parse", "--show-toplevel")).resolve()
        if top / "src" / "avatarq" != package:
            return None
        rev = _git(package, "rev-parse", "HEAD")
        dirty = _git(package, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"revision": rev, "dirty": bool(dirty)} if rev else None


def environment() -> dict[str, Any]:
    """Versions, device names and the git revision, for the report."""
    import torch

    env: dict[str, Any] = {
        "versions": _versions(),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "git": _git_revision(),
        "argv": list(sys.argv),
    }
    return env


def bundle_record(bundle: Any) -> dict[str, Any]:
    m = bundle.manifest
    return {
        "path": str(bundle.root),
        "arch": m.arch,
        "precision": m.precision,
        "z_dim": m.z_dim,
        "tex_size": m.tex_size,
        "n_vertices": m.n_vertices,
        "normalization_folded": bool(m.normalization.folded),
        "camera": m.camera,
        "source_checkpoint_sha256": m.source_checkpoint_sha256,
        "calib_sha256": m.calib_sha256,
        "exported_with": dict(m.versions),
        "engines": [
            {"backend": e.backend, "target": e.target, "library_version": e.library_version}
            for e in m.engines
        ],
    }
