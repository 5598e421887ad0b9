"""``avatarq distill-warp``: the Neural-Caching low-latency mode."""

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
    app,
    console,
    progress_bar,
    user_errors,
)


@app.command("distill-warp")
@user_errors
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
