"""``avatarq vq`` and ``avatarq distill-warp``: the streaming modes, a latent-stream codebook
and the Neural-Caching low-latency mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import (
    CaptureOption,
    CheckpointArgument,
    ForceOption,
    JsonOption,
    LatentsOption,
    SeedOption,
    command,
    console,
    progress_bar,
)


@command()
def vq(
    model: Annotated[
        Path | None,
        typer.Option("--model", "-m", help="The DAM checkpoint whose encoder makes the codes."),
    ] = None,
    capture: CaptureOption = None,
    segment: Annotated[
        list[str] | None,
        typer.Option(help="Train on this capture segment only (repeatable)."),
    ] = None,
    latents: LatentsOption = None,
    codebook: Annotated[
        int, typer.Option(min=2, max=65536, help="Centroids per stage (K): log2 K bits a code.")
    ] = 256,
    stages: Annotated[int, typer.Option(min=1, max=16, help="Residual stages (S).")] = 1,
    groups: Annotated[
        int, typer.Option(min=1, max=65536, help="Product groups over z's dimensions (G).")
    ] = 1,
    iters: Annotated[
        int, typer.Option(min=1, max=10_000, help="Most k-means iterations per stage.")
    ] = 50,
    seed: SeedOption = 0,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the codebook to this .npz file.")
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option(help="Add the codebook to this bundle (a bundle component).")
    ] = None,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Train a codebook for the latent stream: residual (and product) k-means on a capture's
    latent codes (--model and --capture) or on the z of --latents; each frame then costs
    GROUPS x STAGES x log2(CODEBOOK) bits.

    Example: avatarq vq --model dam.pt --capture CAPTURE --stages 2 --bundle dam.avq
    """
    from avatarq.codec import VQConfig
    from avatarq.workflows.vq import train_vq

    config = VQConfig(codebook_size=codebook, stages=stages, groups=groups, iters=iters, seed=seed)
    with progress_bar("vq") as progress:
        result = train_vq(
            config,
            checkpoint=model,
            capture=capture,
            segments=tuple(segment or ()),
            latents=latents,
            out=out,
            bundle=bundle,
            force=force,
            progress=progress,
        )
    if as_json:
        console.print_json(json.dumps(result.to_dict()))
        return
    book = result.codebook
    console.print(f"codebook   {book.describe()}", highlight=False)
    console.print(f"trained on {book.source}", highlight=False)
    mse = ", ".join(f"{m:.4g}" for m in book.train_mse)
    console.print(f"z mse      {mse} (after each stage, per dimension)", highlight=False)
    for what, path in result.paths.items():
        console.print(f"written    {path} ({what})", highlight=False)


@command("distill-warp")
def distill_warp(
    model: CheckpointArgument,
    capture: CaptureOption = None,
    latents: LatentsOption = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Warp file to write.")] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Add the cache and warp graphs to this bundle (exported from --model)."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, max=10_000_000, help="Optimizer steps.")] = 1500,
    batch: Annotated[int, typer.Option(min=1, max=4096, help="Frame pairs per step.")] = 8,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    max_gap: Annotated[
        int, typer.Option(min=1, max=1000, help="Largest frame distance trained (>= refresh - 1).")
    ] = 4,
    refresh: Annotated[
        int, typer.Option(min=1, max=10_000, help="Cache period N in frames the runtime uses.")
    ] = 4,
    cache_blocks: Annotated[
        int | None,
        typer.Option(
            min=1, help="Texture-decoder blocks the cache keeps (default: features at T/4)."
        ),
    ] = None,
    width: Annotated[int, typer.Option(min=1, max=512, help="Warp network channels.")] = 8,
    up_stages: Annotated[
        int, typer.Option(min=0, max=12, help="Warp up-convolutions before the output conv.")
    ] = 1,
    int8: Annotated[
        bool, typer.Option("--int8", help="Quantize both graphs (the bundle must be --int8).")
    ] = False,
    seed: SeedOption = 0,
    threads: Annotated[int, typer.Option(min=0, max=1024, help="torch threads (0: default).")] = 0,
    force: ForceOption = False,
    as_json: JsonOption = False,
) -> None:
    """Train a Neural-Caching warp network against the full decoder on ordered clips: the
    capture's segments through every camera, or the clips of --latents.

    Example: avatarq distill-warp --model dam.pt --capture CAPTURE -o warp.pt --bundle dam.avq
    """
    from avatarq.models.caching import WarpConfig
    from avatarq.workflows.caching import DistillConfig, run_distill_warp

    warp_config = WarpConfig(cache_blocks=cache_blocks, width=width, up_stages=up_stages)
    config = DistillConfig(
        steps=steps, batch=batch, lr=lr, max_gap=max_gap, seed=seed, threads=threads
    )
    with progress_bar("distill-warp") as progress:
        result = run_distill_warp(
            model,
            capture,
            latents,
            out,
            bundle,
            warp_config,
            config,
            refresh,
            int8,
            force,
            progress,
        )
    r = result.report
    if as_json:
        record = {
            "warp_file": None if result.warp_file is None else str(result.warp_file),
            "bundle": None if result.bundle is None else str(result.bundle),
            "report": r.to_dict(),
            "validation": result.validation,
        }
        console.print_json(json.dumps(record))
        return
    console.print(
        f"distilled on {r.n_clips} clips ({r.n_frames} frames) in {r.seconds:.1f} s: texture "
        f"MSE {r.final_loss:.3g} (cached frame as is: {r.identity_loss:.3g}), normalized units",
        highlight=False,
    )
    if result.warp_file is not None:
        console.print(f"wrote {result.warp_file}", highlight=False)
    if result.bundle is not None:
        v = result.validation or {}
        console.print(
            f"added caching/cache.onnx and caching/warp.onnx to {result.bundle} (ONNX Runtime vs "
            f"torch: cache {v.get('cache_texture_psnr_db', float('nan')):.1f} dB, warp "
            f"{v.get('warp_texture_psnr_db', float('nan')):.1f} dB)",
            highlight=False,
        )
