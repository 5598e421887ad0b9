"""``avatarq info`` and ``avatarq synth``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import ForceOption, JsonOption, app, console, progress_bar, user_errors


@app.command()
@user_errors
def info(
    model: Annotated[Path, typer.Argument(help="A Multiface-format DAM checkpoint (.pt).")],
    as_json: JsonOption = False,
) -> None:
    """What a checkpoint is: arch, sizes and parameter counts.

    Example: avatarq info dam.pt
    """
    from avatarq.models.inspect import describe_checkpoint

    described = describe_checkpoint(model)
    if as_json:
        console.print_json(json.dumps(described))
        return
    c = described["config"]
    console.print(f"[bold]{model}[/bold]: Multiface DAM, arch [bold]{c['arch']}[/bold]")
    console.print(
        f"  z {c['z_dim']}, texture {c['tex_size']}x{c['tex_size']}, {c['n_vertices']} vertices, "
        f"{c['n_cams']} cameras, encoder {'yes' if c['has_encoder'] else 'no'}"
    )
    for name, count in described["parameters"].items():
        console.print(f"  {name:<10} {count:>12,} parameters")
    console.print(
        f"  decoder as deployed: {described['deployed_parameters']:,} parameters "
        f"({described['deployed_fp32_mb']:.1f} MB fp32)"
    )


@app.command()
@user_errors
def synth(
    out: Annotated[Path, typer.Argument(help="Output directory (capture/ and dam.pt).")],
    texture_size: Annotated[int, typer.Option(help="Capture texture size.")] = 1024,
    model_texture_size: Annotated[int, typer.Option(help="Texture size of the trained DAM.")] = 256,
    z_dim: Annotated[int, typer.Option(help="Latent size of the trained DAM.")] = 64,
    arch: Annotated[str, typer.Option(help="DAM variant to train.")] = "base",
    iters: Annotated[int, typer.Option(help="Training steps.")] = 400,
    seed: Annotated[int, typer.Option(help="Seed of capture and training.")] = 0,
    force: ForceOption = False,
) -> None:
    """Make the embedded synthetic avatar: a Multiface-layout capture and a DAM trained on it.

    The capture root is printed; it lies in OUT/capture/ (one identity folder).

    Example: avatarq synth out/synth
    """
    from avatarq.data.synthetic import make_synthetic_avatar
    from avatarq.data.synthetic_capture import SyntheticCaptureConfig
    from avatarq.data.train import TrainConfig

    capture_config = SyntheticCaptureConfig(seed=seed, texture_size=texture_size)
    train_config = TrainConfig(
        arch=arch, z_dim=z_dim, tex_size=model_texture_size, iters=iters, seed=seed
    )
    with progress_bar("synthetic avatar") as progress:
        avatar = make_synthetic_avatar(out, capture_config, train_config, force, progress)
    training = avatar.record["training"]
    state = "reused cached avatar" if avatar.reused else f"trained in {training['seconds']} s"
    console.print(f"capture     {avatar.capture_root}")
    console.print(
        f"checkpoint  {avatar.checkpoint}  ({state}, final loss {training['final_loss']:.4f})"
    )
