"""The Neural-Caching graphs of a bundle: ``caching/cache.onnx`` and ``caching/warp.onnx``.

`attach_caching` traces the cache and warp networks (`avatarq.models.caching`) of the
decoder a bundle was exported from, checks them under ONNX Runtime against torch and adds
them to the bundle with a `CachingRecord` (manifest schema version 3). With ``int8`` both
graphs go through the calibration/Q-DQ path of model.onnx: the cache graph has the
decoder's layer names, so the bundle's own calibration (``calib/``) applies to it as is;
the warp network is calibrated (max calibration, w8a8, its mesh branch kept FP32) on
(reference, target) pairs of the given ordered clips and its graph gets Q/DQ nodes the
same way.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from avatarq.core.files import atomic_write_text, existing_file
from avatarq.core.hashing import file_sha256
from avatarq.core.inputs import DecoderInputs, smooth_clip
from avatarq.core.progress import Progress, or_silent
from avatarq.errors import AvatarqError, InternalError
from avatarq.export.bundle import MANIFEST_FILE, Bundle, open_bundle
from avatarq.export.manifest import (
    CACHING_SCHEMA_VERSION,
    CachingGraph,
    CachingRecord,
    TensorSpec,
    dam_tensor_specs,
)
from avatarq.export.onnx_export import IR_VERSION, OPSET, layer_nodes, save_onnx, traced_program
from avatarq.models.caching import CacheNetwork, WarpNetwork
from avatarq.models.deploy import DeployableDecoder, Normalization

CACHING_DIR = "caching"
CACHE_FILE = f"{CACHING_DIR}/cache.onnx"
WARP_FILE = f"{CACHING_DIR}/warp.onnx"
CACHE_INPUTS = ("z", "view")
CACHE_OUTPUTS = ("texture", "vertices", "features")
WARP_INPUTS = ("features", "texture_ref", "z_ref", "view_ref", "z", "view")
WARP_OUTPUTS = ("texture", "vertices")
# ONNX Runtime float32 against torch float32: rounding only.
FP32_MIN_PSNR_DB = 60.0
MAX_BATCH = 64


def trace_graph(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    max_batch: int = MAX_BATCH,
) -> onnx.ModelProto:
    """Trace ``module`` (float32, dynamic batch on dim 0 of every input) to ONNX."""
    batch = torch.export.Dim("batch", min=1, max=max_batch)

    program = traced_program(
        module.eval(),
        example,
        tuple({0: batch} for _ in example),
        OPSET,
        list(output_names),
        list(input_names),
    )
    model = program.model_proto
    model.ir_version = IR_VERSION
    model.producer_name = "avatarq"
    names = [i.name for i in model.graph.input], [o.name for o in model.graph.output]
    if names != (list(input_names), list(output_names)):
        raise InternalError(f"traced graph has inputs {names[0]}, outputs {names[1]}")
    for node in model.graph.node:  # no source paths of this machine in the graph
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    onnx.checker.check_model(model)
    return model


def cache_specs(cache: CacheNetwork) -> tuple[list[TensorSpec], list[TensorSpec]]:
    inputs, outputs = dam_tensor_specs(cache.config, cache.denormalized, " (reference frame r)")
    outputs.append(
        TensorSpec(
            "features",
            "float32",
            ["batch", cache.feature_channels, cache.feature_size, cache.feature_size],
            f"texture-decoder features after {cache.cache_blocks} block(s) (the cache)",
        )
    )
    return inputs, outputs


def warp_specs(cache: CacheNetwork) -> tuple[list[TensorSpec], list[TensorSpec]]:
    c = cache.config
    cache_in, cache_out = cache_specs(cache)
    inputs = [
        TensorSpec("features", "float32", cache_out[2].shape, "the cache network's features of r"),
        TensorSpec(
            "texture_ref", "float32", cache_out[0].shape, "the cache network's texture of r"
        ),
        TensorSpec("z_ref", "float32", ["batch", c.z_dim], "latent code of r"),
        TensorSpec("view_ref", "float32", ["batch", 3], "view direction of r"),
        TensorSpec("z", "float32", ["batch", c.z_dim], "latent code of the frame t to produce"),
        TensorSpec("view", "float32", ["batch", 3], "view direction of frame t"),
    ]
    outputs = [
        TensorSpec("texture", "float32", cache_out[0].shape, "texture of t (warped)"),
        TensorSpec("vertices", "float32", cache_out[1].shape, "mesh vertices of t (exact)"),
    ]
    return inputs, outputs


def _examples(cache: CacheNetwork) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    z = torch.zeros(2, cache.config.z_dim)
    view = torch.tensor([[0.0, 0.0, 1.0]] * 2)
    with torch.no_grad():
        texture, _, features = cache(z, view)
    # distinct tensors: the exporter would merge inputs that are one object
    return (z, view), (features, texture, z.clone(), view.clone(), z + 0.5, view.clone())


def consecutive_pairs(inputs: DecoderInputs) -> tuple[np.ndarray, ...]:
    """(z_ref, view_ref, z, view) of every consecutive pair of the inputs' clips."""
    pairs = inputs.pairs
    if not pairs:
        raise AvatarqError(f"{inputs.source or 'the inputs'} hold no ordered clip of 2+ frames")
    r, t = (list(x) for x in zip(*pairs, strict=True))
    return inputs.z[r], inputs.view[r], inputs.z[t], inputs.view[t]


class _PackedWarp(WarpNetwork):
    """The warp network as the calibration pipeline sees a decoder: forward(zp, view) with
    zp = [z_ref | view_ref | z] [B, 2Z + 3]; the cache runs inside, outside the module
    tree (so that only the warp network's own layers are calibrated)."""

    def __init__(self, cache: CacheNetwork, warp: WarpNetwork) -> None:
        super().__init__(cache, warp.config)
        self.load_state_dict(warp.state_dict())
        self.__dict__["_cache"] = cache
        z_dim = cache.config.z_dim

        @dataclass(frozen=True)
        class _Config:
            z_dim: int
            tex_size: int

        self.config = _Config(2 * z_dim + 3, cache.config.tex_size)  # type: ignore[assignment]

    @property
    def declaration(self):  # -> avatarq.models.declaration.DecoderDeclaration
        """Inputs z = [z_ref | view_ref | z] [2Z + 3], view [3]; outputs texture, vertices."""
        from avatarq.models.declaration import DecoderDeclaration, InputSpec

        t, v = self.tex_size, self.mesh_fc.out_features // 3
        return DecoderDeclaration(
            "warp",
            (InputSpec("z", (2 * self.z_dim + 3,)), InputSpec("view", (3,))),
            ("texture", "vertices"),
            ((3, t, t), (v, 3)),
            mesh=True,
            texture_output="texture",
            mesh_output="vertices",
        )

    def forward(self, zp: torch.Tensor, view: torch.Tensor):  # type: ignore[override]
        z_dim = self.z_dim
        z_ref, view_ref, z = zp[:, :z_dim], zp[:, z_dim : z_dim + 3], zp[:, z_dim + 3 :]
        texture_ref, _, features = self.__dict__["_cache"](z_ref, view_ref)
        return super().forward(features, texture_ref, z_ref, view_ref, z, view)


def calibrate_warp(cache: CacheNetwork, warp: WarpNetwork, inputs: DecoderInputs):
    """A w8a8 max calibration (`avatarq.calibration`) of the warp network's layers on the
    consecutive pairs of ``inputs``; the mesh branch (z_fc, mesh_fc) stays FP32."""
    from avatarq.calibration import CalibrationConfig, CalibrationSamples
    from avatarq.calibration.pipeline import calibrate

    z_ref, view_ref, z, view = consecutive_pairs(inputs)
    packed = _PackedWarp(cache, warp).eval()
    zp = np.concatenate([z_ref, view_ref, z], 1)
    samples = CalibrationSamples.of(zp, view, tuple(("", str(i), "") for i in range(len(z))))
    config = CalibrationConfig(
        method="max",
        sensitivity="none",
        bias_format="fp32",
        precision={"z_fc": "fp32", "mesh_fc": "fp32"},
    )
    return calibrate(packed, samples, config)


@dataclass(frozen=True)
class CachingResult:
    """The bundle with its caching record, and the record."""

    bundle: Bundle
    record: CachingRecord


def _psnr(ref: np.ndarray, test: np.ndarray, peak: float) -> float:
    """PSNR (dB) of ``test`` against ``ref`` with ``peak`` as the peak value."""
    from avatarq.measure.images import psnr_from_mse

    mse = float(np.mean((ref.astype(np.float64) - test.astype(np.float64)) ** 2))
    return psnr_from_mse(mse / peak**2)


def _run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from avatarq.core.ort import make_session

    return make_session(path, threads=1).run(None, feeds)


def _validate(
    cache_path: Path, warp_path: Path, cache: CacheNetwork, warp: WarpNetwork, peak: float
) -> dict[str, float]:
    """PSNR (dB) of each graph's texture against its torch network on a seeded clip, and
    the max vertex error of the warp graph against the cache's (the decoder's) vertices."""
    clip = smooth_clip(cache.config.z_dim, 6, seed=1)
    z_ref, view_ref, z, view = consecutive_pairs(clip)
    with torch.no_grad():
        t_ref, _, f_ref = cache(torch.from_numpy(z_ref), torch.from_numpy(view_ref))
        w_tex, w_vert = warp(
            f_ref, t_ref, *(torch.from_numpy(a) for a in (z_ref, view_ref, z, view))
        )
    c_tex, c_vert, c_feat = _run(cache_path, {"z": z_ref, "view": view_ref})
    feeds = dict(zip(WARP_INPUTS, (c_feat, c_tex, z_ref, view_ref, z, view), strict=True))
    o_tex, o_vert = _run(warp_path, feeds)
    return {
        "cache_texture_psnr_db": _psnr(t_ref.numpy(), c_tex, peak),
        "warp_texture_psnr_db": _psnr(w_tex.numpy(), o_tex, peak),
        "warp_vertices_max_abs_error": float(np.abs(w_vert.numpy() - o_vert).max()),
    }


def decoder_of_bundle(bundle: Bundle, checkpoint: str | Path) -> DeployableDecoder:
    """The deployable decoder ``bundle`` was exported from (same normalization, camera),
    rebuilt from ``checkpoint`` after checking it is the bundle's source (sha256)."""
    from avatarq.models.checkpoint import load_checkpoint
    from avatarq.models.config import ARCHS

    arch = bundle.manifest.arch
    if getattr(bundle.manifest, "declaration", None) is not None or arch not in ARCHS:
        raise AvatarqError(
            f"Neural-Caching needs a Multiface DAM bundle; {bundle.root} holds a {arch} decoder"
        )
    checkpoint = existing_file(checkpoint, "checkpoint")
    if file_sha256(checkpoint) != bundle.manifest.source_checkpoint_sha256:
        raise AvatarqError(
            f"--model {checkpoint} is not the checkpoint bundle {bundle.root} was exported "
            "from (its sha256 differs)"
        )
    model = load_checkpoint(checkpoint)
    normalization = None
    if bundle.manifest.normalization.folded:
        arrays = bundle.normalization_arrays()
        if arrays is None:
            raise AvatarqError(f"bundle {bundle.root} folds normalization but lists no arrays")
        normalization = Normalization(
            arrays["tex_mean"],
            float(arrays["tex_std"]),
            arrays["vert_mean"],
            float(arrays["vert_std"]),
        )
    return DeployableDecoder(model, normalization, bundle.manifest.camera)


def attach_caching(
    bundle_path: str | Path,
    cache: CacheNetwork,
    warp: WarpNetwork,
    warp_weights_sha256: str,
    distillation: dict[str, float],
    refresh_every: int = 4,
    int8: bool = False,
    calibration_inputs: DecoderInputs | None = None,
    force: bool = False,
    progress: Progress | None = None,
) -> CachingResult:
    """Trace, check and add the cache and warp graphs to the bundle at ``bundle_path``.

    ``cache`` must be the network of the bundle's decoder (`decoder_of_bundle`). With
    ``int8`` the bundle must be quantized with its calibration inside (``export --int8``);
    the warp network is calibrated on ``calibration_inputs`` (default: the seeded smooth
    clip). An existing caching record is replaced only with ``force``. The graphs are
    written into a staging folder and the manifest is rewritten last, so a failure leaves
    the bundle as it was.
    """
    say = or_silent(progress)
    bundle = open_bundle(bundle_path)
    if (
        isinstance(refresh_every, bool)
        or not isinstance(refresh_every, int)
        or not 1 <= refresh_every <= 10_000
    ):
        raise AvatarqError(f"--refresh must be an integer in 1..10000, got {refresh_every!r}")
    if bundle.manifest.caching is not None and not force:
        raise AvatarqError(
            f"bundle {bundle.root} already has Neural-Caching graphs; pass --force to replace them"
        )
    target = bundle.root / CACHING_DIR
    if target.exists() and bundle.manifest.caching is None:
        raise AvatarqError(f"{target} exists and avatarq did not write it; refusing to replace it")
    c = bundle.manifest
    if (c.z_dim, c.tex_size, c.n_vertices) != (
        cache.config.z_dim,
        cache.config.tex_size,
        cache.config.n_vertices,
    ):
        raise AvatarqError("the cache network is not the decoder of this bundle (sizes differ)")
    artifact = None
    if int8:
        if c.calib_sha256 is None:
            raise AvatarqError(
                f"--int8 needs a quantized bundle with its calibration (avatarq export --int8); "
                f"{bundle.root} is {c.precision}"
            )
        from avatarq.calibration import CalibrationArtifact

        artifact = CalibrationArtifact.load(bundle.root / "calib", cache)
    say("tracing the cache and warp graphs")
    ex_cache, ex_warp = _examples(cache)
    cache_proto = trace_graph(cache, ex_cache, CACHE_INPUTS, CACHE_OUTPUTS)
    warp_proto = trace_graph(warp, ex_warp, WARP_INPUTS, WARP_OUTPUTS)
    cache_plan = {n: "fp32" for n in sorted(layer_nodes(cache_proto))}
    warp_plan = {n: "fp32" for n in sorted(layer_nodes(warp_proto))}
    if artifact is not None:
        from avatarq.export.qdq import QDQConfig, quantize_onnx

        say("inserting Q/DQ nodes (cache: the bundle's calibration)")
        axis = c.export_options.conv_transpose_axis
        cache_proto = quantize_onnx(cache_proto, artifact, QDQConfig(axis))
        cache_plan = dict(sorted(artifact.precision.items()))
        say("calibrating the warp network (max, w8a8)")
        inputs = calibration_inputs or smooth_clip(cache.config.z_dim, 32, seed=0)
        warp_artifact = calibrate_warp(cache, warp, inputs)
        warp_proto = quantize_onnx(warp_proto, warp_artifact, QDQConfig(axis))
        warp_plan = dict(sorted(warp_artifact.precision.items()))
    stage = bundle.root / f".{CACHING_DIR}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    old = bundle.root / f".{CACHING_DIR}.old"
    try:
        stage.mkdir()
        save_onnx(cache_proto, stage / "cache.onnx")
        save_onnx(warp_proto, stage / "warp.onnx")
        peak = 255.0 if cache.denormalized else 1.0
        say("checking the graphs with ONNX Runtime")
        validation = _validate(stage / "cache.onnx", stage / "warp.onnx", cache, warp, peak)
        if (
            artifact is None
            and min(validation["cache_texture_psnr_db"], validation["warp_texture_psnr_db"])
            < FP32_MIN_PSNR_DB
        ):
            raise AvatarqError(f"the caching graphs do not match PyTorch: {validation}")
        cache_in, cache_out = cache_specs(cache)
        warp_in, warp_out = warp_specs(cache)
        record = CachingRecord(
            cache=CachingGraph(
                CACHE_FILE,
                file_sha256(stage / "cache.onnx"),
                _precision(cache_plan),
                cache_in,
                cache_out,
                cache_plan,
            ),
            warp=CachingGraph(
                WARP_FILE,
                file_sha256(stage / "warp.onnx"),
                _precision(warp_plan),
                warp_in,
                warp_out,
                warp_plan,
            ),
            cache_blocks=cache.cache_blocks,
            feature_shape=[cache.feature_channels, cache.feature_size, cache.feature_size],
            refresh_every=refresh_every,
            warp_config=warp.config.to_dict(),
            warp_weights_sha256=warp_weights_sha256,
            distillation={k: float(v) for k, v in distillation.items()},
            validation=validation,
        )
        manifest = bundle.manifest
        manifest.caching = record
        manifest.schema_version = CACHING_SCHEMA_VERSION
        from avatarq.core.documents import dump_document

        text = dump_document(manifest)
        if target.exists():
            target.rename(old)
        stage.rename(target)
        try:
            atomic_write_text(bundle.root / MANIFEST_FILE, text)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            if old.exists():
                old.rename(target)
            raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return CachingResult(open_bundle(bundle.root), record)


def _precision(plan: dict[str, str]) -> str:
    formats = set(plan.values())
    return formats.pop() if len(formats) == 1 else "mixed"
