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

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from avatarq.engines.base import (
    Builder,
    BuildResult,
    Progress,
    Runner,
    RunOptions,
    checked_engine_file,
    engine_records,
    file_sha256,
)
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, EngineRecord, TensorSpec

BACKEND = "onnxruntime"
DEFAULT_MAX_BATCH = 8
CHECK_FRAMES = 32  # frames of the smooth clip the build check decodes
# Worst-frame texture PSNR the engine must reach against the exact evaluation of model.onnx.
# The INT8 engine is bit-identical to it by construction (its output layer differs at the
# ulp level: ~140 dB); one quantized value one step off anywhere reads as 90-110 dB.
CHECK_MIN_PSNR_DB = 100.0
# Largest vertex error allowed, relative to the largest |vertex coordinate|.
CHECK_MAX_VERTEX_ERROR = 1e-5


def session_options(
    threads: int = 0,
    profile_prefix: str | None = None,
    spin_wait: bool = False,
    optimized_path: str | Path | None = None,
):
    """ORT SessionOptions: all graph optimizations, ``threads`` intra-op threads (0: ORT's
    default), sequential execution, warnings silenced; profiling when a prefix is given.

    ``spin_wait=False`` stops idle intra-op threads from spinning between operators. Spinning
    saves a little latency on a dedicated CPU but is ruinous on a shared one: measured on a
    loaded 2-vCPU machine, the full-size DAM decoder took 184 ms with spinning, 86 ms without.
    ``optimized_path``: write the graph as ONNX Runtime optimized it there.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return options


def providers_for(device: str) -> list[str]:
    """ORT providers for ``cpu`` or ``cuda`` (CUDA first, CPU as fallback for CPU-only ops)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise AvatarqError(
            "device cuda needs onnxruntime-gpu (this onnxruntime has only "
            f"{', '.join(ort.get_available_providers())}); use --device cpu"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _device(device: str) -> str:
    """``auto`` -> ``cuda`` when this onnxruntime has the CUDA provider, else ``cpu``."""
    if device != "auto":
        return device
    import onnxruntime as ort

    return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def make_session(
    model: str | Path | bytes,
    device: str = "cpu",
    threads: int = 0,
    options=None,
    spin_wait: bool = False,
    disabled_optimizers: tuple[str, ...] = (),
):
    """An InferenceSession; a graph ORT cannot load is an AvatarqError with ORT's first line.

    ``disabled_optimizers``: ONNX Runtime graph transformers not to run (by name).
    """
    import onnxruntime as ort

    options = options if options is not None else session_options(threads, spin_wait=spin_wait)
    source = model if isinstance(model, bytes) else str(model)
    extra = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    try:
        return ort.InferenceSession(source, options, providers=providers_for(device), **extra)
    except AvatarqError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        label = "the graph" if isinstance(model, bytes) else str(model)
        raise AvatarqError(f"ONNX Runtime cannot load {label}: {first}") from None


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX graph with ONNX Runtime, writing into preallocated output buffers.

    Args:
        model_path: the graph (model.onnx or the built engine file).
        inputs, outputs: the manifest's tensor specs.
        max_batch: largest batch (output buffers hold this many).
        device: ``cpu`` or ``cuda`` (CUDA provider; outputs still land in host buffers).
        threads: intra-op threads (0: ORT's default).
        spin_wait: let idle intra-op threads spin (see `session_options`).
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
        records = engine_records(bundle, BACKEND)
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
            _device(options.device),
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
        return cls._for(bundle, bundle.model_path, options)

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

        say = progress or (lambda _m: None)
        start = time.perf_counter()
        model = _load(bundle.model_path)
        z, view, inputs = check_clip(bundle, model, self.options.calibration_latents)
        settings: dict[str, Any] = {**self.options.to_dict(), "rewrite": None}
        if self.options.ort_rewrite:
            say("rewriting the graph for ONNX Runtime")
            config = OrtRewriteConfig()
            result = rewrite_for_ort(model, config)
            model = result.model
            settings["rewrite"] = {"config": config.to_json(), **result.to_dict()}
        path = self.engine_path(bundle, ".onnx")
        partial = path.with_name(path.name + ".partial")
        created = not path.parent.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_onnx(model, partial)
            say("checking the engine against the exact evaluation of model.onnx")
            check = check_engine(bundle, partial, z, view)
            check["inputs"] = inputs
            settings["check"] = check
            if not check["passed"]:
                raise AvatarqError(
                    f"the ONNX Runtime engine of {bundle.root} fails its check: worst-frame "
                    f"texture PSNR {check['texture_psnr_min_db']} dB < {CHECK_MIN_PSNR_DB} dB or "
                    f"vertex error {check['vertices_max_abs_error']:.3g} > "
                    f"{check['vertices_max_allowed']:.3g} against the exact evaluation of "
                    "model.onnx; nothing was written"
                )
            settings["optimized_ops"] = optimized_op_counts(partial)
        except BaseException:
            partial.unlink(missing_ok=True)
            if created and not any(path.parent.iterdir()):
                path.parent.rmdir()
            raise
        partial.replace(path)
        seconds = time.perf_counter() - start
        settings["sha256"] = file_sha256(path)
        settings["size_bytes"] = path.stat().st_size
        record = EngineRecord(
            backend=BACKEND,
            path=str(path.relative_to(bundle.root)),
            library_version=ort.__version__,
            target=self.target(),
            settings=settings,
            build_seconds=round(seconds, 3),
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
        return scale * max(int(zp.reshape(-1)[0]) - lo, hi - int(zp.reshape(-1)[0]))
    return None


def check_clip(
    bundle: Bundle, model: onnx.ModelProto, latents: str | Path | None, n: int = CHECK_FRAMES
) -> tuple[np.ndarray, np.ndarray, str]:
    """The smooth clip the build check decodes: (z [T, Z], view [T, 3], description).

    With a latent-sequence file: its first ``n`` steps (real codes, in order). Without one:
    a seeded smooth clip (`smooth_sequence`) whose latents spread like the codes the graph
    was calibrated on: N(0, sigma^2) keyframes with sigma = 1/3 of the range of the z
    quantizer, so the clip reaches and passes the calibrated range the way real codes do
    (N(0, 1) for float graphs).
    """
    from avatarq.engines.compare import smooth_sequence

    if latents is not None:
        from avatarq.data.latents import LatentSequence

        seq = LatentSequence.load(latents)
        if seq.z_dim != bundle.manifest.z_dim:
            raise AvatarqError(
                f"latent sequence {latents} has z of size {seq.z_dim}; the bundle's decoder "
                f"takes {bundle.manifest.z_dim}"
            )
        steps = min(n, len(seq))
        return seq.z[:steps], seq.view[:steps], f"the first {steps} steps of {latents}"
    z, view = smooth_sequence(bundle.manifest.z_dim, n, seed=0)
    amax = input_range(model, "z")
    if amax is None:
        return z, view, f"{n}-frame smooth N(0, 1) latent clip (seed 0)"
    sigma = amax / 3
    return (
        (z * sigma).astype(np.float32),
        view,
        f"{n}-frame smooth latent clip (seed 0), sigma {sigma:.3g} = 1/3 of the z quantizer's range",
    )


def _peak(bundle: Bundle) -> float | None:
    """255 for a bundle with de-normalization folded in (0..255 texels), else None."""
    return 255.0 if bundle.manifest.normalization.get("folded") else None


def check_engine(bundle: Bundle, engine: Path, z: np.ndarray, view: np.ndarray) -> dict[str, Any]:
    """The engine at ``engine`` against the exact evaluation of the bundle's model.onnx
    (`OnnxModelRunner`) on the ordered clip (z [T, Z], view [T, 3]); also against ONNX
    Runtime's plain float evaluation of model.onnx (reported, not judged).

    Returns:
        JSON-ready: texture PSNR worst frame / mean (dB, peak 255 for folded bundles, else
        the reference's first-frame range), max errors, the thresholds and ``passed``.
    """
    from avatarq.engines.compare import compare_runners

    def runner(cls, path: Path) -> OnnxRuntimeRunner:
        return cls(path, bundle.manifest.inputs, bundle.manifest.outputs, 1, "cpu", 0)

    engine_runner = runner(OnnxRuntimeRunner, engine)
    exact = runner(OnnxModelRunner, bundle.model_path)
    plain = runner(OnnxRuntimeRunner, bundle.model_path)
    with engine_runner, exact, plain:
        vert_scale = float(np.abs(exact.decode(z[:1], view[:1])[1]).max())
        vs_exact = compare_runners(exact, engine_runner, z, view, _peak(bundle), compute_ssim=False)
        vs_plain = compare_runners(plain, engine_runner, z, view, _peak(bundle), compute_ssim=False)
    allowed = CHECK_MAX_VERTEX_ERROR * max(vert_scale, 1e-12)
    worst = vs_exact.texture.psnr_min
    passed = worst >= CHECK_MIN_PSNR_DB and vs_exact.vertices_max_abs_error <= allowed
    return {
        "reference": "model.onnx evaluated exactly (integer sums, one rounding per rescale)",
        "frames": int(z.shape[0]),
        "peak": vs_exact.peak,
        "texture_psnr_min_db": _db(worst),
        "texture_psnr_db": _db(vs_exact.texture.psnr_mean),
        "texture_max_abs_error": vs_exact.texture_max_abs_error,
        "vertices_max_abs_error": vs_exact.vertices_max_abs_error,
        "min_psnr_db": CHECK_MIN_PSNR_DB,
        "vertices_max_allowed": allowed,
        "passed": bool(passed),
        "vs_float_evaluation": {
            "reference": "model.onnx under ONNX Runtime's float kernels",
            "texture_psnr_min_db": _db(vs_plain.texture.psnr_min),
            "texture_psnr_db": _db(vs_plain.texture.psnr_mean),
            "texture_max_abs_error": vs_plain.texture_max_abs_error,
        },
    }


def _db(value: float) -> float | str:
    return "inf" if math.isinf(value) else round(float(value), 2)
