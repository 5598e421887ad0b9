"""The bundle's manifest.json and the records in it, as typed documents.

Every type here is a dataclass validated by `avatarq.core.documents` (strict JSON, no
unknown keys); `docs/schemas/manifest.schema.json` is generated from `Manifest`. Paths in
a manifest are relative to the bundle and are checked to stay inside it when the bundle
is opened (`avatarq.export.bundle.open_bundle`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field

from avatarq.core.documents import DOCUMENT_CONFIG, JsonFloat
from avatarq.core.engine_profile import EngineProfile
from avatarq.core.engine_profile import positive_int as _positive_int
from avatarq.errors import AvatarqError
from avatarq.export.options import ExportOptions

SCHEMA_VERSION = 2
#: A manifest with a Neural-Caching record (`CachingRecord`) is version 3, so that an
#: avatarq that cannot run it says so instead of ignoring it; both versions load.
CACHING_SCHEMA_VERSION = 3
READABLE_SCHEMA_VERSIONS = (SCHEMA_VERSION, CACHING_SCHEMA_VERSION)
BUILD_OPTIONS_VERSION = 1
DTYPES = ("float32", "float16")
# a bundle's precision: fp32, fp16, mixed, "int8" (bundles written before formats), or one
# quantized format of `avatarq.calibration.formats` (w8a8, w4a8, fp8, ...)
PRECISIONS = ("fp32", "fp16", "int8", "mixed")


def _check_precision(value: str) -> None:
    if value in PRECISIONS:
        return
    from avatarq.calibration.formats import parse_format

    parse_format(value, "manifest precision")


@dataclass
class TensorSpec:
    """One graph input or output.

    Attributes:
        name: the graph's tensor name.
        dtype: ``float32`` or ``float16``.
        shape: dimensions; the string ``"batch"`` marks the dynamic batch dimension.
        meaning: what the tensor holds, with units.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    name: str
    dtype: str
    shape: list[int | str]
    meaning: str

    def __post_init__(self) -> None:
        if not self.name:
            raise AvatarqError("a tensor spec needs a name")
        if self.dtype not in DTYPES:
            raise AvatarqError(
                f"tensor {self.name}: dtype must be one of {DTYPES}, got {self.dtype!r}"
            )
        for d in self.shape:
            if isinstance(d, str) and d != "batch" or isinstance(d, int) and d < 1:
                raise AvatarqError(
                    f"tensor {self.name}: dimensions are positive integers or 'batch', got {d!r}"
                )


@dataclass
class NormalizationRecord:
    """How the outputs relate to Multiface's normalization.

    Attributes:
        folded: texture = t * tex_std + tex_mean (0..255) and vertices = v * vert_std +
            vert_mean are computed inside the graph.
        note: one line for people.
        tex_std, vert_std: the scalars, when known.
        arrays: bundle file holding tex_mean float32 [3, T, T], tex_std, vert_mean float32
            [V * 3], vert_std (`normalization.npz`), whenever they are known (folded or not).
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    folded: bool
    note: str
    tex_std: float | None = None
    vert_std: float | None = None
    arrays: str | None = None


@dataclass
class ValidationRecord:
    """A comparison of the bundle's graph with a reference (`avatarq.measure.compare`).

    Texture errors are in the texture's own units; ``texture_psnr_db`` is the PSNR of the
    error over all inputs together with ``peak`` as the peak.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    reference: str
    inputs: str
    n_samples: int
    peak: float
    texture_max_abs_error: JsonFloat
    texture_mean_abs_error: JsonFloat
    texture_psnr_db: JsonFloat
    texture_psnr_min_db: JsonFloat
    vertices_max_abs_error: JsonFloat
    tolerances: dict[str, float]
    passed: bool
    vs_fp32: ValidationRecord | None = None


@dataclass
class LayerStorage:
    """What the graph stores for one quantizable layer (read from model.onnx itself).

    Attributes:
        weight: element type of the stored weight: "int4" (packed two per byte), "int8",
            "float8e4m3fn", "float16" or "float32".
        scales: "per-channel", "per-tensor", "blocks of B" or "none" (float weights).
        activation: the quantizer on the layer's input: "int8", "uint8", "int4 (in int8)"
            (a clipped grid inside the 8-bit container), "float8e4m3fn"; or "float16" /
            "float32" without one.
        rotated: the input is rotated (Hadamard) before its quantizer.
        weight_bytes: bytes of the weight, its scales and zero points, bias and rotation.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    weight: str
    scales: str
    activation: str
    rotated: bool
    weight_bytes: int


@dataclass
class ReferenceRecord:
    """The FP32 graph a quantized or FP16 bundle is judged against (``reference/model.onnx``),
    so bench, compare and the runtime need nothing outside the bundle."""

    __pydantic_config__ = DOCUMENT_CONFIG

    path: str
    sha256: str


def dam_tensor_specs(
    config: Any, denormalized: bool, of: str = ""
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs (z, view) and outputs (texture, vertices) of a DAM decoder's graph.

    Args:
        config: the `DAMConfig` (z_dim, tex_size, n_vertices).
        denormalized: outputs in texel / capture units (else Multiface-normalized).
        of: appended to every description (e.g. " (reference frame r)").
    """
    units = "0..255 texel units" if denormalized else "Multiface-normalized units"
    mesh_units = " (capture units)" if denormalized else " (normalized)"
    inputs = [
        TensorSpec("z", "float32", ["batch", config.z_dim], f"latent code (encoder mean){of}"),
        TensorSpec("view", "float32", ["batch", 3], f"unit view direction, head coordinates{of}"),
    ]
    size = config.tex_size
    outputs = [
        TensorSpec(
            "texture",
            "float32",
            ["batch", 3, size, size],
            f"RGB texture, {units}, row 0 = uv v 0 (flipped-on-load orientation){of}",
        ),
        TensorSpec(
            "vertices",
            "float32",
            ["batch", config.n_vertices, 3],
            f"head-local mesh vertices{mesh_units}{of}",
        ),
    ]
    return inputs, outputs


@dataclass(frozen=True)
class BuildOptions(EngineProfile):
    """How an engine is built (recorded in the manifest, so a build can be repeated): the
    `EngineProfile` and

    Attributes:
        calibration_latents: ONNX Runtime: a latent file whose steps are the inputs of the
            build's check of the engine against model.onnx (None: the bundle's smooth
            clip). The rewrite itself uses only the graph's own scales.
        version: schema version.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    calibration_latents: str | None = None
    version: int = BUILD_OPTIONS_VERSION

    def __post_init__(self) -> None:
        if self.calibration_latents is not None:
            object.__setattr__(self, "calibration_latents", str(self.calibration_latents))
        if self.version != BUILD_OPTIONS_VERSION:
            raise AvatarqError(
                f"build options version {self.version!r} is not supported (expected "
                f"{BUILD_OPTIONS_VERSION})"
            )
        super().__post_init__()


@dataclass
class LayerRewriteRecord:
    """What the ONNX Runtime build did to one layer of the graph
    (`avatarq.export.ort_rewrite.LayerRewrite`): ``mode`` int8 (integer kernel), float or
    kept, the reason, the operator ``op`` of the graph and the ``kernel`` that now does its
    multiply-adds. ``output_scale`` is no longer written (kept so older records load)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    node: str
    mode: str
    reason: str = ""
    op: str = ""
    kernel: str = ""
    output_scale: float | None = None


@dataclass
class OrtRewriteRecord:
    """The ONNX Runtime graph rewrite: its options (JSON) and what became of each layer.
    ``folded_weight_dq`` is no longer written (kept so older records load)."""

    __pydantic_config__ = DOCUMENT_CONFIG

    config: str
    layers: list[LayerRewriteRecord]
    folded_weight_dq: int = 0


@dataclass
class _EngineFile:
    """What every engine record holds: the file (bundle path, sha256, size), the library
    and target it was built with and for, the build time and options."""

    __pydantic_config__ = DOCUMENT_CONFIG

    path: str
    library_version: str
    target: str
    sha256: str
    size_bytes: int
    build_seconds: float
    options: BuildOptions


@dataclass
class OnnxRuntimeEngineRecord(_EngineFile):
    """An ONNX Runtime engine: the graph ONNX Runtime runs (``engines/onnxruntime-cpu.onnx``),
    its check, and what the rewrite did to each layer.

    ``check`` compares it with the exact evaluation of model.onnx (the build's gate);
    ``float_evaluation`` with ONNX Runtime's plain float evaluation of model.onnx (reported,
    not judged); ``optimized_ops`` counts the operators of the graph ONNX Runtime runs
    after its optimizations (contrib operators as ``com.microsoft.<op>``).
    """

    check: ValidationRecord = None  # type: ignore[assignment]  # always set by the builder
    rewrite: OrtRewriteRecord | None = None
    float_evaluation: ValidationRecord | None = None
    optimized_ops: dict[str, int] = field(default_factory=dict)
    backend: Literal["onnxruntime"] = "onnxruntime"

    def __post_init__(self) -> None:
        if self.check is None:
            raise AvatarqError("an onnxruntime engine record needs its check")


@dataclass
class TensorRTEngineRecord(_EngineFile):
    """A serialized TensorRT or TensorRT-RTX engine and the files built beside it.

    Attributes:
        io: tensor name -> {"mode": input|output, "dtype", "shape" (-1 dynamic)} as the
            network declared it.
        timing_cache, layers, inspector: bundle paths of the timing cache, the layer list
            (precision per layer, known before any GPU sees the engine) and the engine
            inspector's JSON (only when built on a GPU), or None.
    """

    backend: Literal["tensorrt", "tensorrt-rtx"] = "tensorrt"
    io: dict[str, dict[str, str | list[int]]] = field(default_factory=dict)
    strongly_typed: bool = True
    timing_cache: str | None = None
    layers: str | None = None
    inspector: str | None = None


@dataclass
class CachingGraph:
    """One graph of the Neural-Caching mode (`avatarq.models.caching`).

    Attributes:
        path: bundle path of the ONNX graph.
        sha256: of that file (checked before it runs).
        precision: ``fp32`` or the one format of its quantized layers (``w8a8``) or ``mixed``.
        inputs, outputs: the graph's I/O.
        layer_precision: module name -> format of each quantizable layer.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    path: str
    sha256: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    layer_precision: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_precision(self.precision)
        if len(self.sha256) != 64:
            raise AvatarqError(f"caching graph {self.path}: sha256 must be a sha256 hex digest")


@dataclass
class CachingRecord:
    """The Neural-Caching low-latency mode of a bundle (docs/bundle.md).

    ``cache`` (z, view) -> (texture, vertices, features) is the full decoder emitting the
    features after ``cache_blocks`` texture-decoder blocks, ``feature_shape`` [C, h, w];
    ``warp`` (features, texture_ref, z_ref, view_ref, z, view) -> (texture, vertices)
    produces a later frame from that cache. The runtime refreshes the cache every
    ``refresh_every`` frames. ``warp_config`` is the warp network's shape
    (`avatarq.models.caching.WarpConfig`), ``warp_weights_sha256`` the sha256 of its
    trained weights (`avatarq.workflows.caching.weights_sha256`), ``distillation`` the
    distillation's summary losses (normalized texture MSE) and ``validation`` the graphs'
    PSNR (dB) against the torch networks at export.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    cache: CachingGraph
    warp: CachingGraph
    cache_blocks: int
    feature_shape: list[int]
    refresh_every: int
    warp_config: dict[str, int | None]
    warp_weights_sha256: str
    distillation: dict[str, float]
    validation: dict[str, JsonFloat] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _positive_int("cache_blocks", self.cache_blocks)
        _positive_int("refresh_every", self.refresh_every)
        if len(self.feature_shape) != 3:
            raise AvatarqError(f"feature_shape must be [C, h, w], got {self.feature_shape}")
        for d in self.feature_shape:
            _positive_int("feature_shape entries", d)


@dataclass
class CodebookRecord:
    """The latent-stream codebook of the bundle (`avatarq.codec.Codebook`), trained by
    ``avatarq vq``: the file (bundle path, sha256, checked before it is read) and its shape.

    Attributes:
        path: bundle path of the .npz (``codebook/codebook.npz``).
        sha256: of that file.
        codebook_size, stages, groups: K, S and G; z_dim = G * dims per group.
        bits_per_frame: G * S * ceil(log2 K).
        frames: training latents; source: where they came from.
        train_mse: mean squared error of z per dimension on them after each stage.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    path: str
    sha256: str
    codebook_size: int
    stages: int
    groups: int
    bits_per_frame: int
    frames: int
    source: str
    train_mse: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for name in ("codebook_size", "stages", "groups", "bits_per_frame", "frames"):
            _positive_int(f"codebook {name}", getattr(self, name))
        if len(self.sha256) != 64:
            raise AvatarqError("codebook sha256 must be a sha256 hex digest")


EngineRecord = Annotated[
    OnnxRuntimeEngineRecord | TensorRTEngineRecord, Field(discriminator="backend")
]


def engine_files(record: OnnxRuntimeEngineRecord | TensorRTEngineRecord) -> list[str]:
    """Every bundle path a record names (the engine first)."""
    paths = [record.path]
    if isinstance(record, TensorRTEngineRecord):
        paths += [p for p in (record.timing_cache, record.layers, record.inspector) if p]
    return paths


@dataclass
class Manifest:
    """What a runtime in any language needs to know about a bundle (docs/bundle.md).

    Attributes:
        arch, z_dim, tex_size, n_vertices: the decoder (a declared decoder: ``declared``,
            z's size or the first input's element count, the texture's height, the mesh
            output's vertices or 0).
        inputs, outputs: the graph's I/O.
        precision: ``fp32``, ``fp16``, the one format of a quantized graph (``w8a8``,
            ``w4a8``, ``fp8``, ...; ``int8`` in bundles written before formats) or ``mixed``.
        layer_precision: module name -> format of each quantizable layer.
        layer_storage: module name -> what model.onnx stores for it (`LayerStorage`).
        size_bytes: bytes by role: "model.onnx" (the file), "initializers" (their stored
            bytes) = "layer_weights" + "texel_biases" + "other", and "fp32_initializers"
            (the FP32 graph's, for the compression ratio).
        normalization: folded or not, and where the arrays are.
        model_sha256: sha256 of model.onnx (checked before an engine is built from it).
        reference: the FP32 graph a non-FP32 bundle is judged against, or None.
        source_checkpoint_sha256: the checkpoint file the graph was made from.
        versions: avatarq, torch, onnx, onnxruntime at export.
        calib_sha256: sha256 of calib/calib.json for quantized bundles.
        camera: the camera whose colour correction is folded in, or None.
        validation: the export's check of the graph, or None (``--no-validate``).
        export_options: the options the bundle was exported with.
        engines: one record per built engine.
        codebook: the latent-stream codebook (``avatarq vq --bundle``), or None.
        caching: the Neural-Caching graphs (schema version 3), or None.
    """

    __pydantic_config__ = DOCUMENT_CONFIG

    arch: str
    z_dim: int
    tex_size: int
    n_vertices: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str
    layer_precision: dict[str, str]
    normalization: NormalizationRecord
    model_sha256: str
    source_checkpoint_sha256: str
    versions: dict[str, str]
    export_options: ExportOptions
    reference: ReferenceRecord | None = None
    calib_sha256: str | None = None
    camera: int | None = None
    validation: ValidationRecord | None = None
    engines: list[EngineRecord] = field(default_factory=list)
    layer_storage: dict[str, LayerStorage] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    declaration: dict[str, Any] | None = None
    codebook: CodebookRecord | None = None
    caching: CachingRecord | None = None
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version not in READABLE_SCHEMA_VERSIONS:
            raise AvatarqError(
                f"schema_version is {self.schema_version!r}; this avatarq reads "
                f"{' or '.join(map(str, READABLE_SCHEMA_VERSIONS))} (re-export the bundle "
                "with this avatarq)"
            )
        expected = SCHEMA_VERSION if self.caching is None else CACHING_SCHEMA_VERSION
        if self.schema_version != expected:
            raise AvatarqError(
                f"schema_version {self.schema_version} does not fit the manifest: "
                f"{'a caching record' if self.caching else 'no caching record'} needs {expected}"
            )
        _check_precision(self.precision)
        for name in ("z_dim", "tex_size"):
            _positive_int(name, getattr(self, name))
        # a declared decoder without a mesh output has no vertices
        _positive_int("n_vertices", self.n_vertices, 0 if self.declaration else 1)
        if len(self.model_sha256) != 64:
            raise AvatarqError("model_sha256 must be a sha256 hex digest")
