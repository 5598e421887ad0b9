"""The one-shot GPU check (benchmarks/gpu): its dry run, its plan, its report, its wheels and
the measurement code, all on the CPU. On a GPU the same code takes the CUDA paths."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

GPU_DIR = Path(__file__).parents[1] / "benchmarks" / "gpu"
sys.path.insert(0, str(GPU_DIR))

import gpu_measure as measure  # noqa: E402
import gpu_plan as plan  # noqa: E402
import gpu_report as report  # noqa: E402
import gpu_wheels as wheels  # noqa: E402
import gpu_worker as worker  # noqa: E402

from avatarq.models import DAMConfig, DeployableDecoder  # noqa: E402

TINY = DAMConfig(z_dim=16, tex_size=64, n_vertices=30, n_cams=3)


# --------------------------------------------------------------------------- the dry run


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `check.py --dry-run`: (completed process, JSON document, markdown text, out)."""
    out = tmp_path_factory.mktemp("gpu-check")
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(GPU_DIR / "check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    seconds = time.monotonic() - start
    document = json.loads((out / "gpu_check.json").read_text())
    return result, document, (out / "gpu_check.md").read_text(), out, seconds


def test_the_dry_run_exits_cleanly_and_quickly(dry_run):
    result, document, _, _, seconds = dry_run
    assert result.returncode == 0, result.stderr
    assert document["dry_run"] is True and document["dry_run_reason"] == "--dry-run"
    assert document["command"] == "python benchmarks/gpu/check.py --dry-run --out OUT"
    assert seconds < 60


def test_the_dry_run_lists_every_part_in_order_each_skipped_with_its_reason(dry_run):
    parts = dry_run[1]["parts"]
    assert [p["name"] for p in parts] == list(plan.NAMES)
    statuses = {p["name"]: p["status"] for p in parts}
    assert statuses.pop("environment") == "ok"
    assert set(statuses.values()) == {"skipped"}
    reasons = {p["name"]: p["reason"] for p in parts}
    assert reasons["wheels"] == "no --wheels folder given: the machine's own packages are used"
    for name in plan.NAMES[2:]:
        assert reasons[name].startswith("dry run (--dry-run)"), name


def test_the_dry_run_says_what_each_part_would_also_need_here(dry_run):
    reasons = {p["name"]: p["reason"] for p in dry_run[1]["parts"]}
    if importlib_missing("nvdiffrast"):
        assert "nvdiffrast is not installed" in reasons["nvdiffrast-build"]
    if importlib_missing("tensorrt"):
        assert "tensorrt is not installed" in reasons["tensorrt"]
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "has no CUDA provider" in reasons["ort-cuda"]


def importlib_missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def test_the_dry_run_records_the_machine_and_versions(dry_run):
    document = dry_run[1]
    assert document["gpu"]["available"] is torch.cuda.is_available()
    assert document["versions"]["torch"] == torch.__version__
    assert document["machine"]["cpu_count"] >= 1
    assert set(document["toolchain"]) >= {"nvcc", "ninja", "cxx", "missing"}


def test_the_dry_run_collects_the_gpu_marked_tests_it_would_run(dry_run):
    pytest_part = next(p for p in dry_run[1]["parts"] if p["name"] == "pytest-gpu")
    would_run = pytest_part["results"]["would_run"]
    marked = {
        f"tests/{path.name}"
        for path in Path(__file__).parent.glob("test_*.py")
        if "@pytest.mark.gpu" in path.read_text() and path.name != Path(__file__).name
    }
    assert marked and {test.split("::")[0] for test in would_run} == marked


def test_the_dry_run_markdown_renders_as_section_5_with_every_part(dry_run):
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark").enable("table").render(dry_run[2])
    assert "<h2>5. GPU</h2>" in html
    assert "<strong>No GPU numbers have been recorded yet.</strong>" in html
    rows = html.split("<tbody>")[1].split("</tbody>")[0].count("<tr>")
    assert rows == len(plan.NAMES)
    for name in plan.NAMES:
        assert f"<td>{name}</td>" in html


def test_the_dry_run_log_holds_each_part_and_the_environment_probe_output(dry_run):
    log = (dry_run[3] / "gpu_check.log").read_text()
    for name in plan.NAMES:
        assert f"] {name}: " in log
    assert "===== environment =====" in log


def test_unknown_parts_are_refused_with_one_line(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(GPU_DIR / "check.py"),
            "--parts",
            "torch-decode,warp",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "--parts: unknown warp" in result.stderr
    assert not (tmp_path / "gpu_check.json").exists()


# --------------------------------------------------------------------------- the plan


def hopper_env(providers=("CPUExecutionProvider",), tensorrt=False) -> dict:
    """An environment record as the probe writes it on an H200 without TensorRT."""
    return {
        "gpu": {
            "available": True,
            "capability": "9.0",
            "tensorrt_rtx": worker.rtx_support((9, 0), "NVIDIA H200"),
        },
        "modules": {
            "onnxruntime": {"installed": True, "importable": True, "version": "1.31.1",
                            "providers": list(providers)},
            "tensorrt": {"installed": tensorrt, "importable": tensorrt},
            "tensorrt_rtx": {"installed": True, "importable": True, "version": "1.7.1.116"},
            "nvdiffrast": {"installed": True, "importable": True, "version": "0.3.3.1"},
        },
        "toolchain": {"missing": []},
    }  # fmt: skip


def spec(name: str) -> plan.PartSpec:
    return next(p for p in plan.PARTS if p.name == name)


def test_tensorrt_rtx_is_skipped_on_hopper_with_the_reason():
    reason = plan.skip_reason(spec("tensorrt-rtx"), hopper_env(), {}, plan.NAMES, None)
    assert reason.startswith(
        "TensorRT-RTX does not run on compute capability 9.0 (Hopper), this NVIDIA H200: "
        "it supports sm75, sm80, sm86, sm89, sm120, sm121"
    )


@pytest.mark.parametrize("capability", [(8, 6), (8, 9), (12, 0)])
def test_tensorrt_rtx_runs_on_rtx_class_gpus(capability):
    assert worker.rtx_support(capability, "GPU") == {"runs": True, "reason": ""}


def test_a_real_run_is_one_with_cuda_and_no_dry_run_flag():
    assert plan.dry_run_reason(False, hopper_env()) is None
    assert plan.dry_run_reason(True, hopper_env()) == "--dry-run"
    no_gpu = {
        "gpu": {
            "available": False,
            "why": "torch 2.13.0+cpu (a CPU-only build) sees no CUDA device",
        }
    }
    assert plan.dry_run_reason(False, no_gpu) == (
        "no CUDA here: torch 2.13.0+cpu (a CPU-only build) sees no CUDA device"
    )


def test_the_render_part_waits_for_the_plugin_build():
    failed = {"nvdiffrast-build": {"status": "failed"}}
    reason = plan.skip_reason(spec("nvdiffrast-render"), hopper_env(), failed, plan.NAMES, None)
    assert reason == "part nvdiffrast-build failed"
    built = {"nvdiffrast-build": {"status": "ok"}}
    assert (
        plan.skip_reason(spec("nvdiffrast-render"), hopper_env(), built, plan.NAMES, None) is None
    )


def test_bundles_are_made_only_when_a_part_would_use_them():
    reason = plan.skip_reason(spec("bundles"), hopper_env(), {}, plan.NAMES, None)
    assert reason.startswith("no part that uses the bundles can run here (ort-cuda: onnxruntime")
    assert "tensorrt: tensorrt is not installed" in reason
    assert "tensorrt-rtx: TensorRT-RTX does not run" in reason
    with_provider = hopper_env(providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    assert plan.skip_reason(spec("bundles"), with_provider, {}, plan.NAMES, None) is None


def test_a_part_left_out_of_parts_says_so():
    reason = plan.skip_reason(spec("tensorrt"), hopper_env(), {}, ("torch-decode",), None)
    assert reason == "not selected (--parts)"


def test_the_nvdiffrast_build_names_missing_tools():
    env = hopper_env()
    env["toolchain"]["missing"] = ["ninja (pip install ninja, or the system package)"]
    reason = plan.skip_reason(spec("nvdiffrast-build"), env, {}, plan.NAMES, None)
    assert reason == "the JIT build lacks ninja (pip install ninja, or the system package)"


def test_the_budgets_of_every_part_fit_one_device_session():
    assert plan.TOTAL_BUDGET_S < 8 * 60
    assert all(p.budget_s <= plan.TOTAL_BUDGET_S for p in plan.PARTS)


# --------------------------------------------------------------------------- the report


def test_the_docs_block_is_replaced_between_its_markers_only(dry_run):
    text = f"# B\n\nbefore\n{report.BEGIN}\nold numbers\n{report.END}\nafter\n"
    new = report.replace_block(text, dry_run[1])
    assert new.startswith("# B\n\nbefore\n" + report.BEGIN + "\n**No GPU numbers")
    assert new.endswith(report.END + "\nafter\n")
    assert "old numbers" not in new
    with pytest.raises(ValueError, match="no <!-- gpu-check:begin -->"):
        report.replace_block("# B\n", dry_run[1])


def test_docs_section_5_holds_the_gpu_check_block():
    docs = (Path(__file__).parents[1] / "docs" / "benchmarks.md").read_text()
    section = docs.split("## 5. GPU")[1].split("\n## 6.")[0]
    assert report.BEGIN in section and report.END in section
    assert "No GPU numbers have been recorded yet" in section


def test_measured_rows_render_into_the_latency_table(dry_run):
    decoder = DeployableDecoder(measure.decoder_model(TINY))
    rows = measure.torch_decode_rows(
        decoder, torch.device("cpu"), (1, 2), ("fp32",), FAST, measure.Deadline(60)
    )
    document = json.loads(json.dumps(dry_run[1]))
    document["dry_run"], document["dry_run_reason"] = False, None
    part = next(p for p in document["parts"] if p["name"] == "torch-decode")
    part.update(status="ok", reason="", results={"rows": rows})
    text = report.section_markdown(document)
    assert "### Decoder latency" in text
    table = [ln for ln in text.splitlines() if ln.startswith("| torch | fp32 | eager | device |")]
    assert len(table) == 2
    assert f"| {rows[0]['p50_ms']:.3f} |" in table[0]


def test_json_has_no_bare_infinities():
    assert report.dumps({"psnr": float("inf"), "x": [float("nan")]}) == (
        '{\n  "psnr": "Infinity",\n  "x": [\n    "NaN"\n  ]\n}\n'
    )


# --------------------------------------------------------------------------- wheels


def make_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any") -> Path:
    """A minimal real wheel holding one module ``{name}_probe`` with ``VALUE = 42``."""
    module = f"{name}_probe"
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": "VALUE = 42\n",
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n",
    }
    files[f"{dist_info}/RECORD"] = (
        "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    )
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_wheels_install_offline_into_the_private_folder(tmp_path):
    (tmp_path / "w").mkdir()
    make_wheel(tmp_path / "w", "gpucheckdemo", "1.0")
    record = wheels.install(tmp_path / "w", tmp_path / "site", timeout=120)
    assert record["status"] == "ok", record
    assert record["results"]["wheels"][0]["installed"] is True
    probe = subprocess.run(
        [sys.executable, "-c", "import gpucheckdemo_probe as m; print(m.VALUE)"],
        env={"PYTHONPATH": str(tmp_path / "site")},
        capture_output=True,
        text=True,
    )
    assert probe.stdout.strip() == "42"


def test_sdists_wheels_for_another_platform_and_double_versions_are_left_out(tmp_path):
    make_wheel(tmp_path, "alpha", "1.0")
    make_wheel(tmp_path, "beta", "1.0")
    make_wheel(tmp_path, "beta", "2.0")
    make_wheel(tmp_path, "gamma", "1.0", "cp27-cp27m-win32")
    (tmp_path / "delta-1.0.tar.gz").write_bytes(b"")
    install, skipped = wheels.plan_install(tmp_path)
    assert [w.name for w in install] == ["alpha-1.0-py3-none-any.whl"]
    reasons = {s["file"]: s["reason"] for s in skipped}
    assert reasons["gamma-1.0-cp27-cp27m-win32.whl"] == "built for another Python or platform"
    assert reasons["beta-2.0-py3-none-any.whl"].startswith("2 versions of beta")
    assert reasons["delta-1.0.tar.gz"].startswith("not a wheel")


def test_a_dry_run_only_says_which_wheels_it_would_install(tmp_path):
    make_wheel(tmp_path, "alpha", "1.0")
    record = wheels.install(tmp_path, tmp_path / "site", timeout=60, dry_run=True)
    assert record["status"] == "skipped"
    assert record["reason"].startswith("dry run: would install 1 wheels (0.0 MiB): alpha-1.0")
    assert not (tmp_path / "site").exists()


def test_fetching_pins_each_distribution_for_the_target_python():
    commands = wheels.fetch_commands(Path("W"), ["nvdiffrast", "tensorrt-rtx"], "3.12", "py")
    assert commands[0][:3] == ["py", "-m", "pip"] and commands[0][3] == "download"
    assert commands[0][-1] == "diffrp-nvdiffrast==0.3.3.1"
    assert commands[0][commands[0].index("--python-version") + 1] == "3.12"
    assert "--only-binary=:all:" in commands[0] and "--no-deps" in commands[0]
    built = [c[-1] for c in commands if c[3] == "wheel"]
    assert built == ["tensorrt-rtx==1.7.1.116", "tensorrt-rtx-cu13==1.7.1.116"]
    assert [c[-1] for c in commands if c[3] == "download"][1:] == [
        "tensorrt-rtx-cu13-bindings==1.7.1.116",
        "tensorrt-rtx-cu13-libs==1.7.1.116",
    ]
    with pytest.raises(ValueError, match="unknown package"):
        wheels.fetch_commands(Path("W"), ["tensorflow"], "3.12")


# --------------------------------------------------------------------------- measurement

FAST = measure.Timing(warmup=1, iters=5, min_iters=3, seconds=0.5)


def test_measurement_cuts_iterations_to_its_time_budget():
    timing = measure.Timing(warmup=0, iters=100, min_iters=4, seconds=0.2)
    samples = measure.measure(lambda: time.sleep(0.02), torch.device("cpu"), timing)
    assert 4 <= len(samples) <= 10
    assert min(samples) >= 20.0


def test_torch_decode_rows_time_each_precision_and_batch_on_the_cpu():
    decoder = DeployableDecoder(measure.decoder_model(TINY))
    rows = measure.torch_decode_rows(
        decoder, torch.device("cpu"), (1, 3), ("fp32",), FAST, measure.Deadline(60)
    )
    assert [(r["precision"], r["mode"], r["batch"]) for r in rows] == [
        ("fp32", "eager", 1),
        ("fp32", "eager", 3),
    ]
    for row in rows:
        assert row["io"] == "device" and row["clock"] == "wall"
        assert 3 <= row["n"] <= 5
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]


def test_a_spent_budget_skips_steps_with_the_reason():
    decoder = DeployableDecoder(measure.decoder_model(TINY))
    rows = measure.torch_decode_rows(
        decoder, torch.device("cpu"), (1,), ("fp32",), FAST, measure.Deadline(0)
    )
    assert rows == [
        {
            "mode": "eager",
            "runtime": "torch",
            "precision": "fp32",
            "io": "device",
            "clock": "wall",
            "batch": 1,
            "skipped": "part budget spent (0 s left, this step needs ~5 s)",
        }
    ]


def test_the_render_scene_is_a_multiface_sized_head_in_frame():
    scene = measure.head_scene(resolution=(256, 167))
    assert scene.vertices.shape == (7306, 3)
    assert scene.topology.n_vertices == 7306
    from avatarq.render import RenderConfig, Renderer

    renderer = Renderer(scene.topology, RenderConfig(resolution=(256, 167), backend="torch"))
    u_ramp = torch.linspace(0, 1, 64).expand(1, 3, 64, 64).contiguous()
    out = renderer.render(
        torch.from_numpy(scene.vertices)[None], u_ramp, torch.from_numpy(scene.M)[None]
    )
    coverage = float(out.mask.mean())
    assert 0.2 < coverage < 0.5
    centre = float(out.image[0, 128, 83, 0])  # the face's centre: u = 0.5, the seam is behind
    assert abs(centre - 0.5) < 0.02


def test_render_rows_time_rasterize_and_render_with_the_torch_backend():
    scene = measure.head_scene(resolution=(64, 42))
    rows = measure.render_rows(
        scene, "torch", torch.device("cpu"), (1, 2), 32, FAST, measure.Deadline(60)
    )
    assert [(r["mode"], r["batch"]) for r in rows] == [
        ("rasterize", 1),
        ("render", 1),
        ("rasterize", 2),
        ("render", 2),
    ]
    assert all(0 < r["coverage"] < 1 and r["p50_ms"] > 0 for r in rows)


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    from avatarq.export import ExportOptions, export_bundle
    from avatarq.models import save_checkpoint

    root = tmp_path_factory.mktemp("tiny-gpu-check")
    save_checkpoint(measure.decoder_model(TINY), root / "dam.pt")
    export_bundle(root / "dam.pt", root / "dam.avq", options=ExportOptions(max_batch=8))
    return root / "dam.avq"


def test_ort_device_io_runs_the_graph_on_bound_buffers(tiny_bundle):
    from avatarq.core.ort import make_session

    session = make_session(tiny_bundle / "model.onnx", "cpu")
    z, view = measure.decoder_inputs(TINY, 2)
    run = measure.ort_device_io(session, {"z": z, "view": view}, "cpu")
    samples = measure.measure(run, torch.device("cpu"), FAST)
    assert 3 <= len(samples) <= 5


def test_runner_rows_carry_the_fidelity_and_are_emitted_as_they_come(tiny_bundle):
    from avatarq.engines import RunOptions, open_runner

    z, view = measure.decoder_inputs(TINY, 1)
    with open_runner(tiny_bundle, "onnx", RunOptions(device="cpu")) as runner:
        reference = runner.decode(z, view)[0].copy()
        labels = {"runtime": "onnx", "precision": "fp32", "mode": "model.onnx"}
        emitted = []
        rows = measure.runner_rows(
            runner, TINY, (1, 2), torch.device("cpu"), FAST, measure.Deadline(60), labels,
            reference, emitted.append,
        )  # fmt: skip
    assert emitted == rows
    assert [r["batch"] for r in rows] == [1, 2]
    assert rows[0]["psnr_vs_reference_db"] == float("inf")
    assert "psnr_vs_reference_db" not in rows[1]
    assert all(r["io"] == "host" for r in rows)


def test_psnr_uses_the_reference_range_as_peak():
    reference = np.array([0.0, 10.0])
    assert measure.psnr_db(reference + 0.1, reference) == pytest.approx(40.0)


# --------------------------------------------------------------------------- pytest's report


def test_junit_reports_become_counts_and_named_outcomes(tmp_path):
    sys.path.insert(0, str(GPU_DIR))
    import check

    (tmp_path / "test_demo.py").write_text(
        "import pytest\n"
        "def test_ok():\n    pass\n"
        "def test_bad():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='needs CUDA')\ndef test_gpu():\n    pass\n"
    )
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml",
         str(tmp_path / "r.xml"), str(tmp_path / "test_demo.py")],
        capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    parsed = check.parse_junit(tmp_path / "r.xml")
    assert parsed["summary"] == {"tests": 3, "passed": 1, "failed": 1, "errors": 0, "skipped": 1}
    outcomes = {t["test"].split("::")[1]: (t["outcome"], t["message"]) for t in parsed["tests"]}
    assert outcomes["test_gpu"] == ("skipped", "needs CUDA")
    assert outcomes["test_bad"][0] == "failed"
    assert outcomes["test_bad"][1].startswith("AssertionError: one is not two")


# --------------------------------------------------------------------------- the runner


def make_check(tmp_path, *argv):
    import check

    args = check.parse_args(["--out", str(tmp_path / "out"), *argv])
    args.out.mkdir(parents=True)
    return check.Check(args, tmp_path / "work")


def test_a_part_runs_in_its_own_process_and_returns_its_record(tmp_path):
    runner = make_check(tmp_path)
    record = runner.run_worker(spec("environment"), 120.0)
    assert record["status"] == "ok", record
    assert record["results"]["versions"]["torch"] == torch.__version__
    assert (tmp_path / "work" / "logs" / "environment.log").is_file()


def test_a_part_that_outlives_its_budget_is_killed_and_marked_timed_out(tmp_path):
    runner = make_check(tmp_path)
    start = time.monotonic()
    record = runner.run_worker(spec("environment"), 0.3)
    assert time.monotonic() - start < 10
    assert record["status"] == "timed_out"
    assert record["reason"] == "killed at its 0.3 s budget; results so far kept"


def test_no_part_starts_once_the_global_deadline_is_near(tmp_path):
    runner = make_check(tmp_path, "--budget", "30")
    assert runner.part_timeout(spec("torch-decode")) == pytest.approx(30 - plan.RESERVE_S, abs=1)
    runner.deadline = time.monotonic() + 15
    assert runner.part_timeout(spec("torch-decode")) == (
        "global deadline: 7 s left of the 30 s budget (--budget)"
    )
