"""What the perceptual metric says about known errors, and what it costs on the CPU.

Scores synthetic clips against a static textured reference with `avatarq.measure.perceptual`
(FovVideoVDP by default): the clip itself, a spatially smooth error held still, the same
error with a random sign per frame (temporally white jitter) and with a sign flip every
frame, all at the same per-frame PSNR; at two frame rates. Then times the metric on
clips of --size x --size pixels (seconds per frame). Prints a markdown table.

    python benchmarks/perceptual_metric.py --metric fvvdp
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np

from avatarq.bench.results import environment
from avatarq.measure import PerceptualConfig, psnr
from avatarq.measure.perceptual import package_version, score


def smooth_error(side: int, rms: float, sigma: float, seed: int) -> np.ndarray:
    """float32 [side, side, 3] white noise blurred by a Gaussian of ``sigma`` pixels."""
    noise = np.random.default_rng(seed).standard_normal((side, side, 3))
    f = np.fft.fftfreq(side)
    gain = np.exp(-2 * (np.pi * sigma) ** 2 * (f[:, None] ** 2 + f[None, :] ** 2))
    e = np.real(np.fft.ifft2(np.fft.fft2(noise, axes=(0, 1)) * gain[..., None], axes=(0, 1)))
    return (rms * e / np.sqrt(np.mean(e**2))).astype(np.float32)


def reference_clip(frames: int, side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    base = 0.5 + 0.2 * np.sin(7 * x + 3 * y)[..., None] * np.array([1.0, 0.8, 0.6])
    base += 0.05 * rng.standard_normal((side, side, 3))
    return np.repeat(np.clip(base, 0.2, 0.8)[None], frames, axis=0).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", default="fvvdp", choices=("fvvdp", "cvvdp"))
    parser.add_argument("--display", default="standard_fhd")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--side", type=int, default=64, help="side of the sanity clips")
    parser.add_argument("--size", type=int, default=256, help="side of the timed clip")
    args = parser.parse_args(argv)

    ref = reference_clip(args.frames, args.side)
    rows = ["| error (same PSNR every frame) | PSNR | tDE | JOD 30 fps | JOD 60 fps |"]
    rows.append("|---|---|---|---|---|")
    sign_random = np.random.default_rng(2).choice([-1.0, 1.0], args.frames).astype(np.float32)
    sign_flip = np.array([(-1.0) ** t for t in range(args.frames)], dtype=np.float32)
    for sigma in (0.0, 2.0):
        e = smooth_error(args.side, 0.01, sigma, seed=1) if sigma else None
        if e is None:
            noise = np.random.default_rng(1).standard_normal((args.side, args.side, 3))
            e = (0.01 * noise / np.sqrt(np.mean(noise**2))).astype(np.float32)
        cases = {
            "none (the reference itself)": np.ones(args.frames, np.float32) * 0,
            "held still": np.ones(args.frames, np.float32),
            "random sign per frame": sign_random,
            "sign flip every frame": sign_flip,
        }
        for label, signs in cases.items():
            if sigma and label.startswith("none"):
                continue
            test = ref + signs[:, None, None, None] * e
            err = test.astype(np.float64) - ref
            tde = float(np.mean(np.abs(np.diff(err, axis=0))))
            jods = []
            for fps in (30.0, 60.0):
                config = PerceptualConfig(args.metric, args.display, fps, max(args.side, 16))
                jods.append(score(ref, test, config).jod)
            blur = "white" if not sigma else f"blurred {sigma:g} px"
            what = label if label.startswith("none") else f"{blur} noise, {label}"
            db = psnr(ref[0], test[0])
            rows.append(f"| {what} | {db:.1f} dB | {tde:.2e} | {jods[0]:.3f} | {jods[1]:.3f} |")
    big = reference_clip(args.frames, args.size)
    test = big + smooth_error(args.size, 0.01, 2.0, seed=1)
    config = PerceptualConfig(args.metric, args.display, 30.0, args.size)
    score(big[:2], test[:2], config)  # warm-up (lookup tables)
    start = time.perf_counter()
    result = score(big, test, config)
    seconds = time.perf_counter() - start
    env = environment()
    print(
        f"{result.name} {package_version(args.metric)}, display {args.display}, on the CPU "
        f"({env['cpu']}, {env['torch_threads']} torch threads, torch "
        f"{env['versions'].get('torch')}, {platform.system()}), "
        f"{datetime.date.today().isoformat()}. Sanity clips: {args.frames} frames of "
        f"{args.side}x{args.side}, error RMS 0.01 (40 dB).\n"
    )
    print("\n".join(rows))
    print(
        f"\nCost: {args.frames} frames of {args.size}x{args.size} in {seconds:.1f} s = "
        f"{seconds / args.frames:.2f} s per frame (JOD {result.jod:.3f})."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
