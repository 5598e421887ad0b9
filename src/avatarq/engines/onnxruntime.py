"""ONNX Runtime backend: the phase rewrite as its "engine", a session as its runner.

`OnnxRuntimeBuilder` writes ``engines/onnxruntime-cpu.onnx``: model.onnx with every
ConvTranspose(k4, s2, p1) rewritten into phase convolutions (`avatarq.export.rewrite_ort`),
which is what makes the decoder fast on the CPU provider (about half the FP32 latency at
full size) and keeps a Q/DQ graph's activations 8-bit between layers. The rewrite adds no
quantization scale: it equals model.onnx up to float summation order. The file is plain
ONNX, so it is portable across machines and ONNX Runtime versions; the build checks it
against model.onnx (on seeded latents, or on the steps of ``calibration_latents``) and
records the error. `OnnxRuntimeRunner` runs that file when the bundle has one, else
model.onnx.
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
CHECK_SAMPLES = 4  # seeded latents the build check decodes
CHECK_STEPS = 16  # evenly spaced steps of BuildOptions.calibration_latents it decodes instead


def session_options(threads: int = 0, profile_prefix: str | None = None, spin_wait: bool = False):
    """ORT SessionOptions: all graph optimizations, ``threads`` intra-op threads (0: ORT's
    default), sequential execution, warnings silenced; profiling when a prefix is given.

    ``spin_wait=False`` stops idle intra-op threads from spinning between operators. Spinning
    saves a little latency on a dedicated CPU but is ruinous on a shared one: measured on a
    loaded 2-vCPU machine, the full-size DAM decoder took 184 ms with spinning, 86 ms without.
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
):
    """An InferenceSession; a graph ORT cannot load is an AvatarqError with ORT's first line."""
    import onnxruntime as ort

    options = options if options is not None else session_options(threads, spin_wait=spin_wait)
    source = model if isinstance(model, bytes) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=providers_for(device))
    except AvatarqError:
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        label = "the graph" if isinstance(model, bytes) else str(model)
        raise AvatarqError(f"ONNX Runtime cannot load {label}: {first}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        # ORT logs the load error and silently falls back to the CPU provider.
        raise AvatarqError(
            f"ONNX Runtime {ort.__version__} could not load its CUDA provider (the CUDA and "
            "cuDNN libraries it was built for are missing; its log above names them); "
            "use --device cpu"
        )
    return session


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

    def _activate(self) -> None:
        self.session = make_session(
            self.model_path, self.device, self.threads, spin_wait=self.spin_wait
        )
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
    """model.onnx exactly as exported, under ONNX Runtime (backend ``onnx``): the
    numerical reference for Q/DQ graphs and the fallback when no engine is built."""

    backend = "onnx"

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: RunOptions = RunOptions()) -> OnnxRuntimeRunner:
        return cls._for(bundle, bundle.model_path, options)


class OnnxRuntimeBuilder(Builder):
    """Writes ``engines/onnxruntime-cpu.onnx`` (the phase rewrite of model.onnx)."""

    backend = BACKEND

    def target(self) -> str:
        return "cpu"

    def build(self, bundle: Bundle, progress: Progress | None = None) -> BuildResult:
        import onnxruntime as ort

        from avatarq.export.onnx_export import save_onnx
        from avatarq.export.rewrite_ort import (
            OrtRewriteConfig,
            default_calibration_feeds,
            rewrite_for_ort,
        )

        say = progress or (lambda _m: None)
        start = time.perf_counter()
        model = onnx.load(str(bundle.model_path))
        config = OrtRewriteConfig()
        # The rewrite needs no data (it adds no scale); these inputs only feed the check.
        latents = self.options.calibration_latents
        if latents is not None:
            feeds = latent_feeds(latents, bundle, CHECK_STEPS)
            inputs = f"{len(next(iter(feeds.values())))} steps of {latents}"
        else:
            feeds = default_calibration_feeds(model, CHECK_SAMPLES, seed=0)
            inputs = f"{CHECK_SAMPLES} seeded N(0, 1) latents"
        settings: dict[str, Any] = {**self.options.to_dict(), "rewrite": None}
        if self.options.ort_rewrite:
            say("rewriting ConvTranspose layers into phase convolutions")
            result = rewrite_for_ort(model, config)
            model = result.model
            settings["rewrite"] = {"config": config.to_json(), **result.to_dict()}
        path = self.engine_path(bundle, ".onnx")
        partial = path.with_name(path.name + ".partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_onnx(model, partial)
        try:
            say("checking the engine against model.onnx")
            settings["check"] = check_against(
                bundle.model_path, partial, feeds, len(next(iter(feeds.values()))), _peak(bundle)
            )
            settings["check"]["inputs"] = inputs
        except BaseException:
            partial.unlink(missing_ok=True)
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


def latent_feeds(path: str | Path, bundle: Bundle, n: int) -> dict[str, np.ndarray]:
    """Up to ``n`` evenly spaced steps of a latent-sequence .npz as graph inputs."""
    from avatarq.data.latents import LatentSequence

    seq = LatentSequence.load(path)
    if seq.z_dim != bundle.manifest.z_dim:
        raise AvatarqError(
            f"latent sequence {path} has z of size {seq.z_dim}; the bundle's decoder takes "
            f"{bundle.manifest.z_dim}"
        )
    steps = np.unique(np.linspace(0, len(seq) - 1, min(n, len(seq))).round().astype(int))
    return {"z": seq.z[steps], "view": seq.view[steps]}


def _peak(bundle: Bundle) -> float | None:
    """255 for a bundle with de-normalization folded in (0..255 texels), else None."""
    return 255.0 if bundle.manifest.normalization.get("folded") else None


def check_against(
    reference: Path,
    candidate: Path,
    feeds: dict[str, np.ndarray],
    n: int,
    peak: float | None,
) -> dict[str, Any]:
    """Texture/vertex errors of ``candidate`` vs ``reference`` (ORT CPU) on ``n`` samples.

    PSNR uses ``peak`` (None: the reference texture's peak-to-peak range).
    """
    ref = make_session(reference)
    cand = make_session(candidate)
    sq = count = 0.0
    tex_max = vert_max = 0.0
    lo, hi = math.inf, -math.inf
    for i in range(min(n, next(iter(feeds.values())).shape[0])):
        feed = {k: v[i : i + 1] for k, v in feeds.items()}
        (rt, rv), (ct, cv) = (
            ref.run(["texture", "vertices"], feed),
            cand.run(["texture", "vertices"], feed),
        )
        diff = ct.astype(np.float64) - rt
        sq += float(np.sum(diff * diff))
        count += diff.size
        tex_max = max(tex_max, float(np.abs(diff).max()))
        vert_max = max(vert_max, float(np.abs(cv.astype(np.float64) - rv).max()))
        lo, hi = min(lo, float(rt.min())), max(hi, float(rt.max()))
    scale = peak if peak is not None else hi - lo
    mse = sq / count
    psnr = math.inf if mse == 0 else 10 * math.log10(scale * scale / mse)
    return {
        "reference": "model.onnx (ONNX Runtime CPU)",
        "samples": int(min(n, next(iter(feeds.values())).shape[0])),
        "texture_max_abs_error": tex_max,
        "texture_psnr_db": "inf" if math.isinf(psnr) else round(psnr, 2),
        "vertices_max_abs_error": vert_max,
        "peak": scale,
    }
