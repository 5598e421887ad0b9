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

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from avatarq.core.files import atomic_path
from avatarq.core.hashing import file_sha256
from avatarq.core.inputs import DecoderInputs
from avatarq.core.ort import make_session, resolve_device
from avatarq.core.progress import Progress
from avatarq.engines.base import (
    Builder,
    BuildResult,
    Runner,
    RunOptions,
    checked_engine_file,
    engine_records,
)
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
CHECK_SAMPLES = 4  # seeded latents the build check decodes
CHECK_STEPS = 16  # evenly spaced steps of BuildOptions.calibration_latents it decodes instead


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
            resolve_device(options.device),
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
        return cls._for(bundle, bundle.checked_model_path(), options)

    @classmethod
    def for_graph(cls, bundle: Bundle, path: Path, options: RunOptions = RunOptions()):
        """Another graph with the bundle's I/O (its FP32 reference graph) under ONNX Runtime."""
        return cls._for(bundle, path, options)


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
        model = onnx.load(str(bundle.checked_model_path()))
        config = OrtRewriteConfig()
        # The rewrite needs no data (it adds no scale); these inputs only feed the check.
        latents = self.options.calibration_latents
        if latents is not None:
            feeds = latent_feeds(latents, bundle, CHECK_STEPS)
            inputs = f"{len(next(iter(feeds.values())))} steps of {latents}"
        else:
            feeds = default_calibration_feeds(model, CHECK_SAMPLES, seed=0)
            inputs = f"{CHECK_SAMPLES} seeded N(0, 1) latents"
        rewrite = None
        if self.options.ort_rewrite:
            say("rewriting ConvTranspose layers into phase convolutions")
            result = rewrite_for_ort(model, config)
            model = result.model
            rewrite = OrtRewriteRecord(
                config=config.to_json(),
                layers=[LayerRewriteRecord(**asdict(layer)) for layer in result.layers],
                folded_weight_dq=result.folded_weight_dq,
            )
        path = self.engine_path(bundle, ".onnx")
        with atomic_path(path) as partial:
            save_onnx(model, partial)
            say("checking the engine against model.onnx")
            from avatarq.export.validate import validation_record

            check = check_against(
                bundle.model_path,
                partial,
                feeds,
                len(next(iter(feeds.values()))),
                bundle_peak(bundle),
            )
        seconds = time.perf_counter() - start
        record = OnnxRuntimeEngineRecord(
            path=str(path.relative_to(bundle.root)),
            library_version=ort.__version__,
            target=self.target(),
            sha256=file_sha256(path),
            size_bytes=path.stat().st_size,
            build_seconds=round(seconds, 3),
            options=self.options,
            check=validation_record(check, inputs),
            rewrite=rewrite,
        )
        return BuildResult(record, [path])


def latent_feeds(path: str | Path, bundle: Bundle, n: int) -> dict[str, np.ndarray]:
    """Up to ``n`` evenly spaced steps of a latent-sequence .npz as graph inputs."""
    from avatarq.data.latents import load_inputs

    seq = load_inputs(path)
    if seq.z_dim != bundle.manifest.z_dim:
        raise AvatarqError(
            f"latent sequence {path} has z of size {seq.z_dim}; the bundle's decoder takes "
            f"{bundle.manifest.z_dim}"
        )
    steps = np.unique(np.linspace(0, len(seq) - 1, min(n, len(seq))).round().astype(int))
    return {"z": seq.z[steps], "view": seq.view[steps]}


def check_against(
    reference: Path,
    candidate: Path,
    feeds: dict[str, np.ndarray],
    n: int,
    peak: float | None,
    tolerances: Tolerances | None = None,
) -> Comparison:
    """``candidate`` vs ``reference`` (both ONNX Runtime CPU) on the first ``n`` inputs of
    ``feeds`` (`avatarq.measure.compare`; peak None: the reference's first-frame range)."""
    from avatarq.export.validate import DAM_OUTPUTS, SessionDecoder

    count = min(n, len(next(iter(feeds.values()))))
    inputs = DecoderInputs({k: v[:count] for k, v in feeds.items()})
    return compare(
        SessionDecoder("model.onnx (ONNX Runtime CPU)", reference),
        SessionDecoder("engine", candidate),
        inputs,
        tolerances,
        output_names=DAM_OUTPUTS,
        peak=peak,
        compute_ssim=False,
        min_frames=2,
    )
