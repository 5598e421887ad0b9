"""Regenerate docs/benchmarks.md section 3 and the per-layer profile in docs/engines.md:
the ONNX Runtime INT8 engine on the full-size decoder, and its exactness on every arch.

    python benchmarks/ort_int8.py --docs                 # latency, sizes, floor, profile
    python benchmarks/ort_int8.py --exactness --docs     # archs x 512/1024 + demo avatar

Latency: a Multiface-architecture ``base`` DAM (z 256, texture 1024, 7306 vertices) with
Multiface's own initialization (uniform Glorot with the LeakyReLU gain, ConvTranspose taps
repeated over 2x2 blocks, weight-norm gains g = ||W||) and random untied texel biases
N(0, 0.1^2), since a trained decoder has non-zero ones (Multiface starts them at 0). INT8 =
avatarq max calibration on a smooth latent clip, exported; the engines are what
``avatarq build --backend onnxruntime`` writes for the FP32 and the INT8 bundle; the peer is
ONNX Runtime's ``quantize_static`` of the FP32 graph (QDQ, per-channel int8 weights, its
default uint8 activations, MinMax on the same calibration latents). One process, one
interleaved loop (`alternating_latency`), batch 1, ``--threads`` intra-op threads.

Memory-bandwidth floor: bytes a frame must move at least (every initializer of the engine
read once, every activation a layer reads written once and read once at its stored width,
the outputs written once) / the copy bandwidth of this CPU, measured by ``numpy.copyto``
of a 256 MiB float32 array (one thread; read + write bytes counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from avatarq.bench.results import environment
from avatarq.core.inputs import DecoderInputs, smooth_clip
from avatarq.engines import build_engine
from avatarq.engines.onnxruntime import check_clip
from avatarq.engines.ort_profile import alternating_latency, profile_nodes, time_by_op
from avatarq.export import ExportOptions, export_bundle, open_bundle
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint

ARCHS = ("base", "res", "non", "bilinear", "warp")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- models


def _glorot(module: nn.Module, alpha: float) -> None:
    gain = math.sqrt(2.0 / (1.0 + alpha**2))
    if isinstance(module, nn.ConvTranspose2d):
        fan = (module.in_channels + module.out_channels) * module.kernel_size[0] ** 2 // 4
    elif isinstance(module, nn.Conv2d):
        fan = (module.in_channels + module.out_channels) * module.kernel_size[0] ** 2
    elif isinstance(module, nn.Linear):
        fan = module.in_features + module.out_features
    else:
        return
    bound = gain * math.sqrt(2.0 / fan) * math.sqrt(3.0)
    module.weight.data.uniform_(-bound, bound)
    module.bias.data.zero_()
    if isinstance(module, nn.ConvTranspose2d):
        for a, b in ((0, 1), (1, 0), (1, 1)):
            module.weight.data[:, :, a::2, b::2] = module.weight.data[:, :, 0::2, 0::2]
    if hasattr(module, "g"):
        module.g.data[:] = torch.sqrt(torch.sum(module.weight.data**2))


def multiface_checkpoint(path: Path, config: DAMConfig, texel_bias_std: float) -> Path:
    """A checkpoint of ``config`` with Multiface's initialization (see the docstring)."""
    torch.manual_seed(0)
    model = DeepAppearanceModel(config).eval()
    modules = [model.dec, *([model.warp] if config.arch == "warp" else [])]
    with torch.no_grad():
        for module in modules:
            module.apply(lambda m: _glorot(m, 0.2))
        _glorot(model.dec.mesh_fc, 1.0)
        _glorot(model.dec.texture_decoder.upsample[-1].conv2.deconv, 1.0)
        for name, p in model.dec.texture_decoder.named_parameters():
            if name.endswith(("conv1.bias", "conv2.bias")):
                p.normal_(0.0, texel_bias_std)
    save_checkpoint(model, path)
    return path


def calibration_latents(z_dim: int, path: Path) -> Path:
    """A smooth 64-frame latent clip (N(0, 1) keyframes), saved for calibration."""
    from avatarq.data.latents import save_inputs

    if not path.exists():
        save_inputs(smooth_clip(z_dim, 64, seed=1), path)
    return path


def bundles(root: Path, config: DAMConfig, texel_bias_std: float) -> tuple[Path, Path]:
    """(FP32 bundle, INT8 bundle) of a Multiface-initialized ``config`` under ``root``."""
    from avatarq.calibration import CalibrationConfig, calibrate, samples_from_latents
    from avatarq.data.latents import load_inputs
    from avatarq.models import DeployableDecoder, load_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    fp32, int8 = root / "dam_fp32.avq", root / "dam_int8.avq"
    if fp32.exists() and int8.exists():
        return fp32, int8
    checkpoint = multiface_checkpoint(root / "dam.pt", config, texel_bias_std)
    say(f"export FP32 {config.arch} {config.tex_size}")
    export_bundle(checkpoint, fp32, options=ExportOptions(validate=False))
    seq = load_inputs(calibration_latents(config.z_dim, root / "calib_latents.npz"))
    samples = samples_from_latents(seq, n_random=32, n_clips=0)
    say("calibrate (max) and export INT8")
    artifact = calibrate(
        DeployableDecoder(load_checkpoint(checkpoint)), samples, CalibrationConfig(method="max")
    )
    artifact.save(root / "calib")
    options = ExportOptions(int8=True, calib=str(root / "calib"), validate=False)
    export_bundle(checkpoint, int8, options=options)
    return fp32, int8


def quantize_static_peer(fp32_model: Path, out: Path, latents: Path) -> Path:
    """ONNX Runtime's quantize_static of the FP32 graph on the calibration latents."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    from avatarq.data.latents import load_inputs

    if out.exists():
        return out
    seq = load_inputs(latents)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(
                [{"z": seq.z[i : i + 1], "view": seq.view[i : i + 1]} for i in range(0, 64, 2)]
            )

        def get_next(self):
            return next(self.items, None)

    say("ONNX Runtime quantize_static of the FP32 graph")
    quantize_static(str(fp32_model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True)  # fmt: skip
    return out


# --------------------------------------------------------------------------- measures


def copy_bandwidth(mib: int = 256, repeats: int = 15) -> float:
    """GB/s of numpy.copyto between two float32 arrays of ``mib`` MiB (read + write bytes,
    median of ``repeats``)."""
    a = np.ones(mib * 2**20 // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    return 2 * a.nbytes / float(np.median(times)) / 1e9


def floor_bytes(engine: Path, source: Path) -> dict[str, int]:
    """Bytes per frame an engine must move at least (see the module docstring): its
    initializers, the inputs of the source graph's linear layers (8-bit where a
    DequantizeLinear feeds them from an 8-bit tensor), and the outputs."""
    model = onnx.load(str(engine))
    weights = sum(int(np.prod(i.dims)) * _width(i.data_type) for i in model.graph.initializer)
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(source)))
    shapes = {
        v.name: ([d.dim_value or 1 for d in v.type.tensor_type.shape.dim], v.type.tensor_type.elem_type)
        for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }  # fmt: skip
    producers = {o: n for n in inferred.graph.node for o in n.output}
    activations = 0
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        name = node.input[0]
        dq = producers.get(name)
        if dq is not None and dq.op_type == "DequantizeLinear":
            name = dq.input[0]
        if name in shapes:
            dims, dtype = shapes[name]
            activations += 2 * int(np.prod(dims)) * _width(dtype)
    outputs = sum(int(np.prod(shapes[o.name][0])) * 4 for o in inferred.graph.output)
    return {"weights": weights, "activations": activations, "outputs": outputs,
            "total": weights + activations + outputs}  # fmt: skip


def _width(data_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    return [f for f in wanted if f" {f}" in flags]


# --------------------------------------------------------------------------- latency run


def latency_run(args: argparse.Namespace) -> dict:
    config = DAMConfig(arch="base", z_dim=256, tex_size=1024, has_encoder=False)
    root = args.workdir / f"full_base_tb{args.texel_bias_std:g}"
    fp32, int8 = bundles(root, config, args.texel_bias_std)
    say("build the FP32 and INT8 ONNX Runtime engines (with their checks)")
    fp32_record = build_engine(fp32, "onnxruntime")
    int8_record = build_engine(int8, "onnxruntime")
    peer = quantize_static_peer(fp32 / "model.onnx", root / "quantize_static.onnx",
                                root / "calib_latents.npz")  # fmt: skip
    graphs = {
        "FP32 graph (model.onnx)": fp32 / "model.onnx",
        "FP32 engine": fp32 / fp32_record.path,
        "INT8 engine": int8 / int8_record.path,
        "ORT quantize_static": peer,
    }
    feeds = smooth_clip(256, 2, seed=3).batch(0, 1)
    say(f"latency: {len(graphs)} graphs interleaved, {args.iters} iterations each")
    stats = alternating_latency(graphs, feeds, threads=args.threads, iters=args.iters, warmup=5)
    say("memory bandwidth")
    bandwidth = copy_bandwidth()
    sources = {"FP32 engine": fp32 / "model.onnx", "INT8 engine": int8 / "model.onnx"}
    floors = {k: floor_bytes(graphs[k], s) for k, s in sources.items()}
    say("per-node profiles")
    profiles = {}
    for label in ("INT8 engine", "FP32 engine"):
        rows = profile_nodes(graphs[label], feeds, threads=args.threads, iters=args.profile_iters)
        profiles[label] = {"by_op": time_by_op(rows), "nodes": [r.to_dict() for r in rows]}
    return {
        "model": {
            "arch": "base",
            "z_dim": 256,
            "tex_size": 1024,
            "n_vertices": 7306,
            "texel_bias_std": args.texel_bias_std,
        },  # fmt: skip
        "threads": args.threads,
        "iters": args.iters,
        "latency": {k: v.to_dict() if hasattr(v, "to_dict") else vars(v) for k, v in stats.items()},
        "p50_ms": {k: v.p50_ms for k, v in stats.items()},
        "p90_ms": {k: v.p90_ms for k, v in stats.items()},
        "size_bytes": {k: Path(p).stat().st_size for k, p in graphs.items()},
        "bandwidth_gb_s": bandwidth,
        "floor_bytes": floors,
        "int8_check": _check_dict(int8_record),
        "int8_layers": [dataclasses.asdict(layer) for layer in int8_record.rewrite.layers],
        "int8_optimized_ops": int8_record.optimized_ops,
        "fp32_optimized_ops": fp32_record.optimized_ops,
        "profiles": profiles,
    }


def _db(value: float | str) -> str:
    value = float(value)
    return "inf" if math.isinf(value) else f"{value:.1f} dB"


def _check_dict(record) -> dict:  # noqa: ANN001 - an OnnxRuntimeEngineRecord
    """The build check of an ONNX Runtime engine record as the plain dict this script
    writes: the comparison with the exact evaluation, and with ORT's float evaluation."""
    check = dataclasses.asdict(record.check)
    check["vs_float_evaluation"] = dataclasses.asdict(record.float_evaluation)
    return check


def latency_markdown(r: dict, env: dict, command: str) -> tuple[str, str]:
    """(block for benchmarks.md section 3, block for engines.md)."""
    fp32 = r["p50_ms"]["FP32 engine"]
    fp32_size = r["size_bytes"]["FP32 engine"]
    rows = ["| graph | p50 ms | p90 ms | x FP32 engine | file MB | x FP32 engine |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for label, p50 in r["p50_ms"].items():
        size = r["size_bytes"][label]
        rows.append(
            f"| {label} | {p50:.1f} | {r['p90_ms'][label]:.1f} | {p50 / fp32:.2f} | "
            f"{size / 1e6:.1f} | {size / fp32_size:.2f} |"
        )
    bw = r["bandwidth_gb_s"]
    floor_rows = ["| engine | initializers MB | activations MB | outputs MB | total MB | floor ms |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
    for label, f in r["floor_bytes"].items():
        floor_rows.append(
            f"| {label} | {f['weights'] / 1e6:.1f} | {f['activations'] / 1e6:.1f} | "
            f"{f['outputs'] / 1e6:.1f} | {f['total'] / 1e6:.1f} | {f['total'] / bw / 1e6:.2f} |"
        )
    check = r["int8_check"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    head = (
        f"Measured {datetime.date.today().isoformat()} on {env['cpu']} ({env['cpu_count']} "
        f"CPUs; {', '.join(_cpu_flags())}); {versions}. Command: `{command}`. Model: "
        f"Multiface-initialized `base` DAM, z 256, texture 1024^2, 7306 vertices, texel biases "
        f"N(0, {r['model']['texel_bias_std']}^2); batch 1, {r['threads']} intra-op threads, "
        f"{r['iters']} interleaved iterations per graph."
    )
    bench = "\n".join([
        head, "", *rows, "",
        f"Copy bandwidth (numpy.copyto, 256 MiB float32, one thread, read + write): {bw:.1f} GB/s.",
        "", *floor_rows, "",
        f"INT8 engine vs the exact evaluation of its model.onnx (build check, "
        f"{check['inputs']}): worst frame {_db(check['texture_psnr_min_db'])}; vs ONNX "
        f"Runtime's float evaluation of the same model.onnx: worst frame "
        f"{_db(check['vs_float_evaluation']['texture_psnr_min_db'])}.",
    ])  # fmt: skip
    prof = [head, ""]
    for label, p in r["profiles"].items():
        total = sum(p["by_op"].values())
        prof += [f"{label}: sum of node medians {total:.1f} ms; by operator: "
                 + ", ".join(f"{op} {ms:.1f}" for op, ms in list(p["by_op"].items())[:10]) + ".", "",
                 "| node | op | median ms |", "|---|---|---|"]  # fmt: skip
        prof += [f"| `{n['node'][:70]}` | {n['op']} | {n['median_ms']:.2f} |"
                 for n in p["nodes"][:12]]  # fmt: skip
        prof.append("")
    return bench, "\n".join(prof)


# --------------------------------------------------------------------------- exactness run


def flip_counts(model_path: Path, z: np.ndarray, view: np.ndarray) -> list[tuple[str, int, int]]:
    """Per QuantizeLinear of model.onnx: (its output, values, frames x values where ONNX
    Runtime's float evaluation and the exact evaluation disagree), decoding frame by frame."""
    import onnxruntime as ort

    from avatarq.export.ort_rewrite import EXACT_DISABLED_OPTIMIZERS, exact_reference

    plain = onnx.load(str(model_path))
    exact, _ = exact_reference(plain)
    names = [n.output[0] for n in plain.graph.node if n.op_type == "QuantizeLinear"]
    for model in (plain, exact):
        for name in names:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sessions = [
        ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=list(EXACT_DISABLED_OPTIMIZERS) if m is exact else [])
        for m in (plain, exact)
    ]  # fmt: skip
    counts = np.zeros(len(names), np.int64)
    sizes = [0] * len(names)
    for i in range(len(z)):
        feed = {"z": z[i : i + 1], "view": view[i : i + 1]}
        a, b = (s.run(names, feed) for s in sessions)
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            counts[k] += int(np.sum(x != y))
            sizes[k] = x.size
    return [(n, s, int(c)) for n, s, c in zip(names, sizes, counts, strict=True)]


def exactness_run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for tex in (512, 1024):
        for arch in ARCHS:
            config = DAMConfig(arch=arch, z_dim=256, tex_size=tex, has_encoder=False)
            try:
                _, int8 = bundles(args.workdir / f"{arch}_{tex}", config, args.texel_bias_std)
                record = build_engine(int8, "onnxruntime")
            except Exception as exc:  # a failing arch is reported, the others still run
                rows.append({"model": f"{arch} {tex}", "error": str(exc).splitlines()[0]})
                continue
            rows.append(_exact_row(f"{arch} {tex} (Multiface init)", record))
            if arch == "base":
                clip = check_clip(open_bundle(int8), onnx.load(str(int8 / "model.onnx")), None)
                rows[-1]["flips"] = flip_counts(int8 / "model.onnx", clip.z, clip.view)
            say(f"{arch} {tex}: {rows[-1]}")
    rows.append(_demo_row(args))
    return rows


def _exact_row(label: str, record) -> dict:
    check = _check_dict(record)
    modes = [layer.mode for layer in record.rewrite.layers]
    return {
        "model": label,
        "inputs": check["inputs"],
        "vs_exact_min_db": check["texture_psnr_min_db"],
        "vs_float_min_db": check["vs_float_evaluation"]["texture_psnr_min_db"],
        "int8_layers": f"{modes.count('int8')}/{len(modes)}",
        "passed": check["passed"],
    }


def _demo_row(args: argparse.Namespace) -> dict:
    """The trained demo avatar (`avatarq synth`): INT8 export calibrated on its capture,
    the engine checked on the encoder's codes of one capture segment, in order."""
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import encode_frames
    from avatarq.data.latents import save_inputs
    from avatarq.data.synthetic import make_synthetic_avatar
    from avatarq.engines import BuildOptions
    from avatarq.models import load_checkpoint

    avatar = make_synthetic_avatar(args.workdir / "synth_demo", say=say)
    bundle = args.workdir / "demo_int8.avq"
    if not bundle.exists():
        say("export the demo avatar as INT8 (calibrated on its capture)")
        export_bundle(avatar.checkpoint, bundle, avatar.capture_root, ExportOptions(int8=True))
    capture = MultifaceCapture(avatar.capture_root)
    segment, frames = next(capture.clips())
    model = load_checkpoint(avatar.checkpoint)
    z = encode_frames(model, capture, [(segment, f) for f in frames]).numpy()
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (len(z), 1))
    latents = save_inputs(DecoderInputs.from_z_view(z, view), args.workdir / "demo_codes.npz")
    record = build_engine(bundle, "onnxruntime", BuildOptions(calibration_latents=str(latents)))
    row = _exact_row("demo avatar (trained, texture 256, z 64)", record)
    row["inputs"] = f"encoder codes of capture segment {segment}, {len(z)} frames in order"
    return row


def exactness_markdown(rows: list[dict], env: dict, command: str) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"Measured {datetime.date.today().isoformat()} on {env['cpu']}; {versions}. "
        f"Command: `{command}`. Each INT8 bundle: max calibration on a smooth N(0, 1) latent "
        "clip; the build check decodes its default clip (32 frames, smooth, spread like the "
        "calibrated codes) unless stated.",
        "",
        "| model | INT8 engine vs exact evaluation of model.onnx, worst frame | INT8 engine vs ONNX Runtime's float evaluation of model.onnx, worst frame | integer layers | check |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | export failed: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['model']} | {_db(r['vs_exact_min_db'])} | {_db(r['vs_float_min_db'])} | "
            f"{r['int8_layers']} | {'passed' if r['passed'] else 'FAILED'} |"
        )
    for r in rows:
        if r.get("flips"):
            lines += [
                "",
                f"{r['model']}: 8-bit values where ONNX Runtime's float evaluation of model.onnx "
                "and the exact evaluation disagree, summed over the 32 frames of the check clip, "
                "per quantized tensor in graph order (values per frame in brackets): "
                + ", ".join(f"{c} [{s}]" for _, s, c in r["flips"])
                + ".",
            ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def replace_block(text: str, key: str, block: str) -> str:
    """``text`` with the lines between ``<!-- ort-int8:KEY:begin -->`` and its end marker
    replaced by ``block`` (appended when there is no such block)."""
    begin, end = f"<!-- ort-int8:{key}:begin -->", f"<!-- ort-int8:{key}:end -->"
    new = f"{begin}\n{block.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        return pattern.sub(lambda _m: new, text)
    return text.rstrip("\n") + "\n\n" + new + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("out/bench/ort_int8"))
    parser.add_argument("--exactness", action="store_true", help="archs x sizes + demo avatar")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--profile-iters", type=int, default=20)
    parser.add_argument("--texel-bias-std", type=float, default=0.1)
    parser.add_argument("--docs", action="store_true", help="update docs/benchmarks.md, engines.md")
    args = parser.parse_args(argv)
    docs = Path(__file__).resolve().parent.parent / "docs"
    env = environment()
    command = "python benchmarks/ort_int8.py " + " ".join(a for a in sys.argv[1:] if a)
    command = command.strip()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.exactness:
        rows = exactness_run(args)
        (args.workdir / "exactness.json").write_text(json.dumps(rows, indent=2))
        block = exactness_markdown(rows, env, command)
        print(block)
        if args.docs:
            path = docs / "benchmarks.md"
            path.write_text(replace_block(path.read_text(), "exactness", block))
        return 0
    result = latency_run(args)
    (args.workdir / "latency.json").write_text(json.dumps(result, indent=2, default=str))
    bench, profile = latency_markdown(result, env, command)
    print(bench)
    print(profile)
    if args.docs:
        tag = f"tb{args.texel_bias_std:g}"
        blocks = (
            ("benchmarks.md", f"latency-{tag}", bench),
            ("engines.md", f"profile-{tag}", profile),
        )
        for name, key, block in blocks:
            path = docs / name
            path.write_text(replace_block(path.read_text(), key, block))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
