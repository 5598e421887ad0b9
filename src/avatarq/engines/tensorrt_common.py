"""TensorRT and TensorRT-RTX: one builder and one runner, parametrized by the module.

The Python modules ``tensorrt`` (TensorRT 10/11) and ``tensorrt_rtx`` (TensorRT for RTX)
have matching APIs; `tensorrt.py` and `tensorrt_rtx.py` only name the module and override
what differs (where an engine may run, timing cache vs runtime cache).

Build (no GPU needed for TensorRT-RTX; full TensorRT builds on the GPU it targets):

- the network is strongly typed (TensorRT 10: the STRONGLY_TYPED creation flag; 11 and
  RTX: always), so the Q/DQ nodes and casts of model.onnx ARE the precision plan and no
  precision flag is ever set;
- one optimization profile covers the batch dimension (min/opt/max of `BuildOptions`);
- the builder optimization level comes from `BuildOptions.optimization_level`;
- a timing cache beside the engine (``engines/<backend>.timing-cache``) is loaded and saved
  again (TensorRT only: TensorRT-RTX made timing caches no-ops; its runner keeps a runtime
  cache of JIT-compiled kernels instead);
- the network's layers with their output types are saved as ``<engine>.layers.json``, and
  the engine inspector's layer information as ``<engine>.inspector.json`` when the engine
  can be deserialized here (needs a supported GPU);
- parser errors name the ONNX node and operator.

Run: deserialize, one execution context, torch CUDA tensors as the I/O buffers (allocated
once for max_batch), ``set_input_shape`` + ``set_tensor_address`` + ``execute_async_v3``
on a torch stream, optional CUDA graph per batch size.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from avatarq.core.files import atomic_write_bytes
from avatarq.core.hashing import file_sha256
from avatarq.core.progress import Progress
from avatarq.engines.base import Builder, BuildResult, Runner, RunOptions, checked_engine_file
from avatarq.errors import AvatarqError
from avatarq.export.bundle import Bundle, EngineRecord, TensorSpec
from avatarq.export.manifest import TensorRTEngineRecord

_DTYPES = {"float32": "FLOAT", "float16": "HALF", "int32": "INT32", "int64": "INT64"}


def import_module(module_name: str, display: str):
    """Import ``tensorrt`` or ``tensorrt_rtx``; a missing or broken install is an AvatarqError."""
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise AvatarqError(
            f"{display} is not usable here (import {module_name} failed: {exc})"
        ) from None


def make_logger(trt):
    """A logger that keeps warnings and errors (for messages) and prints nothing."""

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg) -> None:  # noqa: D401 - TensorRT's callback
            if severity <= trt.ILogger.Severity.WARNING:
                self.messages.append((severity, str(msg)))

        def last_error(self) -> str:
            errors = [m for s, m in self.messages if s <= trt.ILogger.Severity.ERROR]
            return errors[-1].strip().splitlines()[0][:300] if errors else "no error logged"

    return _Logger()


def strongly_typed_network(trt, builder):
    """A strongly typed network definition on any TensorRT version.

    TensorRT-RTX and TensorRT 11 networks are strongly typed with flags 0; TensorRT 10
    needs the STRONGLY_TYPED creation flag. Asking the network (rather than the version)
    keeps this right on every release.
    """
    network = builder.create_network(0)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is not None and hasattr(network, "get_flag") and not network.get_flag(flag):
        network = builder.create_network(1 << int(flag))
        if not network.get_flag(flag):
            raise AvatarqError(f"TensorRT {trt.__version__} cannot create a strongly typed network")
    return network


def parser_errors(parser, display: str, model: Path) -> str:
    """One line naming the first ONNX node the parser rejected (and how many errors)."""
    n = parser.num_errors
    if n == 0:
        return f"{display} could not parse {model} (no parser error recorded)"
    err = parser.get_error(0)
    node = err.node_name() if hasattr(err, "node_name") else ""
    op = err.node_operator() if hasattr(err, "node_operator") else ""
    lines = [line.strip() for line in str(err.desc()).strip().splitlines() if line.strip()]
    desc = lines[0] if lines else "invalid node"
    # The reason follows on a later line, e.g. "... API Usage Error (node: input has type
    # Int32 but must have type ... In checkType at file:line)"; CUDA-driver noise is skipped.
    for line in lines[1:]:
        if "cuda" in line.lower():
            continue
        reason = re.search(r"\((?:[^:()]+: )?(.*?)(?:\s+In \w+ at [^)]*)?\)\s*$", line)
        desc += ": " + (reason.group(1) if reason else line)
        break
    desc = desc[:400]
    where = f"node {node!r} ({op})" if node else f"node #{err.node()}"
    more = f" (+{n - 1} more)" if n > 1 else ""
    return f"{display} cannot parse {model.name}: {where}: {desc}{more}"


def network_io(network) -> dict[str, dict[str, Any]]:
    """{name: {"mode": input|output, "dtype", "shape" (-1 = dynamic)}} of a network."""
    io = {}
    for i in range(network.num_inputs):
        t = network.get_input(i)
        io[t.name] = {"mode": "input", "dtype": t.dtype.name, "shape": list(t.shape)}
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io[t.name] = {"mode": "output", "dtype": t.dtype.name, "shape": list(t.shape)}
    return io


def network_layers(network) -> list[dict[str, Any]]:
    """Each layer of a (strongly typed) network: name, type and output types, i.e. the
    precision TensorRT will compute in, known before any GPU sees the engine."""
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        layers.append(
            {
                "name": layer.name,
                "type": layer.type.name,
                "outputs": [layer.get_output(j).dtype.name for j in range(layer.num_outputs)],
            }
        )
    return layers


def check_io(
    io: dict[str, dict[str, Any]], inputs: list[TensorSpec], outputs: list[TensorSpec]
) -> None:
    """The network/engine I/O must be the manifest's (names, dtypes, static dims)."""
    for spec, mode in [(s, "input") for s in inputs] + [(s, "output") for s in outputs]:
        have = io.get(spec.name)
        if have is None or have["mode"] != mode:
            raise AvatarqError(
                f"the engine has no {mode} {spec.name!r} (it has {', '.join(io)}); "
                "the bundle's model.onnx and manifest disagree"
            )
        if have["dtype"] != _DTYPES.get(spec.dtype, spec.dtype.upper()):
            raise AvatarqError(
                f"engine {mode} {spec.name} is {have['dtype']}, the manifest says {spec.dtype}"
            )
        expected = [-1 if d == "batch" else int(d) for d in spec.shape]
        if list(have["shape"]) != expected:
            raise AvatarqError(
                f"engine {mode} {spec.name} has shape {have['shape']}, the manifest says {spec.shape}"
            )


def device_capability() -> tuple[int, int] | None:
    """(major, minor) of the current CUDA device, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    return tuple(torch.cuda.get_device_capability())


def sm(capability: tuple[int, int]) -> str:
    return f"sm{capability[0]}{capability[1]}"


# --------------------------------------------------------------------------- builder


class TensorRTBuilderBase(Builder):
    """Builds a serialized engine from model.onnx (see the module docstring)."""

    module_name: ClassVar[str] = ""
    display: ClassVar[str] = ""
    uses_timing_cache: ClassVar[bool] = True

    def _configure_target(self, trt, config) -> None:
        """Set where the engine may run (subclasses)."""

    def build(self, bundle: Bundle, progress: Progress | None = None) -> BuildResult:
        trt = import_module(self.module_name, self.display)
        say = progress or (lambda _m: None)
        options = self.options
        target = self.target()
        logger = make_logger(trt)
        builder = trt.Builder(logger)
        network = strongly_typed_network(trt, builder)
        parser = trt.OnnxParser(network, logger)
        say(f"parsing {bundle.model_path.name}")
        if not parser.parse_from_file(str(bundle.checked_model_path())):
            raise AvatarqError(parser_errors(parser, self.display, bundle.model_path))
        io = network_io(network)
        check_io(io, bundle.manifest.inputs, bundle.manifest.outputs)

        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        batches = (options.min_batch, options.opt_batch, options.max_batch)
        for spec in bundle.manifest.inputs:
            shapes = [tuple(b if d == "batch" else int(d) for d in spec.shape) for b in batches]
            profile.set_shape(spec.name, *shapes)
        config.add_optimization_profile(profile)
        config.builder_optimization_level = options.optimization_level
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        self._configure_target(trt, config)
        engine_path = self.engine_path(bundle)
        cache_path = engine_path.parent / f"{self.backend}.timing-cache"
        cache = None
        if self.uses_timing_cache and options.timing_cache:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            cache = config.create_timing_cache(blob)
            config.set_timing_cache(cache, ignore_mismatch=False)

        say(f"building the {self.display} engine for {target}")
        start = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        seconds = time.perf_counter() - start
        if serialized is None:
            raise AvatarqError(f"{self.display} could not build an engine: {logger.last_error()}")
        data = bytes(serialized)
        atomic_write_bytes(engine_path, data)
        files = [engine_path]
        if cache is not None:
            atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
            files.append(cache_path)
        layers_path = engine_path.with_name(engine_path.name + ".layers.json")
        atomic_write_bytes(layers_path, json.dumps(network_layers(network), indent=1).encode())
        files.append(layers_path)
        inspector_path = self._inspect(trt, data, engine_path)
        if inspector_path is not None:
            files.append(inspector_path)

        rel = lambda p: str(p.relative_to(bundle.root)) if p is not None else None  # noqa: E731
        record = TensorRTEngineRecord(
            backend=self.backend,
            path=rel(engine_path),
            library_version=trt.__version__,
            target=target,
            sha256=file_sha256(engine_path),
            size_bytes=len(data),
            build_seconds=round(seconds, 3),
            options=options,
            io=io,
            strongly_typed=True,
            timing_cache=rel(cache_path) if cache is not None else None,
            layers=rel(layers_path),
            inspector=rel(inspector_path),
        )
        return BuildResult(record, files)

    def _inspect(self, trt, data: bytes, engine_path: Path) -> Path | None:
        """Save the engine inspector's JSON when this machine can deserialize the engine."""
        if device_capability() is None:
            return None
        logger = make_logger(trt)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            return None
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        path = engine_path.with_name(engine_path.name + ".inspector.json")
        atomic_write_bytes(path, str(info).encode())
        return path


# --------------------------------------------------------------------------- runner


class TensorRTRunnerBase(Runner):
    """Runs a serialized engine with ``execute_async_v3`` on torch CUDA buffers.

    Args:
        engine_path: the engine file.
        record: its manifest record (library version and target are checked first).
        inputs, outputs: the manifest's tensor specs.
        max_batch: largest batch (the engine profile's max by default).
        cuda_graph: capture one CUDA graph per batch size and replay it.
    """

    module_name: ClassVar[str] = ""
    display: ClassVar[str] = ""

    def __init__(
        self,
        engine_path: str | Path,
        record: EngineRecord,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        max_batch: int,
        cuda_graph: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(
            inputs, outputs, max_batch, name or f"{self.backend}:{Path(engine_path).name}"
        )
        self.engine_path = Path(engine_path)
        self.record = record
        self.cuda_graph = cuda_graph
        self._reset()

    def _reset(self) -> None:
        self._engine = self._context = self._runtime = self._stream = None
        self._device_buffers: dict[str, Any] = {}
        self._host_inputs: dict[str, Any] = {}
        self._host_outputs: dict[str, Any] = {}
        self._graphs: dict[int, Any] = {}
        self._batch: int | None = None

    # -- compatibility (subclasses say where their engines run)

    def check_target(self, capability: tuple[int, int], device_name: str) -> None:
        """Raise when the engine's target excludes this GPU."""

    @classmethod
    def select(cls, bundle: Bundle) -> EngineRecord:
        """The engine record to run here: the bundle's engines of this backend, and for
        several, the one whose target fits the current GPU."""
        records = cls.engines_in(bundle)
        if not records:
            built = ", ".join(sorted({e.backend for e in bundle.manifest.engines})) or "none"
            raise AvatarqError(
                f"bundle {bundle.root} has no {cls.display} engine (engines built: {built}); "
                f"build one: avatarq build {bundle.root} --backend {cls.backend}"
            )
        capability = device_capability() if len(records) > 1 else None
        for record in reversed(records if capability is not None else []):
            try:
                cls(bundle.root / record.path, record, [], [], 1).check_target(capability, "")
                return record
            except AvatarqError:
                continue
        return records[-1]

    @classmethod
    def can_run(cls, bundle: Bundle) -> bool:
        """A GPU is here, the engine targets it, and the installed library built it."""
        capability = device_capability()
        if capability is None or not cls.engines_in(bundle):
            return False
        record = cls.select(bundle)
        try:
            trt = import_module(cls.module_name, cls.display)
            probe = cls(bundle.root / record.path, record, [], [], 1)
            probe.check_target(capability, "this GPU")
        except AvatarqError:
            return False
        return record.library_version == trt.__version__

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: RunOptions = RunOptions()) -> TensorRTRunnerBase:
        record = cls.select(bundle)
        trt = import_module(cls.module_name, cls.display)
        if record.library_version != trt.__version__:
            raise AvatarqError(
                f"the {cls.display} engine in {bundle.root} was built with {cls.display} "
                f"{record.library_version}; this machine has {trt.__version__}. Rebuild: "
                f"avatarq build {bundle.root} --backend {cls.backend}"
            )
        if options.device == "cpu":
            raise AvatarqError(
                f"{cls.display} engines run on a CUDA GPU; use --device cuda or auto"
            )
        path = checked_engine_file(bundle, record)
        profile_max = record.options.max_batch
        max_batch = options.max_batch or profile_max
        if max_batch > profile_max:
            raise AvatarqError(
                f"max_batch {max_batch} exceeds the engine's profile (built for batch "
                f"{record.options.min_batch}..{profile_max}); rebuild with --max-batch"
            )
        runner = cls(
            path,
            record,
            bundle.manifest.inputs,
            bundle.manifest.outputs,
            max_batch,
            options.cuda_graph,
        )
        runner.min_batch = record.options.min_batch
        return runner

    # -- lifecycle

    def _create_context(self, trt, engine):
        return engine.create_execution_context()

    def _activate(self) -> None:
        import torch

        capability = device_capability()
        if capability is None:
            raise AvatarqError(f"{self.display} engines run on a CUDA GPU, and torch sees none")
        self.check_target(capability, torch.cuda.get_device_name())
        trt = import_module(self.module_name, self.display)
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self._engine is None:
            raise AvatarqError(
                f"{self.display} cannot load {self.engine_path.name}: {self._logger.last_error()}; "
                f"rebuild it with avatarq build --backend {self.backend}"
            )
        check_io(self._engine_io(trt), self.inputs, self.outputs)
        self._context = self._create_context(trt, self._engine)
        if self._context is None:
            raise AvatarqError(
                f"{self.display} could not create an execution context: {self._logger.last_error()}"
            )
        device = torch.device("cuda")
        self._stream = torch.cuda.Stream(device)
        for spec in self.inputs:
            shape = self._concrete(spec, self.max_batch)
            self._device_buffers[spec.name] = torch.empty(shape, dtype=torch.float32, device=device)
            self._host_inputs[spec.name] = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        for spec in self.outputs:
            shape = self._concrete(spec, self.max_batch)
            self._device_buffers[spec.name] = torch.empty(shape, dtype=torch.float32, device=device)
        for name, buffer in self._device_buffers.items():
            self._context.set_tensor_address(name, buffer.data_ptr())

    def _engine_io(self, trt) -> dict[str, dict[str, Any]]:
        io = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            mode = self._engine.get_tensor_mode(name)
            io[name] = {
                "mode": "input" if mode == trt.TensorIOMode.INPUT else "output",
                "dtype": self._engine.get_tensor_dtype(name).name,
                "shape": list(self._engine.get_tensor_shape(name)),
            }
        return io

    def _allocate(self, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
        import torch

        pinned = torch.empty(shape, dtype=torch.float32, pin_memory=True)
        self._host_outputs[spec.name] = pinned
        return pinned.numpy()

    def _deactivate(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._reset()

    # -- running

    def _run(
        self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray], batch: int
    ) -> None:
        import torch

        stream = self._stream
        with torch.cuda.stream(stream):
            for name, array in inputs.items():
                staging = self._host_inputs[name][:batch]
                np.copyto(staging.numpy(), array)
                self._device_buffers[name][:batch].copy_(staging, non_blocking=True)
            if batch != self._batch:
                for spec in self.inputs:
                    self._context.set_input_shape(spec.name, self._concrete(spec, batch))
                self._batch = batch
            self._execute(batch)
            for name in outputs:
                host = self._host_outputs[name][:batch]  # pinned: the copy is asynchronous
                host.copy_(self._device_buffers[name][:batch], non_blocking=True)
        stream.synchronize()

    def _execute(self, batch: int) -> None:
        import torch

        stream = self._stream
        if not self.cuda_graph:
            self._enqueue()
            return
        graph = self._graphs.get(batch)
        if graph is None:
            self._enqueue()  # TensorRT allocates shape-dependent resources on first use
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                self._enqueue()
            self._graphs[batch] = graph
        graph.replay()

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise AvatarqError(f"{self.display} execution failed: {self._logger.last_error()}")
