"""Regenerate the "VQ latent stream" table of docs/benchmarks.md: bits per frame against the
decoded texture's PSNR, tDE and T-Std.

Uses the demo avatar (made or reused like the other benchmarks) and writes two more
captures of the same face, cameras and skin in new motion (`SyntheticCaptureConfig.
motion_seed`): one to train on, one to play. Both are normalized with the demo capture's
statistics (its tex_mean.png, tex_var.txt, vert_mean.bin, vert_var.txt are copied over
theirs), as a live session is normalized with its avatar's capture. Codebooks are trained
(`avatarq.codec.train_codebook`, the code behind ``avatarq vq``) on the encoder means of
the demo capture and the training capture, and the held-out clip is played through each
codec before the decoder (`avatarq.bench.codec.LatentCodecRunner`), against the FP32
decoder fed the unquantized z (`avatarq.bench.run_bench`, texture space, ONNX Runtime on the
CPU). Baselines on the same clip: z sent as float16, and per-dimension scalar quantizers
(G = Z groups of one dimension: a Lloyd-Max codebook per dimension). Writes rows.json into
the workdir and, with --docs, replaces the marked block.

    python benchmarks/vq_stream.py --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from avatarq.bench import BenchConfig
from avatarq.bench.codec import LatentCodecRunner
from avatarq.bench.harness import run_bench
from avatarq.bench.results import environment
from avatarq.bench.sequences import sequence_from_capture
from avatarq.codec import VQConfig, train_codebook
from avatarq.data.capture import MultifaceCapture
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.data.train import TrainConfig
from avatarq.engines import RunOptions, open_runner
from avatarq.export import export_bundle
from avatarq.export.bundle import is_bundle, open_bundle
from avatarq.workflows.vq import capture_latents

# (label, K, stages, groups); groups = 0 means one group per dimension (scalar quantizers)
GRID = (
    ("VQ", 256, 1, 1),
    ("RVQ", 256, 2, 1),
    ("RVQ", 256, 3, 1),
    ("RVQ", 256, 4, 1),
    ("VQ", 16, 1, 1),
    ("RVQ", 16, 2, 1),
    ("RVQ", 16, 3, 1),
    ("RVQ", 16, 4, 1),
    ("RVQ", 64, 3, 1),
    ("product VQ", 256, 1, 4),
    ("product RVQ", 256, 2, 4),
    ("scalar (per dim)", 4, 1, 0),
    ("scalar (per dim)", 16, 1, 0),
    ("scalar (per dim)", 256, 1, 0),
)


BEGIN, END = "<!-- vq-stream:begin -->", "<!-- vq-stream:end -->"


def replace_block(text: str, block: str) -> str:
    """``text`` with the lines between BEGIN and END replaced (appended when missing)."""
    new = f"{BEGIN}\n{block.strip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: new, text)
    return text.rstrip("\n") + "\n\n" + new + "\n"


@dataclass
class Float16Codec:
    """The plain baseline: z sent as IEEE float16 (16 bits a dimension)."""

    z_dim: int

    @property
    def bits_per_frame(self) -> int:
        return 16 * self.z_dim

    def quantize(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, np.float32).astype(np.float16).astype(np.float32)

    def describe(self) -> str:
        return f"float16 z: {self.bits_per_frame} bits/frame"


STATISTICS = ("tex_mean.png", "tex_var.txt", "vert_mean.bin", "vert_var.txt")


def new_motion(
    out: Path, demo_root: Path, motion_seed: int, segment_frames: tuple[int, ...], say
) -> Path:
    """A capture of the demo avatar in new motion (average textures only), normalized with
    the demo capture's statistics; reused when already written."""
    config = SyntheticCaptureConfig(
        segment_frames=segment_frames, motion_seed=motion_seed, camera_textures_per_frame=0
    )
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text()) == config.to_dict():
        return out / demo_root.name
    say(f"write capture, new motion {motion_seed}, segments {segment_frames}")
    root = write_synthetic_capture(out, config, overwrite=True)
    for name in STATISTICS:
        shutil.copyfile(demo_root / name, root / name)
    done.write_text(json.dumps(config.to_dict()))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--frames", type=int, default=64, help="frames per new-motion segment")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if not done:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    avatar = make_synthetic_avatar(
        args.cache / "synth_demo", train_config=TrainConfig(), progress=say
    )
    bundle_path = args.cache / "synth_demo_fp32.avq"
    if not is_bundle(bundle_path):
        say("export FP32 bundle")
        export_bundle(avatar.checkpoint, bundle_path, avatar.capture_root)
    bundle = open_bundle(bundle_path)
    train_root = new_motion(
        args.cache / "vq_motion1", avatar.capture_root, 1, (args.frames,) * 4, say
    )
    play_root = new_motion(args.cache / "vq_motion2", avatar.capture_root, 2, (args.frames,), say)
    say("encode training captures")
    z_demo, _ = capture_latents(avatar.checkpoint, avatar.capture_root)
    z_new, _ = capture_latents(avatar.checkpoint, train_root)
    z_train = np.concatenate([z_demo, z_new])
    source = (
        f"encoder means of the {len(z_demo)} frames of the demo capture and the "
        f"{len(z_new)} frames of new motion 1"
    )
    say("encode the held-out clip")
    play_segment = MultifaceCapture(play_root).segments[0]
    sequence = sequence_from_capture(play_root, play_segment, avatar.checkpoint)
    z_dim = z_train.shape[1]

    codecs: list[tuple[str, object, float]] = [("float16 z", Float16Codec(z_dim), 0.0)]
    for label, k, stages, groups in GRID:
        g = z_dim if groups == 0 else groups
        started = time.perf_counter()
        book = train_codebook(
            z_train, VQConfig(codebook_size=k, stages=stages, groups=g, seed=args.seed), source
        )
        name = f"{label} K {k}, S {stages}, G {g}"
        codecs.append((name, book, time.perf_counter() - started))
        say(f"trained {name} in {codecs[-1][2]:.1f} s")

    options = RunOptions(device="cpu", threads=args.threads, max_batch=8)
    runners = [
        LatentCodecRunner(open_runner(bundle, "onnx", options), book, name)
        for name, book, _ in codecs
    ]
    config = BenchConfig(
        render="none", warmup=0, iters=1, batch=8, compute_ssim=False, threads=args.threads
    )
    say(f"bench {len(runners)} codecs on {len(sequence)} frames")
    result = run_bench(bundle, sequence, config, say, runners=runners)

    z_true = sequence.z.astype(np.float64)
    say("mesh error of each codec")
    mesh_rmse = {}
    with open_runner(bundle, "onnx", options) as plain:
        ref_vertices = np.concatenate(
            [
                plain.decode(sequence.z[i : i + 8], sequence.view[i : i + 8])[1].copy()
                for i in range(0, len(sequence), 8)
            ]
        ).astype(np.float64)  # copies: a runner's outputs are views the next call overwrites
        for name, book, _ in codecs:
            coded = book.quantize(sequence.z)
            vertices = np.concatenate(
                [
                    plain.decode(coded[i : i + 8], sequence.view[i : i + 8])[1].astype(np.float64)
                    for i in range(0, len(sequence), 8)
                ]
            )
            mesh_rmse[name] = float(
                np.sqrt(np.mean(np.sum((vertices - ref_vertices) ** 2, axis=-1)))
            )
    rows = []
    for (name, book, seconds), r in zip(codecs, result.runners, strict=True):
        t = r.texture
        z_rmse = float(np.sqrt(np.mean((book.quantize(sequence.z) - z_true) ** 2)))
        rows.append(
            {
                "codec": name,
                "bits_per_frame": book.bits_per_frame,
                "z_rmse": z_rmse,
                "mesh_rmse": mesh_rmse[name],
                "psnr_mean": t.psnr_mean,
                "psnr_min": t.psnr_min,
                "tde": t.tde,
                "jitter_ratio": t.jitter_ratio,
                "t_std": t.t_std,
                "t_std_reference": t.t_std_reference,
                "train_seconds": seconds,
            }
        )
    workdir = args.cache / f"vq_stream{args.frames}"
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rows.json").write_text(json.dumps(rows, indent=2))

    env = environment()
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    command = "python benchmarks/vq_stream.py " + " ".join(a for a in sys.argv[1:] if a)
    m = bundle.manifest
    z_std = float(np.sqrt(np.mean((z_true - z_true.mean(0)) ** 2)))
    centred = z_train.astype(np.float64) - z_train.mean(0)
    spectrum = np.linalg.svd(centred, compute_uv=False) ** 2
    first_pc = float(spectrum[0] / spectrum.sum())
    lines = [
        f"Avatar: the demo avatar ({m.arch} DAM, z {m.z_dim}, texture {m.tex_size}^2). "
        f"Codebooks: k-means on the {source} ({len(z_train)} latents; same face, cameras "
        f"and skin, normalized with the demo capture's statistics), seed {args.seed}. Clip: "
        f"new motion 2, never seen by the codebooks, {sequence.source}; its z has RMS "
        f"{z_std:.3f} about its mean. The first principal component of the training latents "
        f"holds {100 * first_pc:.4f}% of their variance. Texture space (0..255 / 255, every texel): the FP32 "
        f"model.onnx under ONNX Runtime CPU fed the coded z against the same graph fed the "
        f"plain z. T-Std of the FP32 texture on this clip: {rows[0]['t_std_reference']:.3g}. "
        "z RMSE: per dimension, latent units; mesh RMSE: root mean squared vertex distance "
        "to the FP32 mesh, capture units (mm).",
        "",
        f"Measured {datetime.date.today().isoformat()} on {env['cpu'] or platform.processor()} "
        f"({env['cpu_count']} CPUs, {platform.system()}); {versions}. Command: `{command}`.",
        "",
        "| codec | bits/frame | z RMSE | mesh RMSE | PSNR mean (dB) | PSNR min | tDE | J | T-Std |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['codec']} | {row['bits_per_frame']} | {row['z_rmse']:.3g} | "
            f"{row['mesh_rmse']:.3g} | "
            f"{row['psnr_mean']:.2f} | {row['psnr_min']:.2f} | {row['tde']:.3g} | "
            f"{row['jitter_ratio']:.3f} | {row['t_std']:.3g} |"
        )
    block = "\n".join(lines)
    print(block)
    if args.docs is not None:
        text = args.docs.read_text()
        text = replace_block(text, block)
        args.docs.write_text(text)
        say(f"updated {args.docs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
