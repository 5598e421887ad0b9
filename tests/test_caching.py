"""Neural-Caching low-latency mode: cache and warp networks, distillation, the bundle's two
graphs, the runtime's refresh and alternate streams, bench, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from avatarq.cli import main
from avatarq.core.inputs import smooth_clip
from avatarq.data.latents import save_inputs
from avatarq.errors import AvatarqError
from avatarq.export import open_bundle
from avatarq.export.caching import attach_caching, decoder_of_bundle
from avatarq.models.caching import CacheNetwork, WarpConfig, WarpNetwork
from avatarq.runtime import CachingRuntime
from avatarq.workflows.caching import (
    DistillConfig,
    distill_warp,
    load_warp_file,
    save_warp_file,
    weights_sha256,
)
from tiny_dam import export_tiny_dam

FAST = DistillConfig(steps=3, batch=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(bundle, dam.pt, clip.npz): the tiny random DAM (z 16, texture 64), its FP32 bundle
    and a 12-frame ordered latent clip."""
    root = tmp_path_factory.mktemp("caching")
    bundle, checkpoint = export_tiny_dam(root)
    save_inputs(smooth_clip(16, 12, seed=3), root / "clip.npz")
    return bundle, checkpoint, root / "clip.npz"


@pytest.fixture(scope="module")
def cached_bundle(tiny, tmp_path_factory) -> tuple[Path, CacheNetwork, WarpNetwork]:
    """A copy of the tiny bundle with caching graphs of a warp network whose output conv
    is random (so the warp really changes the texture), refresh every 3 frames."""
    bundle, checkpoint, _ = tiny
    out = tmp_path_factory.mktemp("cached") / "dam.avq"
    shutil.copytree(bundle, out)
    decoder = decoder_of_bundle(open_bundle(out), checkpoint)
    cache = CacheNetwork(decoder, 1)
    torch.manual_seed(5)
    warp = WarpNetwork(cache, WarpConfig())
    with torch.no_grad():
        warp.conv_out.weight.normal_(0, 0.5)
    attach_caching(out, cache, warp, weights_sha256(warp), {"final_loss": 0.0}, refresh_every=3)
    return out, cache, warp


def _decoder(tiny):
    bundle, checkpoint, _ = tiny
    return decoder_of_bundle(open_bundle(bundle), checkpoint)


def _np(*tensors):
    return [t.detach().numpy() for t in tensors]


# ----------------------------------------------------------------------------- networks


def test_cache_network_outputs_the_full_decoder_and_its_features_at_a_quarter(tiny):
    decoder = _decoder(tiny)
    cache = CacheNetwork(decoder, 1)
    z, view = torch.randn(2, 16), torch.tensor([[0.0, 0.0, 1.0]] * 2)
    with torch.no_grad():
        texture, vertices, features = cache(z, view)
        ref_texture, ref_vertices = decoder(z, view)
    assert torch.equal(texture, ref_texture) and torch.equal(vertices, ref_vertices)
    assert list(features.shape) == [2, cache.feature_channels, 16, 16]


def test_a_fresh_warp_network_returns_the_cached_texture_and_the_exact_mesh(tiny):
    decoder = _decoder(tiny)
    cache = CacheNetwork(decoder, 1)
    warp = WarpNetwork(cache, WarpConfig())
    z_ref, z = torch.randn(1, 16), torch.randn(1, 16)
    view = torch.tensor([[0.0, 0.0, 1.0]])
    with torch.no_grad():
        tex_ref, _, features = cache(z_ref, view)
        texture, vertices = warp(features, tex_ref, z_ref, view, z, view)
        _, ref_vertices = decoder(z, view)
    assert torch.equal(texture, tex_ref)
    torch.testing.assert_close(vertices, ref_vertices, rtol=0, atol=1e-6)


def test_cache_blocks_beyond_the_decoder_is_one_line_error(tiny):
    with pytest.raises(
        AvatarqError, match=r"cache_blocks must be in 1\.\.1 for this decoder, got 2"
    ):
        WarpConfig(cache_blocks=2).resolved_blocks(_decoder(tiny).config.n_tex_blocks)


def test_more_up_stages_than_the_texture_allows_is_one_line_error(tiny):
    cache = CacheNetwork(_decoder(tiny), 1)
    with pytest.raises(AvatarqError, match="up_stages must be at most 2 .* got 3"):
        WarpNetwork(cache, WarpConfig(up_stages=3))


# ----------------------------------------------------------------------------- distillation


@pytest.mark.slow
def test_distillation_beats_the_cached_frame_on_the_trained_avatar(small_avatar):
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization
    from avatarq.models import DeployableDecoder, load_checkpoint
    from avatarq.workflows.caching import capture_clips

    model = load_checkpoint(small_avatar.checkpoint)
    normalization = capture_normalization(MultifaceCapture(small_avatar.capture_root))
    decoder = DeployableDecoder(model, normalization)
    clips = capture_clips(model, small_avatar.capture_root)
    _, report = distill_warp(decoder, clips, WarpConfig(), DistillConfig(steps=60, batch=8))
    assert report.n_clips == len(clips.clips) == 6  # 2 segments x 3 cameras
    assert report.final_loss < report.identity_loss


def test_warp_file_round_trip_gives_the_same_network(tiny, tmp_path):
    _, checkpoint, clip = tiny
    decoder = _decoder(tiny)
    from avatarq.data.latents import load_inputs

    warp, report = distill_warp(decoder, load_inputs(clip), WarpConfig(), FAST)
    save_warp_file(warp, decoder.config, checkpoint, report, tmp_path / "warp.pt")
    cache, loaded = load_warp_file(tmp_path / "warp.pt").build(decoder)
    z, view = torch.randn(1, 16), torch.tensor([[0.0, 0.0, 1.0]])
    with torch.no_grad():
        tex, _, feats = cache(z, view)
        a = warp(feats, tex, z, view, z + 0.1, view)[0]
        b = loaded(feats, tex, z, view, z + 0.1, view)[0]
    assert torch.equal(a, b)


def test_a_file_that_is_not_a_warp_file_is_one_line_error(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(AvatarqError, match="is not an avatarq warp file"):
        load_warp_file(path)


def test_a_warp_file_of_another_decoder_is_one_line_error(tiny, tmp_path):
    _, checkpoint, clip = tiny
    from avatarq.data.latents import load_inputs
    from avatarq.models import DAMConfig, DeepAppearanceModel, DeployableDecoder

    warp, report = distill_warp(_decoder(tiny), load_inputs(clip), WarpConfig(), FAST)
    save_warp_file(warp, _decoder(tiny).config, checkpoint, report, tmp_path / "warp.pt")
    other = DeployableDecoder(DeepAppearanceModel(DAMConfig(z_dim=8, tex_size=64, n_vertices=30)))
    with pytest.raises(AvatarqError, match="distilled for another decoder"):
        load_warp_file(tmp_path / "warp.pt").build(other)


# ----------------------------------------------------------------------------- bundle


def test_bundle_holds_both_graphs_pinned_in_a_version_3_manifest(cached_bundle):
    bundle, cache, _ = cached_bundle
    opened = open_bundle(bundle)
    record = opened.manifest.caching
    assert opened.manifest.schema_version == 3
    assert (record.cache.path, record.warp.path) == ("caching/cache.onnx", "caching/warp.onnx")
    assert record.feature_shape == [cache.feature_channels, 16, 16]
    assert record.refresh_every == 3
    assert [i.name for i in onnx.load(str(bundle / record.warp.path)).graph.input] == [
        "features",
        "texture_ref",
        "z_ref",
        "view_ref",
        "z",
        "view",
    ]
    assert record.validation["warp_texture_psnr_db"] > 60


def test_bundles_without_caching_still_load_as_version_2(tiny):
    bundle, _, _ = tiny
    opened = open_bundle(bundle)
    assert opened.manifest.schema_version == 2 and opened.manifest.caching is None


def test_a_version_3_manifest_without_caching_is_one_line_error(tiny, tmp_path):
    bundle, _, _ = tiny
    copy = tmp_path / "b.avq"
    shutil.copytree(bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["schema_version"] = 3
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(AvatarqError, match="no caching record needs 2"):
        open_bundle(copy)


def test_a_changed_warp_graph_is_refused_before_it_runs(cached_bundle, tmp_path):
    bundle, _, _ = cached_bundle
    copy = tmp_path / "b.avq"
    shutil.copytree(bundle, copy)
    with open(copy / "caching" / "warp.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(AvatarqError, match="is not the warp graph the manifest pins"):
        CachingRuntime.open(copy)


# ----------------------------------------------------------------------------- runtime


def test_refresh_mode_decodes_like_the_torch_networks(cached_bundle):
    bundle, cache, warp = cached_bundle
    clip = smooth_clip(16, 7, seed=4, cone_deg=20)
    z, view = torch.from_numpy(clip.z), torch.from_numpy(clip.view)
    expected = []
    with torch.no_grad():
        for t in range(7):
            r = t - t % 3  # refresh at frames 0, 3, 6
            tex_r, _, feats = cache(z[r : r + 1], view[r : r + 1])
            if r == t:
                expected.append(tex_r)
            else:
                expected.append(
                    warp(
                        feats, tex_r, z[r : r + 1], view[r : r + 1], z[t : t + 1], view[t : t + 1]
                    )[0]
                )
    with CachingRuntime.open(bundle) as rt:
        got = [rt.decode(clip.z[t : t + 1], clip.view[t : t + 1])[0] for t in range(7)]
        assert (rt.frames, rt.warped) == (7, 4)
    for t in range(7):
        np.testing.assert_allclose(got[t], expected[t].numpy(), rtol=0, atol=1e-4)
    assert np.abs(got[1] - got[0]).max() > 1e-3  # the warp changed the texture


def test_alternate_mode_warps_every_frame_from_the_previous_frames_cache(cached_bundle):
    bundle, cache, warp = cached_bundle
    clip = smooth_clip(16, 4, seed=6)
    z, view = torch.from_numpy(clip.z), torch.from_numpy(clip.view)
    with CachingRuntime.open(bundle, mode="alternate") as rt:
        got = [rt.decode(clip.z[t : t + 1], clip.view[t : t + 1])[0] for t in range(4)]
    with torch.no_grad():
        for t in range(1, 4):
            tex_r, _, feats = cache(z[t - 1 : t], view[t - 1 : t])
            want = warp(feats, tex_r, z[t - 1 : t], view[t - 1 : t], z[t : t + 1], view[t : t + 1])[
                0
            ]
            np.testing.assert_allclose(got[t], want.numpy(), rtol=0, atol=1e-4)


def test_changing_the_batch_between_refreshes_is_one_line_error(cached_bundle):
    bundle, _, _ = cached_bundle
    view = np.array([[0.0, 0.0, 1.0]], np.float32)
    with CachingRuntime.open(bundle) as rt:
        rt.decode(np.zeros((1, 16), np.float32), view)
        with pytest.raises(AvatarqError, match="batch changed from 1 to 2 streams"):
            rt.decode(np.zeros((2, 16), np.float32), np.repeat(view, 2, 0))


def test_runtime_on_a_bundle_without_caching_is_one_line_error(tiny):
    with pytest.raises(AvatarqError, match="has no Neural-Caching graphs"):
        CachingRuntime.open(tiny[0])


# ----------------------------------------------------------------------------- bench


def test_bench_reports_both_paths_and_all_streams_against_fp32(cached_bundle):
    from avatarq.bench.caching import bench_caching
    from avatarq.bench.sequences import BenchSequence

    bundle, _, _ = cached_bundle
    sequence = BenchSequence(smooth_clip(16, 8, seed=2))
    result = bench_caching(bundle, sequence, warmup=1, iters=3)
    assert set(result.latency) == {"full", "warp"}
    assert result.latency["warp"].n == result.latency["full"].n == 3
    assert set(result.quality) == {"full", "refresh", "hold", "alternate", "previous"}
    assert result.quality["full"].psnr_all > 80  # the cache graph is the FP32 decoder
    assert result.quality["refresh"].psnr_all < result.quality["full"].psnr_all
    assert result.refresh_every == 3


# ----------------------------------------------------------------------------- CLI


def test_cli_distills_onto_a_bundle_and_benches_it(tiny, tmp_path, capsys):
    bundle, checkpoint, clip = tiny
    copy = tmp_path / "dam.avq"
    shutil.copytree(bundle, copy)
    args = ["distill-warp", "--model", str(checkpoint), "--latents", str(clip), "--steps", "3"]
    rc = main([*args, "--batch", "2", "-o", str(tmp_path / "warp.pt"), "--bundle", str(copy)])
    assert rc == 0 and (tmp_path / "warp.pt").is_file()
    assert open_bundle(copy).manifest.caching is not None
    capsys.readouterr()
    assert main(["bench", str(copy), "--caching", "--iters", "2", "--warmup", "0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["latency"]) == {"full", "warp"}
    assert set(report["quality"]) == {"full", "refresh", "hold", "alternate", "previous"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--capture", "X"], "exactly one of --capture or --latents"),
        (["--refresh", "9"], "--refresh 9 warps up to 8 frames ahead but --max-gap is 4"),
        (["--int8"], "--int8 quantizes the bundle's caching graphs; give --bundle"),
        (["--lr", "nan"], "lr must be a positive finite number, got nan"),
        (["--cache-blocks", "5"], "cache_blocks must be in 1..1 for this decoder, got 5"),
    ],
)
def test_cli_bad_distill_options_are_one_line_errors(tiny, tmp_path, capsys, extra, message):
    _, checkpoint, clip = tiny
    rc = main(
        [
            "distill-warp",
            "--model",
            str(checkpoint),
            "--latents",
            str(clip),
            "-o",
            str(tmp_path / "w.pt"),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "w.pt").exists()


def test_cli_refuses_to_overwrite_a_file_it_did_not_write(tiny, tmp_path, capsys):
    _, checkpoint, clip = tiny
    (tmp_path / "notes.pt").write_text("mine")
    rc = main(
        [
            "distill-warp",
            "--model",
            str(checkpoint),
            "--latents",
            str(clip),
            "-o",
            str(tmp_path / "notes.pt"),
        ]
    )
    assert rc == 2 and "is not an avatarq warp file; refusing" in capsys.readouterr().err
    assert (tmp_path / "notes.pt").read_text() == "mine"


def test_cli_a_bundle_of_another_checkpoint_is_one_line_error(tiny, fuzz_bundle, tmp_path, capsys):
    _, checkpoint, clip = tiny
    other = tmp_path / "other.avq"
    shutil.copytree(fuzz_bundle[1], other)
    rc = main(
        ["distill-warp", "--model", str(checkpoint), "--latents", str(clip), "--bundle", str(other)]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "is not the checkpoint bundle" in err
    assert open_bundle(other).manifest.caching is None


def test_cli_bench_caching_on_a_plain_bundle_is_one_line_error(tiny, capsys):
    assert main(["bench", str(tiny[0]), "--caching"]) == 2
    assert "has no Neural-Caching graphs" in capsys.readouterr().err


# ----------------------------------------------------------------------------- int8


@pytest.mark.slow
def test_int8_quantizes_both_graphs_with_the_calibration_path(tiny, tmp_path):
    from avatarq.data.latents import load_inputs
    from avatarq.export import ExportOptions, export_bundle

    _, checkpoint, clip = tiny
    out = tmp_path / "dam_int8.avq"
    export_bundle(
        checkpoint, out, options=ExportOptions(int8=True, validate=False, calib_data=str(clip))
    )
    decoder = decoder_of_bundle(open_bundle(out), checkpoint)
    warp, _ = distill_warp(decoder, load_inputs(clip), WarpConfig(), FAST)
    cache = CacheNetwork(decoder, 1)
    result = attach_caching(
        out, cache, warp, weights_sha256(warp), {}, int8=True, calibration_inputs=load_inputs(clip)
    )
    record = result.record
    assert (record.cache.precision, record.warp.precision) == ("w8a8", "mixed")
    assert record.warp.layer_precision["conv_in"] == "w8a8"
    assert record.warp.layer_precision["mesh_fc"] == "fp32"
    for graph in (record.cache, record.warp):
        ops = {n.op_type for n in onnx.load(str(out / graph.path)).graph.node}
        assert "QuantizeLinear" in ops
    with CachingRuntime.open(out) as rt:
        texture, _ = rt.decode(np.zeros((1, 16), np.float32), np.array([[0, 0, 1.0]], np.float32))
    assert np.isfinite(texture).all()
