"""ONNX Runtime backend: the rewritten graph as its "engine", a session as its runner.

`OnnxRuntimeBuilder` writes ``engines/onnxruntime-cpu.onnx`` (`avatarq.export.ort_rewrite`):
for an FP32 bundle, model.onnx with every ConvTranspose(k4, s2, p1) as phase convolutions;
for an INT8 bundle, every quantized layer on integer kernels (int8 weights in the file,
int32 accumulators, ``MatMulIntegerToFloat`` on channels-last 8-bit data), bit-identical to
the exact evaluation of model.onnx. The build checks the engine against that evaluation on
a smooth latent clip (`check_engine`) and refuses an engine below `CHECK_MIN_PSNR_DB`.

`OnnxModelRunner` (backend ``onnx``) runs model.onnx evaluated exactly: every quantized
layer's integer sum computed exactly and rescaled once (`ort_rewrite.exact_reference`).
ONNX Runtime's own float evaluation of a Q/DQ ConvTranspose rounds each partial sum; an
8-bit value whose exact pre-quantization value lies within that rounding of a boundary
moves by one step, and each later 8-bit layer multiplies such steps (on Multiface
decoders the float evaluation ends up 50-80 dB from the exact one, worst frame).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from avatarq.core.files import atomic_path
from avatarq.core.hashing import file_sha256
from avatarq.core.inputs import DecoderInputs, smooth_clip
from avatarq.core.ort import make_session, resolve_device, session_options
from avatarq.core.progress import Progress
from avatarq.engines.base import Builder, BuildResult, Runner, RunOptions, checked_engine_file
from avatarq.engines.compare import bundle_peak
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, TensorSpec
from avatarq.export.manifest import (
    LayerRewriteRecord,
    OnnxRuntimeEngineRecord,
    OrtRewriteRecord,
)
from avatarq.measure import Comparison, Tolerances, compare

BACKEND = "onnxruntime"
DEFAULT_MAX_BATCH = 8
CHECK_FRAMES = 32  # frames of the smooth clip the build check decodes
# Worst-frame texture PSNR the engine must reach against the exact evaluation of model.onnx.
# The INT8 engine is bit-identical to it by construction (its texture layer differs at the
# ulp level: ~140 dB or more); one quantized value one step off anywhere reads as 90-110 dB.
CHECK_MIN_PSNR_DB = 100.0
# Largest vertex error allowed, relative to the largest |vertex coordinate|.
CHECK_MAX_VERTEX_ERROR = 1e-5


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX graph with ONNX Runtime, writing into preallocated output buffers.

    Args:
        model_path: the graph (model.onnx or the built engine file).
        inputs, outputs: the manifest's tensor specs.
        max_batch: largest batch (output buffers hold this many).
        device: ``cpu`` or ``cuda`` (CUDA provider; outputs still land in host buffers).
        threads: intra-op threads (0: ORT's default).
        spin_wait: let idle intra-op threads spin (see `avatarq.core.ort.session_options`).
    """

    backend = BACKEND

    def __init__(
        self,
        model_path: str | Path,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        max_batch: int = DEFAULT_MAX_BATCH,
        device: str = "cpu",
        threads: int = 0,
        spin_wait: bool = False,
        name: str = "",
    ) -> None:
        label = name or f"{self.backend}:{Path(model_path).name}"
        super().__init__(inputs, outputs, max_batch, label)
        self.model_path = Path(model_path)
        self.device = device
        self.threads = threads
        self.spin_wait = spin_wait
        self.session = None
        self._binding = None

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: RunOptions = RunOptions()) -> OnnxRuntimeRunner:
        """The bundle's ONNX Runtime engine (`avatarq build --backend onnxruntime`)."""
        records = cls.engines_in(bundle)
        if not records:
            raise AvatarqError(
                f"bundle {bundle.root} has no onnxruntime engine; build it (avatarq build "
                f"{bundle.root} --backend onnxruntime) or run model.onnx as is with backend onnx"
            )
        return cls._for(bundle, checked_engine_file(bundle, records[-1]), options)

    @classmethod
    def _for(cls, bundle: Bundle, path: Path, options: RunOptions) -> OnnxRuntimeRunner:
        return cls(
            path,
            bundle.manifest.inputs,
            bundle.manifest.outputs,
            options.max_batch or DEFAULT_MAX_BATCH,
            resolve_device(options.device),
            options.threads,
            options.spin_wait,
        )

    def _source(self) -> tuple[str | Path | bytes, tuple[str, ...]]:
        """(the graph the session runs, ONNX Runtime optimizers to disable for it)."""
        return self.model_path, ()

    def _activate(self) -> None:
        source, disabled = self._source()
        self.session = make_session(
            source, self.device, self.threads, spin_wait=self.spin_wait,
            disabled_optimizers=disabled,
        )  # fmt: skip
        self._check_io()
        self._binding = self.session.io_binding()

    def _check_io(self) -> None:
        have = {i.name: i for i in self.session.get_inputs()}
        have.update({o.name: o for o in self.session.get_outputs()})
        for spec in [*self.inputs, *self.outputs]:
            meta = have.get(spec.name)
            if meta is None:
                raise AvatarqError(
                    f"{self.model_path} has no tensor {spec.name!r} that the bundle manifest "
                    f"describes; it has {', '.join(have)}"
                )
            if meta.type != f"tensor({'float' if spec.dtype == 'float32' else spec.dtype})":
                raise AvatarqError(
                    f"{self.model_path}: tensor {spec.name} is {meta.type}, the manifest says {spec.dtype}"
                )

    def _deactivate(self) -> None:
        self._binding = None
        self.session = None

    def _run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], batch: int
    ) -> None:
        binding = self._binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        for name, buffer in outputs.items():
            binding.bind_output(
                name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data
            )
        self.session.run_with_iobinding(binding)


class OnnxModelRunner(OnnxRuntimeRunner):
    """model.onnx under ONNX Runtime (backend ``onnx``), evaluated exactly: the numerical
    reference for Q/DQ graphs and the fallback when no engine is built.

    A graph with quantized layers runs as `exact_reference(model.onnx)` (built in memory
    when the runner activates; model.onnx is not changed); a float graph runs as it is.
    """

    backend = "onnx"

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: RunOptions = RunOptions()) -> OnnxRuntimeRunner:
        return cls._for(bundle, bundle.checked_model_path(), options)

    @classmethod
    def for_graph(cls, bundle: Bundle, path: Path, options: RunOptions = RunOptions()):
        """Another graph with the bundle's I/O (its FP32 reference graph) under ONNX Runtime."""
        return cls._for(bundle, path, options)

    def _source(self) -> tuple[str | Path | bytes, tuple[str, ...]]:
        return exact_source(self.model_path)


def exact_source(model_path: str | Path) -> tuple[str | Path | bytes, tuple[str, ...]]:
    """What a session needs to evaluate ``model_path`` exactly: (graph, optimizers to
    disable); the file itself when it has no quantized layer with an exact form."""
    from avatarq.export.ort_rewrite import EXACT_DISABLED_OPTIMIZERS, exact_reference

    model = _load(model_path)
    exact, layers = exact_reference(model)
    if not any(not layer.problem for layer in layers):
        return model_path, ()
    return exact.SerializeToString(), EXACT_DISABLED_OPTIMIZERS


def _load(path: str | Path) -> onnx.ModelProto:
    try:
        return onnx.load(str(path))
    except Exception as exc:  # a truncated or foreign file
        raise AvatarqError(f"cannot read the ONNX graph {path}: {exc}") from None


def optimized_op_counts(model: str | Path | bytes, threads: int = 1) -> dict[str, int]:
    """{operator: count} of ``model`` after ONNX Runtime's CPU graph optimizations (the
    graph it really runs), contrib operators as ``com.microsoft.<op>``."""
    import tempfile
    from collections import Counter

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "optimized.onnx"
        make_session(model, "cpu", threads, session_options(threads, optimized_path=target))
        optimized = onnx.load(str(target))
    ops = Counter(
        f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in optimized.graph.node
    )
    return dict(sorted(ops.items()))


class OnnxRuntimeBuilder(Builder):
    """Writes ``engines/onnxruntime-cpu.onnx`` (see the module docstring)."""

    backend = BACKEND

    def target(self) -> str:
        return "cpu"

    def build(self, bundle: Bundle, progress: Progress | None = None) -> BuildResult:
        import onnxruntime as ort

        from avatarq.export.onnx_export import save_onnx
        from avatarq.export.ort_rewrite import OrtRewriteConfig, rewrite_for_ort
        from avatarq.export.validate import validation_record

        say = progress or (lambda _m: None)
        start = time.perf_counter()
        model = _load(bundle.checked_model_path())
        inputs = check_clip(bundle, model, self.options.calibration_latents)
        rewrite = None
        if self.options.ort_rewrite:
            say("rewriting the graph for ONNX Runtime")
            config = OrtRewriteConfig()
            result = rewrite_for_ort(model, config)
            model = result.model
            rewrite = OrtRewriteRecord(
                config=config.to_json(),
                layers=[LayerRewriteRecord(**asdict(layer)) for layer in result.layers],
            )
        path = self.engine_path(bundle, ".onnx")
        created = not path.parent.exists()
        try:
            with atomic_path(path) as partial:
                save_onnx(model, partial)
                say("checking the engine against the exact evaluation of model.onnx")
                exact, plain = check_engine(bundle, partial, inputs)
                check = validation_record(exact, inputs.source)
                vertex_limit = _vertex_limit(bundle, inputs)
                passed = check.passed and exact.vertices_max_abs_error <= vertex_limit
                check = dataclasses.replace(check, passed=passed)
                if not passed:
                    raise AvatarqError(
                        f"the ONNX Runtime engine of {bundle.root} fails its check against the "
                        f"exact evaluation of model.onnx: worst-frame texture PSNR "
                        f"{exact.texture.psnr_min:.1f} dB (needs >= {CHECK_MIN_PSNR_DB:g}), "
                        f"vertex error {exact.vertices_max_abs_error:.3g} (allowed "
                        f"{vertex_limit:.3g}); nothing was written"
                    )
                ops = optimized_op_counts(partial)
        except BaseException:
            if created and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()
            raise
        seconds = time.perf_counter() - start
        record = OnnxRuntimeEngineRecord(
            path=str(path.relative_to(bundle.root)),
            library_version=ort.__version__,
            target=self.target(),
            sha256=file_sha256(path),
            size_bytes=path.stat().st_size,
            build_seconds=round(seconds, 3),
            options=self.options,
            check=check,
            rewrite=rewrite,
            float_evaluation=validation_record(plain, inputs.source),
            optimized_ops=ops,
        )
        return BuildResult(record, [path])


def input_range(model: onnx.ModelProto, name: str = "z") -> float | None:
    """The largest |value| the graph's quantizer of input ``name`` represents (its
    calibrated range: 127 x scale for int8), or None when that input is not quantized."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] != name or node.input[1] not in inits:
            continue
        scale = float(numpy_helper.to_array(inits[node.input[1]]).reshape(-1)[0])
        zp_name = node.input[2] if len(node.input) > 2 else ""
        zp = numpy_helper.to_array(inits[zp_name]) if zp_name in inits else np.zeros((), np.uint8)
        lo, hi = (-128, 127) if zp.dtype == np.int8 else (0, 255)
        zero = int(zp.reshape(-1)[0])
        return scale * max(zero - lo, hi - zero)
    return None


def check_clip(
    bundle: Bundle, model: onnx.ModelProto, latents: str | Path | None, n: int = CHECK_FRAMES
) -> DecoderInputs:
    """The smooth clip the build check decodes (its ``source`` says which).

    With a latent file: its first ``n`` steps (e.g. encoder codes of a capture segment, in
    order). Without one: the seeded smooth clip (`smooth_clip`) with every latent dimension
    scaled to sigma = 1/3 of the range of the graph's z quantizer, so it spreads like the
    codes the bundle was calibrated on and reaches past that range now and then, as real
    codes do; N(0, 1) for a float graph.
    """
    if latents is not None:
        from avatarq.data.latents import load_inputs

        seq = load_inputs(latents)
        if seq.z_dim != bundle.manifest.z_dim:
            raise AvatarqError(
                f"latent sequence {latents} has z of size {seq.z_dim}; the bundle's decoder "
                f"takes {bundle.manifest.z_dim}"
            )
        steps = min(n, len(seq))
        if steps < 2:
            raise AvatarqError(f"latent sequence {latents} has {len(seq)} step; the check needs 2")
        return DecoderInputs.from_z_view(
            seq.z[:steps], seq.view[:steps], source=f"the first {steps} steps of {latents}"
        )
    z_dim = bundle.manifest.z_dim
    amax = input_range(model, "z")
    if amax is None:
        clip = smooth_clip(z_dim, n, seed=0)
        return DecoderInputs.from_z_view(
            clip.z, clip.view, source=f"{n}-frame smooth N(0, 1) latent clip (seed 0)"
        )
    sigma = amax / 3
    clip = smooth_clip(z_dim, n, seed=0, z_std=np.full(z_dim, sigma))
    return DecoderInputs.from_z_view(
        clip.z,
        clip.view,
        source=f"{n}-frame smooth latent clip (seed 0), sigma {sigma:.3g} = 1/3 of the z "
        "quantizer's range",
    )


class _ExactDecoder:
    """model.onnx evaluated exactly (`OnnxModelRunner`'s graph) as a `measure` decoder."""

    def __init__(self, model_path: Path) -> None:
        self.name = "model.onnx evaluated exactly (integer sums, one rounding per rescale)"
        source, disabled = exact_source(model_path)
        self.session = make_session(source, "cpu", disabled_optimizers=disabled)

    def run(self, feeds):  # noqa: ANN001, ANN201 - the measure.Decoder protocol
        return self.session.run(None, dict(feeds))


def check_engine(
    bundle: Bundle, engine: Path, inputs: DecoderInputs
) -> tuple[Comparison, Comparison]:
    """The engine at ``engine`` against the exact evaluation of the bundle's model.onnx
    (judged: worst-frame texture PSNR >= `CHECK_MIN_PSNR_DB`) and against ONNX Runtime's
    plain float evaluation of it (reported), frame by frame over ``inputs``."""
    from avatarq.export.validate import DAM_OUTPUTS, SessionDecoder

    candidate = SessionDecoder("engine", engine)
    plain = SessionDecoder("model.onnx under ONNX Runtime's float kernels", bundle.model_path)
    kwargs = dict(output_names=DAM_OUTPUTS, peak=bundle_peak(bundle), compute_ssim=False)
    tolerances = Tolerances(min_psnr_frame=CHECK_MIN_PSNR_DB)
    exact = compare(_ExactDecoder(bundle.model_path), candidate, inputs, tolerances, **kwargs)
    return exact, compare(plain, candidate, inputs, **kwargs)


def _vertex_limit(bundle: Bundle, inputs: DecoderInputs) -> float:
    """`CHECK_MAX_VERTEX_ERROR` times the largest |vertex coordinate| of the first frame."""
    vertices = _ExactDecoder(bundle.model_path).run(inputs.batch(0, 1))[1]
    return CHECK_MAX_VERTEX_ERROR * max(float(np.abs(vertices).max()), 1e-12)
