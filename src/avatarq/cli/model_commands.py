"""``avatarq info`` and ``avatarq synth``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from avatarq.cli.app import ForceOption, JsonOption, command, console, progress_bar


@command()
def info(
    model: Annotated[
        Path, typer.Argument(help="A Multiface-format DAM checkpoint (.pt) or a bundle folder.")
    ],
    as_json: JsonOption = False,
) -> None:
    """What a checkpoint is (arch, sizes, parameter counts) or what a bundle holds (format and
    storage of every layer, real sizes).

    Example: avatarq info dam.pt; avatarq info dam_int8.avq
    """
    if model.is_dir():
        _info_bundle(model, as_json)
        return
    from avatarq.models.inspect import describe_checkpoint

    described = describe_checkpoint(model)
    if as_json:
        console.print_json(json.dumps(described.to_dict()))
        return
    c = described.config
    console.print(f"[bold]{model}[/bold]: {described.family}, arch [bold]{c.arch}[/bold]")
    console.print(
        f"  z {c.z_dim}, texture {c.tex_size}x{c.tex_size}, {c.n_vertices} vertices, "
        f"{c.n_cams} cameras, encoder {'yes' if c.has_encoder else 'no'}"
    )
    for name, count in described.parameters.items():
        console.print(f"  {name:<10} {count:>12,} parameters")
    console.print(
        f"  decoder as deployed: {described.deployed_parameters:,} parameters "
        f"({described.deployed_fp32_mb:.1f} MB fp32)"
    )


def _info_bundle(path: Path, as_json: bool) -> None:
    from avatarq.core.documents import document_dict
    from avatarq.export.bundle import open_bundle

    bundle = open_bundle(path)
    m = bundle.manifest
    sizes = dict(m.size_bytes)
    sizes["model.onnx"] = bundle.model_path.stat().st_size
    if as_json:
        record = {
            "bundle": str(bundle.root),
            "arch": m.arch,
            "precision": m.precision,
            "layer_precision": m.layer_precision,
            "layer_storage": {k: document_dict(v) for k, v in m.layer_storage.items()},
            "size_bytes": sizes,
            "engines": [document_dict(e) for e in m.engines],
            "codebook": None if m.codebook is None else document_dict(m.codebook),
        }
        console.print_json(json.dumps(record))
        return
    console.print(
        f"[bold]{bundle.root}[/bold]: {_family(m.arch)}, z {m.z_dim}, texture "
        f"{m.tex_size}x{m.tex_size}, {m.n_vertices} vertices; precision [bold]{m.precision}[/bold]"
    )
    size = sizes["model.onnx"]
    fp32 = sizes.get("fp32_initializers")
    ratio = f" ({fp32 / size:.2f}x smaller than the FP32 graph's weights)" if fp32 else ""
    console.print(f"  model.onnx  {size / 1e6:.3f} MB{ratio}", highlight=False)
    for role in ("layer_weights", "texel_biases", "other"):
        if role in sizes:
            console.print(f"    {role:<14} {sizes[role] / 1e6:9.3f} MB", highlight=False)
    if m.layer_storage:
        console.print(
            f"  {'layer':<46} {'format':<7} {'weights (scales)':<25} {'input':<17} {'bytes':>10}"
        )
    for name, precision in m.layer_precision.items():
        st = m.layer_storage.get(name)
        if st is None:
            console.print(f"  {name:<46} {precision}", highlight=False)
            continue
        weights = f"{st.weight} ({st.scales})"
        act = st.activation + (", rotated" if st.rotated else "")
        console.print(
            f"  {name:<46} {precision:<7} {weights:<25} {act:<17} {st.weight_bytes:>10,}",
            highlight=False,
        )
    for engine in m.engines:
        console.print(f"  engine      {engine.backend} {engine.target}: {engine.path}")
    if m.codebook is not None:
        c = m.codebook
        console.print(
            f"  codebook    {c.path}: K {c.codebook_size} x {c.stages} stage(s) x {c.groups} "
            f"group(s), {c.bits_per_frame} bits/frame",
            highlight=False,
        )


@command()
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
    training = avatar.record.training
    state = "reused cached avatar" if avatar.reused else f"trained in {training.seconds} s"
    console.print(f"capture     {avatar.capture_root}")
    console.print(
        f"checkpoint  {avatar.checkpoint}  ({state}, final loss {training.final_loss:.4f})"
    )


def _family(arch: str) -> str:
    """How a bundle's decoder is named: a Multiface DAM, a PiCA-style or a declared decoder."""
    if arch == "declared":
        return "declared decoder"
    return "PiCA-style decoder" if arch == "pica" else f"{arch} DAM decoder"
