"""`AvatarRuntime`: open a bundle, decode (thread-safe), render, clear errors; the
embedding example runs."""

import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from avatarq.engines import build_engine
from avatarq.errors import AvatarqError
from avatarq.render import RenderConfig, Renderer, Topology
from avatarq.runtime import AvatarRuntime
from tiny_dam import export_tiny_dam

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "embed_frame_loop.py"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """A random tiny DAM bundle (z 16, texture 64, 30 vertices) with a strip topology and
    no engine built."""
    root = tmp_path_factory.mktemp("runtime")
    export_tiny_dam(root, "dam.avq")
    faces = np.array([[i, i + 1, i + 2] for i in range(28)], np.int32)
    uvs = np.stack([np.linspace(0, 1, 30), np.linspace(1, 0, 30)], 1).astype(np.float32)
    Topology(faces, faces, uvs).save(root / "dam.avq" / "topology.npz")
    return root / "dam.avq"


@pytest.fixture(scope="module")
def built(plain, tmp_path_factory):
    bundle = shutil.copytree(plain, tmp_path_factory.mktemp("built") / "dam.avq")
    build_engine(bundle, "onnxruntime")
    return bundle


def _inputs(batch=1, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((batch, 16)).astype(np.float32)
    view = np.tile(np.array([[0.0, 0.0, 1.0]], np.float32), (batch, 1))
    return z, view


def test_auto_picks_the_built_engine(built):
    with AvatarRuntime.open(built) as avatar:
        assert avatar.backend == "onnxruntime"


def test_auto_without_an_engine_runs_model_onnx(plain):
    with AvatarRuntime.open(plain) as avatar:
        assert avatar.backend == "onnx"


def test_decode_returns_copies_by_default(built):
    with AvatarRuntime.open(built) as avatar:
        first, _ = avatar.decode(*_inputs(seed=1))
        second, _ = avatar.decode(*_inputs(seed=2))
        assert not np.shares_memory(first, second)
        assert not np.array_equal(first, second)


def test_decode_without_copy_returns_the_runner_buffers(built):
    with AvatarRuntime.open(built) as avatar:
        first, _ = avatar.decode(*_inputs(seed=1), copy=False)
        second, _ = avatar.decode(*_inputs(seed=2), copy=False)
        assert np.shares_memory(first, second)


def test_concurrent_decodes_give_the_serial_results(built):
    inputs = [_inputs(seed=s) for s in range(8)]
    with AvatarRuntime.open(built, threads=1) as avatar:
        expected = [avatar.decode(z, v)[0] for z, v in inputs]
        results: dict[int, np.ndarray] = {}

        def work(i):
            for _ in range(5):
                results[i] = avatar.decode(*inputs[i])[0]

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert all(np.array_equal(results[i], expected[i]) for i in range(8))


def test_latency_summarizes_the_decode_calls(built):
    with AvatarRuntime.open(built) as avatar:
        with pytest.raises(AvatarqError, match="no decode call timed yet"):
            avatar.latency()
        for _ in range(3):
            avatar.decode(*_inputs())
        stats = avatar.latency()
    assert stats.n == 3 and stats.p50_ms > 0


def test_wrong_input_shape_is_a_user_error(built):
    z, view = _inputs()
    with (
        AvatarRuntime.open(built) as avatar,
        pytest.raises(AvatarqError, match=r"z must have shape \[batch, 16\], got \[1, 8\]"),
    ):
        avatar.decode(z[:, :8], view)


def test_closed_runtime_refuses_to_decode(built):
    avatar = AvatarRuntime.open(built)
    avatar.close()
    avatar.close()
    with pytest.raises(AvatarqError, match="closed"):
        avatar.decode(*_inputs())


def test_backend_without_its_engine_is_a_user_error(plain):
    with pytest.raises(AvatarqError, match="has no onnxruntime engine"):
        AvatarRuntime.open(plain, backend="onnxruntime")


def test_unknown_option_is_a_user_error(plain):
    with pytest.raises(AvatarqError, match=r"unknown runtime option\(s\) \['thread'\]"):
        AvatarRuntime.open(plain, thread=2)


def test_missing_bundle_is_a_user_error(tmp_path):
    with pytest.raises(AvatarqError, match="bundle not found"):
        AvatarRuntime.open(tmp_path / "nope.avq")


def test_render_draws_the_decoded_avatar_with_the_bundle_topology(built):
    z, view = _inputs()
    M = np.array([[[20.0, 0, 12, 0], [0, 20.0, 16, 0], [0, 0, 1, 4]]], np.float32)
    config = RenderConfig(resolution=(32, 24), backend="torch")
    with AvatarRuntime.open(built) as avatar:
        out = avatar.render(z, view, M, config)
        texture, vertices = avatar.decode(z, view)
    expected = Renderer(Topology.load(built / "topology.npz"), config).render(
        torch.from_numpy(vertices), torch.from_numpy(texture), torch.from_numpy(M)
    )
    assert out.image.shape == (1, 32, 24, 3) and out.mask.shape == (1, 32, 24)
    assert torch.equal(out.image, expected.image) and torch.equal(out.mask, expected.mask)


def test_embedding_example_runs_a_frame_loop(built):
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), str(built), "--frames", "5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("decoded 5 frames with onnxruntime: texture [1, 3, 64, 64]")
