"""``avatarq vq``: the latent-stream codebook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import (
    CaptureOption,
    ForceOption,
    JsonOption,
    LatentsOption,
    SeedOption,
    app,
    console,
    progress_bar,
    user_errors,
)


@app.command()
@user_errors
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
