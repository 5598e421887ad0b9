"""`avatarq demo`: the whole path on the embedded synthetic avatar, every step cached.

synth -> calibrate (POCA) -> export fp32 / fp16 / int8 -> build (what this machine can)
-> bench the INT8 bundle against the FP32 one -> report.html
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError


@dataclass
class DemoResult:
    """What the demo made and measured (paths under the work directory)."""

    checkpoint: Path
    capture_root: Path
    bundles: dict[str, Path] = field(default_factory=dict)
    validations: dict[str, str] = field(default_factory=dict)
    engines: dict[str, str] = field(default_factory=dict)
    report: Path | None = None
    bench_lines: list[str] = field(default_factory=list)
    passed: bool = True


def _calibration(avatar, out: Path, say: Progress, config) -> Path:
    """Calibrate once; reuse the artifact while the checkpoint and settings are unchanged."""
    from avatarq.calibration.from_files import calibrate_decoder
    from avatarq.core.hashing import file_sha256
    from avatarq.models.checkpoint import load_checkpoint

    stamp = {"checkpoint": file_sha256(avatar.checkpoint), "config": config.to_dict()}
    stamp_path = out / "demo_stamp.json"
    if (out / "calib.json").is_file() and stamp_path.is_file():
        if json.loads(stamp_path.read_text()) == stamp:
            say(f"calibration {out} (cached)")
            return out
    say("calibrating with POCA")
    model = load_checkpoint(avatar.checkpoint)
    _, artifact = calibrate_decoder(model, avatar.capture_root, None, config)
    artifact.save(out)
    stamp_path.write_text(json.dumps(stamp, sort_keys=True))
    return out


def _cached_bundle(bundle: Path, checkpoint: Path, options) -> object | None:
    """The manifest of ``bundle`` if it was exported from this checkpoint with these options."""
    from avatarq.core.hashing import file_sha256
    from avatarq.export import open_bundle

    try:
        manifest = open_bundle(bundle).manifest
    except AvatarqError:
        return None
    same_source = manifest.source_checkpoint_sha256 == file_sha256(checkpoint)
    same_options = manifest.export_options == options
    if options.calib is not None:
        calib_json = Path(options.calib) / "calib.json"
        digest = file_sha256(calib_json) if calib_json.is_file() else None
        same_options = same_options and manifest.calib_sha256 == digest
    passed = manifest.validation is not None and manifest.validation.passed
    return manifest if same_source and same_options and passed else None


def _validation_line(validation) -> str:  # noqa: ANN001 - a ValidationRecord or None
    if validation is None:
        return "not validated"
    line = (
        f"vs {validation.reference}: texture max|err| {validation.texture_max_abs_error:.3g}, "
        f"PSNR {validation.texture_psnr_db:.1f} dB"
    )
    if validation.vs_fp32 is not None:
        line += f"; vs FP32 PSNR {validation.vs_fp32.texture_psnr_db:.1f} dB"
    return line


def run_demo(
    workdir: str | Path, train_iters: int = 400, progress: Progress | None = None
) -> DemoResult:
    """Run the demo in ``workdir``; returns paths and one-line summaries of each step."""
    from avatarq.bench.harness import bench_bundle
    from avatarq.bench.results import BenchConfig
    from avatarq.calibration import CalibrationConfig
    from avatarq.data.synthetic import make_synthetic_avatar
    from avatarq.data.synthetic_capture import SyntheticCaptureConfig
    from avatarq.data.train import TrainConfig
    from avatarq.engines import BuildOptions, available_backends, build_engine
    from avatarq.export import ExportOptions, export_bundle

    say = or_silent(progress)
    workdir = Path(workdir)
    say("synthetic avatar")
    avatar = make_synthetic_avatar(
        workdir / "synth", SyntheticCaptureConfig(), TrainConfig(iters=train_iters), progress=say
    )
    result = DemoResult(avatar.checkpoint, avatar.capture_root)
    calib = _calibration(avatar, workdir / "calib", say, CalibrationConfig())
    for name, options in (
        ("fp32", ExportOptions()),
        ("fp16", ExportOptions(fp16=True)),
        ("int8", ExportOptions(int8=True, calib=str(calib))),
    ):
        say(f"export {name}")
        bundle = workdir / f"dam_{name}.avq"
        manifest = _cached_bundle(bundle, avatar.checkpoint, options)
        if manifest is None:
            exported = export_bundle(avatar.checkpoint, bundle, avatar.capture_root, options)
            manifest = exported.bundle.manifest
        result.bundles[name] = bundle
        result.validations[name] = _validation_line(manifest.validation)
    int8 = result.bundles["int8"]
    for backend in ("onnxruntime", "tensorrt-rtx"):
        if backend not in available_backends():
            result.engines[backend] = "not installed"
            continue
        say(f"build {backend}")
        try:
            record = build_engine(int8, backend, BuildOptions())
        except AvatarqError as exc:
            result.engines[backend] = f"not built: {exc}"
            continue
        result.engines[backend] = (
            f"{record.path} ({record.size_bytes / 1e6:.1f} MB, {record.build_seconds:.1f} s)"
        )
    say("bench: INT8 runners against the FP32 bundle")
    bench, paths = bench_bundle(
        int8,
        config=BenchConfig(resolution=(512, 334), warmup=1, iters=5),
        checkpoint=avatar.checkpoint,
        capture=avatar.capture_root,
        reference_bundle=result.bundles["fp32"],
        out=workdir / "report",
    )
    result.report = paths.get("html")
    for r in bench.runners:
        t = r.texture
        e2e = r.latency["end_to_end"]
        result.bench_lines.append(
            f"{r.name:<12} texture PSNR {t.psnr_mean:.1f} dB, tDE {t.tde:.3g}, J {t.jitter_ratio:.3f}, "
            f"FE {t.flicker_excess:.3g}, p50 {e2e.p50_ms:.3g} ms"
        )
    for name, why in bench.skipped.items():
        result.bench_lines.append(f"{name:<12} skipped: {why}")
    result.bench_lines.append(bench.verdict())
    result.passed = bench.passed
    return result
