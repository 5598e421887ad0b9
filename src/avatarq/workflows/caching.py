"""`avatarq distill-warp`: train a Neural-Caching warp network against the full decoder.

The teacher is the deployable decoder itself (`avatarq.models.caching.CacheNetwork`); the
student (`WarpNetwork`) sees the cache of a reference frame r and the (z, view) of a later
frame t of the same ordered clip, 1 <= t - r <= ``max_gap`` (the refresh interval it is
trained for; 1 is the two-runner alternation), and learns the full decoder's texture of
frame t. Clips are the capture's segments seen through each of its cameras (z = encoder
mean), or the clips of a latent file. Pairs are also drawn at fractional positions between
consecutive frames (z and view interpolated linearly), which the teacher decodes as
readily as recorded ones.

The result is a warp file (``warp.pt``): a torch file of plain tensors and dicts (read
with ``weights_only=True``) holding the warp config, the trainable weights, the DAM config
and the sha256 of the checkpoint it was distilled from.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avatarq.core.files import atomic_path, check_parent, existing_file
from avatarq.core.hashing import file_sha256
from avatarq.core.inputs import DecoderInputs
from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError
from avatarq.models.caching import CacheNetwork, WarpConfig, WarpNetwork, warp_parameters
from avatarq.models.deploy import DeployableDecoder

WARP_FILE_FORMAT = "avatarq-warp"
WARP_FILE_VERSION = 1


@dataclass(frozen=True)
class DistillConfig:
    """Distillation settings.

    Attributes:
        steps: optimizer steps; batch: (reference, target) pairs per step.
        lr: Adam learning rate, cosine-decayed to lr / 20.
        max_gap: the largest frame distance t - r trained (the refresh interval N).
        seed: pair sampling and initialization.
        threads: torch CPU threads (0 = torch's default).
    """

    steps: int = 1500
    batch: int = 8
    lr: float = 2e-3
    max_gap: int = 4
    seed: int = 0
    threads: int = 0
    version: int = 1

    def __post_init__(self) -> None:
        if self.version != 1:
            raise AvatarqError(f"distill config version must be 1, got {self.version!r}")
        for name, low, high in (
            ("steps", 1, 10_000_000),
            ("batch", 1, 4096),
            ("max_gap", 1, 1000),
            ("seed", 0, 2**32 - 1),
            ("threads", 0, 1024),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise AvatarqError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        lr = self.lr
        if (
            isinstance(lr, bool)
            or not isinstance(lr, int | float)
            or not math.isfinite(lr)
            or lr <= 0
        ):
            raise AvatarqError(f"lr must be a positive finite number, got {lr!r}")


@dataclass(frozen=True)
class DistillReport:
    """What the distillation did: per-step loss (mean squared error of the normalized
    texture), the loss of the cached frame itself (warp = identity) on the same final
    batches, pair and clip counts, seconds."""

    losses: list[float]
    identity_loss: float
    final_loss: float
    n_clips: int
    n_frames: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        tail = max(1, len(self.losses) // 10)
        d["losses"] = [
            round(float(np.mean(self.losses[i : i + tail])), 6)
            for i in range(0, len(self.losses), tail)
        ]
        return d


def _clip_arrays(inputs: DecoderInputs) -> list[tuple[np.ndarray, np.ndarray]]:
    """(z [L, Z], view [L, 3]) per ordered clip."""
    if not inputs.clips:
        raise AvatarqError(
            f"the distillation data ({inputs.source or 'latents'}) has no ordered clips; a "
            "warp network learns from consecutive frames"
        )
    return [(inputs.z[list(c)], inputs.view[list(c)]) for c in inputs.clips]


def capture_clips(model, capture_root: str | Path) -> DecoderInputs:
    """Every segment of the capture through every camera: z = encoder mean per frame,
    view = that camera's view direction; one clip per (segment, camera)."""
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import encode_frames

    capture = MultifaceCapture(capture_root)
    zs, views, ids, clips = [], [], [], []
    cameras = list(capture.cameras)
    for segment, frames in capture.clips():
        if len(frames) < 2:
            continue
        z = encode_frames(model, capture, [(segment, f) for f in frames]).numpy()
        for cam in cameras:
            start = sum(len(a) for a in zs)
            zs.append(z)
            views.append(np.stack([capture.view_direction(segment, f, cam) for f in frames]))
            ids += [(segment, f, cam) for f in frames]
            clips.append(tuple(range(start, start + len(frames))))
    if not clips:
        raise AvatarqError(f"capture {capture.root} has no segment with 2 or more frames")
    return DecoderInputs.from_z_view(
        np.concatenate(zs),
        np.concatenate(views),
        ids=tuple(ids),
        clips=tuple(clips),
        source=f"capture {capture.root.name} ({len(clips)} clips, encoder mean)",
    )


def _sample_pairs(
    clips: list[tuple[np.ndarray, np.ndarray]], n: int, max_gap: int, rng: np.random.Generator
) -> tuple[torch.Tensor, ...]:
    """(z_ref, view_ref, z, view) [n, ...]: a reference position s in a clip and a target
    at s + gap, gap uniform in (0, max_gap], positions fractional (linear interpolation)."""
    out: list[list[np.ndarray]] = [[], [], [], []]
    for _ in range(n):
        z, view = clips[rng.integers(len(clips))]
        last = len(z) - 1
        gap = (
            rng.uniform(0.0, min(max_gap, last))
            if rng.random() < 0.5
            else rng.integers(1, min(max_gap, last) + 1)
        )
        gap = max(float(gap), 1e-3)
        s = rng.uniform(0.0, last - gap)
        for k, pos in ((0, s), (2, s + gap)):
            i = min(int(math.floor(pos)), last - 1)
            w = pos - i
            zi = (1 - w) * z[i] + w * z[i + 1]
            vi = (1 - w) * view[i] + w * view[i + 1]
            out[k].append(zi)
            out[k + 1].append(vi / np.linalg.norm(vi))
    return tuple(torch.from_numpy(np.stack(a).astype(np.float32)) for a in out)


def distill_warp(
    decoder: DeployableDecoder,
    inputs: DecoderInputs,
    warp_config: WarpConfig = WarpConfig(),
    config: DistillConfig = DistillConfig(),
    progress: Progress | None = None,
) -> tuple[WarpNetwork, DistillReport]:
    """Train a warp network for ``decoder`` on the ordered clips of ``inputs``.

    The loss is the mean squared error of the texture in normalized units ((texture -
    offset) / gain of the decoder), the units the decoder was trained in.
    """
    say = or_silent(progress)
    inputs.check_array("z", (decoder.config.z_dim,), "the decoder")
    clips = _clip_arrays(inputs)
    cache = CacheNetwork(decoder, warp_config.resolved_blocks(decoder.config.n_tex_blocks))
    for p in cache.parameters():
        p.requires_grad_(False)
    previous_threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        warp = WarpNetwork(cache, warp_config)
        rng = np.random.default_rng(config.seed)
        params = warp_parameters(warp)
        opt = torch.optim.Adam(params, lr=config.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps, config.lr / 20)
        losses: list[float] = []
        identity: list[float] = []
        start = time.perf_counter()
        tail = max(1, config.steps // 10)
        for step in range(config.steps):
            z_ref, view_ref, z, view = _sample_pairs(clips, config.batch, config.max_gap, rng)
            with torch.no_grad():
                tex_ref, _, features = cache(z_ref, view_ref)
                target, _, _ = cache(z, view)
            pred, _ = warp(features, tex_ref, z_ref, view_ref, z, view)
            loss = torch.mean(((pred - target) / warp.tex_gain) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if step >= config.steps - tail:
                identity.append(float(torch.mean(((tex_ref - target) / warp.tex_gain) ** 2)))
            if step % 50 == 0 or step == config.steps - 1:
                say("distilling the warp network", step + 1, config.steps)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(previous_threads)
    warp.eval()
    report = DistillReport(
        losses=losses,
        identity_loss=float(np.mean(identity)),
        final_loss=float(np.mean(losses[-tail:])),
        n_clips=len(clips),
        n_frames=len(inputs),
        seconds=seconds,
    )
    return warp, report


# --------------------------------------------------------------------------- warp files


@dataclass(frozen=True)
class WarpFile:
    """A loaded warp file: the config, trainable weights, the DAM config and the sha256
    of the checkpoint the warp network was distilled from, and the distillation report."""

    warp_config: WarpConfig
    state_dict: dict[str, torch.Tensor]
    dam_config: dict[str, Any]
    checkpoint_sha256: str
    report: dict[str, Any]

    def build(self, decoder: DeployableDecoder) -> tuple[CacheNetwork, WarpNetwork]:
        """The cache and warp networks of ``decoder`` with these weights."""
        if asdict(decoder.config) != self.dam_config:
            raise AvatarqError(
                "the warp file was distilled for another decoder (DAM config "
                f"{self.dam_config}, this one {asdict(decoder.config)})"
            )
        cache = CacheNetwork(decoder, self.warp_config.resolved_blocks(decoder.config.n_tex_blocks))
        warp = WarpNetwork(cache, self.warp_config)
        trainable = {n for n, p in warp.named_parameters() if p.requires_grad}
        if set(self.state_dict) != trainable:
            raise AvatarqError(
                f"the warp file's weights are {sorted(self.state_dict)}, the network needs "
                f"{sorted(trainable)}"
            )
        try:
            warp.load_state_dict(self.state_dict, strict=False)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[-1].strip()
            raise AvatarqError(
                f"the warp file's weights do not fit the network ({first})"
            ) from None
        return cache, warp.eval()


def save_warp_file(
    warp: WarpNetwork,
    dam_config: Any,
    checkpoint: str | Path,
    report: DistillReport,
    out: str | Path,
) -> Path:
    """Write ``out`` atomically (never over a file that is not a warp file)."""
    out = Path(out)
    if out.is_dir():
        raise AvatarqError(f"-o {out} is a directory; expected a warp file path such as warp.pt")
    if out.exists() and not _is_warp_file(out):
        raise AvatarqError(f"{out} exists and is not an avatarq warp file; refusing to replace it")
    check_parent(out)
    state = {n: p.detach().clone() for n, p in warp.named_parameters() if p.requires_grad}
    payload = {
        "format": WARP_FILE_FORMAT,
        "version": WARP_FILE_VERSION,
        "warp_config": warp.config.to_dict(),
        "dam_config": asdict(dam_config),
        "checkpoint_sha256": file_sha256(checkpoint),
        "state_dict": state,
        "report": report.to_dict(),
    }
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return out


def _is_warp_file(path: Path) -> bool:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False
    return isinstance(data, dict) and data.get("format") == WARP_FILE_FORMAT


def load_warp_file(path: str | Path) -> WarpFile:
    """Read and check a warp file; a bad one is one AvatarqError line."""
    path = Path(path)
    if not path.is_file():
        raise AvatarqError(f"warp file not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file
        raise AvatarqError(f"{path} is not a readable warp file ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != WARP_FILE_FORMAT:
        raise AvatarqError(f"{path} is not an avatarq warp file (avatarq distill-warp writes them)")
    if data.get("version") != WARP_FILE_VERSION:
        raise AvatarqError(
            f"{path}: warp file version {data.get('version')!r}; this avatarq reads "
            f"{WARP_FILE_VERSION}"
        )
    state = data.get("state_dict")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise AvatarqError(f"{path}: state_dict must map names to tensors")
    for name, value in state.items():
        if not torch.isfinite(value).all():
            raise AvatarqError(f"{path}: weight {name} holds NaN or infinite values")
    warp_config = data.get("warp_config")
    if not isinstance(warp_config, dict):
        raise AvatarqError(f"{path}: warp_config must be a mapping")
    sha = data.get("checkpoint_sha256")
    if not isinstance(sha, str) or len(sha) != 64:
        raise AvatarqError(f"{path}: checkpoint_sha256 must be a sha256 hex digest")
    return WarpFile(
        WarpConfig.from_dict(warp_config),
        state,
        dict(data.get("dam_config") or {}),
        sha,
        dict(data.get("report") or {}),
    )


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class DistillResult:
    """What `run_distill_warp` wrote: the warp file (or None), the bundle (or None), the
    report, and the caching record's validation when a bundle was given."""

    warp_file: Path | None
    bundle: Path | None
    report: DistillReport
    validation: dict[str, float] | None


def run_distill_warp(
    checkpoint: str | Path,
    capture: str | Path | None = None,
    latents: str | Path | None = None,
    out: str | Path | None = None,
    bundle: str | Path | None = None,
    warp_config: WarpConfig = WarpConfig(),
    config: DistillConfig = DistillConfig(),
    refresh_every: int = 4,
    int8: bool = False,
    force: bool = False,
    progress: Progress | None = None,
) -> DistillResult:
    """`avatarq distill-warp`: every input is checked before the distillation starts.

    Data: the capture's segments through each camera (needs the checkpoint's encoder) or
    the ordered clips of a latent file. Output: the warp file ``out``, and/or the caching
    graphs added to ``bundle`` (exported from ``checkpoint``) with ``refresh_every``; with
    ``int8`` both graphs are quantized (the bundle must be ``export --int8``).
    """
    say = or_silent(progress)
    if (capture is None) == (latents is None):
        raise AvatarqError("give the distillation data as exactly one of --capture or --latents")
    if out is None and bundle is None:
        raise AvatarqError("nothing to write: give -o warp.pt, --bundle BUNDLE, or both")
    if (
        isinstance(refresh_every, bool)
        or not isinstance(refresh_every, int)
        or not 1 <= refresh_every <= 10_000
    ):
        raise AvatarqError(f"--refresh must be an integer in 1..10000, got {refresh_every!r}")
    if refresh_every - 1 > config.max_gap:
        raise AvatarqError(
            f"--refresh {refresh_every} warps up to {refresh_every - 1} frames ahead but "
            f"--max-gap is {config.max_gap}; raise --max-gap to at least {refresh_every - 1}"
        )
    if int8 and bundle is None:
        raise AvatarqError("--int8 quantizes the bundle's caching graphs; give --bundle")
    checkpoint = existing_file(checkpoint, "checkpoint")
    if out is not None:
        out = Path(out)
        if out.is_dir():
            raise AvatarqError(
                f"-o {out} is a directory; expected a warp file path such as warp.pt"
            )
        if out.exists() and not _is_warp_file(out):
            raise AvatarqError(
                f"{out} exists and is not an avatarq warp file; refusing to replace it"
            )
        if out.exists() and not force:
            raise AvatarqError(f"{out} exists; pass --force to replace it")
        check_parent(out)
    from avatarq.models.checkpoint import load_checkpoint

    opened = None
    if bundle is not None:
        from avatarq.export.bundle import open_bundle_to_extend
        from avatarq.export.caching import decoder_of_bundle

        opened = open_bundle_to_extend(bundle, "caching", "Neural-Caching graphs", force)
        if int8 and opened.manifest.calib_sha256 is None:
            raise AvatarqError(
                f"--int8 needs a quantized bundle with its calibration (avatarq export --int8); "
                f"{opened.root} is {opened.manifest.precision}"
            )
        decoder = decoder_of_bundle(opened, checkpoint)
        model = load_checkpoint(checkpoint)
    else:
        model = load_checkpoint(checkpoint)
        decoder = DeployableDecoder(model)
    warp_config.resolved_blocks(decoder.config.n_tex_blocks)
    if capture is not None:
        if not model.config.has_encoder:
            raise AvatarqError(
                f"{checkpoint} has no encoder (enc.*) to encode the capture; pass --latents"
            )
        say("encoding the capture's clips")
        inputs = capture_clips(model, capture)
    else:
        from avatarq.data.latents import load_inputs

        inputs = load_inputs(latents)
    inputs.check_array("z", (decoder.config.z_dim,), "the decoder")
    _clip_arrays(inputs)
    warp, report = distill_warp(decoder, inputs, warp_config, config, progress)
    validation = None
    if opened is not None:
        from avatarq.export.caching import attach_caching

        cache = CacheNetwork(decoder, warp_config.resolved_blocks(decoder.config.n_tex_blocks))
        summary = {
            "final_loss": report.final_loss,
            "identity_loss": report.identity_loss,
            "steps": float(config.steps),
            "max_gap": float(config.max_gap),
        }
        result = attach_caching(
            opened.root,
            cache,
            warp,
            weights_sha256(warp),
            summary,
            refresh_every,
            int8,
            inputs,
            force,
            progress,
        )
        validation = dict(result.record.validation)
    warp_path = None
    if out is not None:
        warp_path = save_warp_file(warp, decoder.config, checkpoint, report, out)
    return DistillResult(warp_path, None if opened is None else opened.root, report, validation)


def weights_sha256(warp: WarpNetwork) -> str:
    """sha256 of the warp network's trainable weights (when no warp file is written)."""
    import hashlib

    from avatarq.core.hashing import update_with_array

    digest = hashlib.sha256()
    for name, p in sorted(warp.named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            update_with_array(digest, p.detach().numpy())
    return digest.hexdigest()
