"""Regenerate the "VQ latent stream" table of docs/benchmarks.md: bits per frame against the
decoded texture's PSNR, tDE and T-Std.

Makes (or reuses) a synthetic avatar with four long expression segments, exports its FP32
bundle, holds one segment out, trains codebooks on the encoder means of the other three
(`avatarq.codec.train_codebook`, the code behind ``avatarq vq``) and plays the held-out
segment through each codec before the decoder (`avatarq.bench.codec.LatentCodecRunner`),
against the FP32 decoder fed the unquantized z (`avatarq.bench.run_bench`, texture space,
ONNX Runtime on the CPU). Baselines on the same clip: z sent as float16, and per-dimension
scalar quantizers (G = Z groups of one dimension: Lloyd-Max codebooks per dimension).
Writes rows.json into the workdir and, with --docs, replaces the marked block.

    python benchmarks/vq_stream.py --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
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
from avatarq.data.synthetic import make_synthetic_avatar
from avatarq.data.synthetic_capture import SyntheticCaptureConfig
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
    ("RVQ", 16, 4, 1),
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("out/bench"), help="avatar cache")
    parser.add_argument("--frames", type=int, default=96, help="frames per capture segment")
    parser.add_argument("--holdout", type=int, default=0, help="index of the held-out segment")
    parser.add_argument("--seed", type=int, default=0, help="k-means seed")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    parser.add_argument("--docs", type=Path, default=None, help="markdown file to update")
    args = parser.parse_args(argv)

    def say(message: str, done: int = 0, total: int | None = None) -> None:
        if not done:
            print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    capture_config = SyntheticCaptureConfig(texture_size=256, segment_frames=(args.frames,) * 4)
    avatar = make_synthetic_avatar(
        args.cache / f"synth_vq{args.frames}", capture_config, TrainConfig(), progress=say
    )
    bundle_path = args.cache / f"synth_vq{args.frames}_fp32.avq"
    if not is_bundle(bundle_path):
        say("export FP32 bundle")
        export_bundle(avatar.checkpoint, bundle_path, avatar.capture_root)
    bundle = open_bundle(bundle_path)
    from avatarq.data.capture import MultifaceCapture

    segments = MultifaceCapture(avatar.capture_root).segments
    held_out = segments[args.holdout]
    training = tuple(s for s in segments if s != held_out)
    say(f"encode training segments {', '.join(training)}")
    z_train, source = capture_latents(avatar.checkpoint, avatar.capture_root, training)
    say(f"encode held-out segment {held_out}")
    sequence = sequence_from_capture(avatar.capture_root, held_out, avatar.checkpoint)
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
    rows = []
    for (name, book, seconds), r in zip(codecs, result.runners, strict=True):
        t = r.texture
        z_rmse = float(np.sqrt(np.mean((book.quantize(sequence.z) - z_true) ** 2)))
        rows.append(
            {
                "codec": name,
                "bits_per_frame": book.bits_per_frame,
                "z_rmse": z_rmse,
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
    lines = [
        f"Avatar: synthetic, {m.arch} DAM, z {m.z_dim}, texture {m.tex_size}^2, trained on "
        f"4 segments x {args.frames} frames (texture 256^2 capture). Codebooks: k-means on the "
        f"encoder means of the {len(z_train)} frames of {', '.join(training)}, seed "
        f"{args.seed}. Clip: the held-out segment, {sequence.source}; its z has RMS "
        f"{z_std:.3f} about its mean. Texture space (0..255 / 255, every texel), FP32 "
        f"model.onnx under ONNX Runtime CPU fed the coded z vs the same graph fed the plain "
        f"z. T-Std of the FP32 texture on this clip: {rows[0]['t_std_reference']:.3g}.",
        "",
        f"Measured {datetime.date.today().isoformat()} on {env['cpu'] or platform.processor()} "
        f"({env['cpu_count']} CPUs, {platform.system()}); {versions}. Command: `{command}`.",
        "",
        "| codec | bits/frame | z RMSE | PSNR mean (dB) | PSNR min | tDE | J | T-Std |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['codec']} | {row['bits_per_frame']} | {row['z_rmse']:.3g} | "
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
