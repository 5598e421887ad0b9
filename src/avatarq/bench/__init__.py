"""avatarq.bench: play an ordered sequence through the FP32 reference and the deployed
runners, measure latency, fidelity and temporal stability, gate, and report.

    from avatarq.bench import BenchConfig, bench_bundle
    result, paths = bench_bundle("dam.avq", config=BenchConfig(gates=("psnr>=40",)), out="report/")
    raise SystemExit(result.exit_code)

Modules: `metrics` (PSNR, SSIM, tDE, J, FE, gates), `latency` (timing), `sequences`
(what is played), `harness` (the run), `results` (config and result records), `report`
(report.json and report.html). Nothing heavy (torch, ONNX Runtime, matplotlib) is imported
until a benchmark runs.
"""

from avatarq.bench.harness import bench_bundle, default_runners, open_reference, run_bench
from avatarq.bench.report import load_report, write_report
from avatarq.bench.results import BenchConfig, BenchResult, FrameStrip, RunnerResult
from avatarq.bench.sequences import BenchSequence, load_sequence

__all__ = [
    "BenchConfig",
    "BenchResult",
    "BenchSequence",
    "FrameStrip",
    "RunnerResult",
    "bench_bundle",
    "default_runners",
    "load_report",
    "load_sequence",
    "open_reference",
    "run_bench",
    "write_report",
]
