"""The synthetic capture: Multiface layout, a head that moves and emotes, determinism."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarq.data.capture import MultifaceCapture, read_obj_topology
from avatarq.data.synthetic_capture import (
    EXPRESSIONS,
    ROOT_NAME,
    SyntheticCaptureConfig,
    write_synthetic_capture,
)
from avatarq.data.synthetic_face import TextureModel
from avatarq.errors import AvatarqError

SMALL = SyntheticCaptureConfig(
    texture_size=64, n_cameras=2, segment_frames=(4, 4), mesh_bands=16, mesh_sectors=24
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_capture(tmp_path_factory.mktemp("synth"), SMALL)


@pytest.fixture(scope="module")
def cap(root) -> MultifaceCapture:
    return MultifaceCapture(root)


@pytest.fixture(scope="module")
def truth(root) -> dict:
    return json.loads((root / "synthetic.json").read_text())


@pytest.fixture(scope="module")
def texture_model() -> TextureModel:
    return TextureModel(256, np.random.default_rng(0))


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------- config
def test_config_round_trips_through_json():
    cfg = SyntheticCaptureConfig(seed=7, segment_frames=(3, 5, 2), camera_textures_per_frame=1)
    assert SyntheticCaptureConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"segment_frames": ()}, "segment_frames"),
        ({"segment_frames": (4, 0)}, "segment_frames"),
        ({"camera_textures_per_frame": -1}, "camera_textures_per_frame must be >= 0"),
        ({"texture_size": 8}, "texture_size must be >= 16"),
        ({"version": 2}, "version must be 1"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(AvatarqError, match=match):
        SyntheticCaptureConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(AvatarqError, match="unknown synthetic capture config keys: colour"):
        SyntheticCaptureConfig.from_dict({"colour": 1})


# ---------------------------------------------------------------- layout
def test_root_is_named_like_a_multiface_identity(root):
    assert root.name == ROOT_NAME == "m--20260101--0000--SYNTH--GHS"


def test_layout_matches_multiface(root, cap):
    assert sorted(p.name for p in root.iterdir()) == [
        "KRT",
        "frame_list.txt",
        "synthetic.json",
        "tex_mean.png",
        "tex_var.txt",
        "tracked_mesh",
        "unwrapped_uv_1024",
        "vert_mean.bin",
        "vert_var.txt",
    ]
    for seg, frame in cap.frames:
        mesh = root / "tracked_mesh" / seg
        for suffix in (".obj", ".bin", "_transform.txt"):
            assert (mesh / f"{frame}{suffix}").is_file()
        for cam in ("average", "400002", "400004"):
            assert (root / "unwrapped_uv_1024" / seg / cam / f"{frame}.png").is_file()


def test_per_camera_textures_are_written_round_robin(tmp_path):
    cfg = SyntheticCaptureConfig(
        texture_size=16, n_cameras=3, segment_frames=(3,), mesh_bands=8, mesh_sectors=8,
        camera_textures_per_frame=1,
    )  # fmt: skip
    cap = MultifaceCapture(write_synthetic_capture(tmp_path, cfg))
    seg = cap.segments[0]
    assert [dict(cap.clips(camera=c))[seg] for c in cap.cameras] == [
        ["000100"],
        ["000103"],
        ["000106"],
    ]


def test_vertex_count_follows_the_mesh_resolution(cap):
    assert SMALL.n_vertices == (16 - 1) * 24 + 2 == 362
    assert cap.vertices(*cap.frames[0]).shape == (362, 3)
    assert SyntheticCaptureConfig().n_vertices == 6050


def test_every_obj_holds_that_frames_bin_vertices_and_the_same_topology(cap, root):
    first = cap.topology
    for seg, frame in [cap.frames[1], cap.frames[-1]]:
        topo, verts = read_obj_topology(root / "tracked_mesh" / seg / f"{frame}.obj")
        np.testing.assert_array_equal(topo.vert_ids, first.vert_ids)
        np.testing.assert_array_equal(topo.uv_ids, first.uv_ids)
        np.testing.assert_allclose(verts, cap.vertices(seg, frame), atol=1e-4)


def test_mesh_is_closed_and_wound_outward(cap):
    f = cap.topology.vert_ids
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert set(counts.tolist()) == {2}  # every edge shared by exactly two triangles
    v = cap.vertices(*cap.frames[0]).astype(np.float64)
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    volume = np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0  # mm^3
    assert 1.5e6 < volume < 5e6  # a head-sized solid (~3 litres), positive = outward


def test_mean_and_variance_files_are_computed_from_the_data(cap, root):
    avg = np.stack([cap.texture(s, f) for s, f in cap.frames]).astype(np.float64)
    np.testing.assert_allclose(cap.tex_mean, avg.mean(0), atol=0.5)
    tex_var = float((root / "tex_var.txt").read_text())
    np.testing.assert_allclose(tex_var, avg.var(0).mean(), rtol=1e-4)
    verts = np.stack([cap.vertices(s, f).reshape(-1) for s, f in cap.frames]).astype(np.float64)
    np.testing.assert_allclose(cap.vert_mean, verts.mean(0), atol=1e-4)
    vert_var = float((root / "vert_var.txt").read_text())
    np.testing.assert_allclose(vert_var, verts.var(0).mean(), rtol=1e-4)


def test_textures_are_written_upright_on_disk(root, cap):
    # the crown (hair, dark) is at uv v = 1: the top of the PNG and the last tensor row
    png = np.asarray(Image.open(root / "tex_mean.png"), dtype=np.float32)
    assert png[:4].mean() < 100 and cap.tex_mean[:, -4:].mean() < 100
    assert cap.tex_mean[:, 24:40, 24:40].mean() > 120  # the face around uv (0.5, 0.5)


# ---------------------------------------------------------------- motion and expressions
def test_truth_lists_expression_weights_per_frame(truth, cap):
    assert truth["expressions"] == list(EXPRESSIONS)
    assert [s["name"] for s in truth["segments"]] == cap.segments
    for seg in truth["segments"]:
        w = np.array(seg["weights"])
        assert w.shape == (4, 4) and w.min() >= 0.0 and w.max() <= 1.0


def test_segments_use_expressions_differently(truth):
    w0, w1 = (np.array(s["weights"]) for s in truth["segments"])
    jaw, smile = EXPRESSIONS.index("jaw_open"), EXPRESSIONS.index("smile")
    assert w0[:, jaw].min() > w1[:, jaw].max()
    assert w1[:, smile].min() > w0[:, smile].max()


def test_vertices_change_smoothly_within_and_strongly_across_segments(cap):
    (s0, f0), (s1, f1) = cap.clips()
    v0 = np.stack([cap.vertices(s0, f) for f in f0])
    v1 = np.stack([cap.vertices(s1, f) for f in f1])
    step = max(np.abs(np.diff(v0, axis=0)).max(), np.abs(np.diff(v1, axis=0)).max())
    across = np.abs(v0[:, None] - v1[None]).max(axis=(2, 3)).min()
    assert step > 0.01  # expressions move vertices between consecutive frames (mm)
    assert across > 4 * step


def test_textures_change_smoothly_within_and_strongly_across_segments(cap):
    (s0, f0), (s1, f1) = cap.clips()
    t0 = np.stack([cap.texture(s0, f) for f in f0])
    t1 = np.stack([cap.texture(s1, f) for f in f1])
    step = max(np.abs(np.diff(t0, axis=0)).mean(), np.abs(np.diff(t1, axis=0)).mean())
    across = np.abs(t0[:, None] - t1[None]).mean(axis=(2, 3, 4)).min()
    assert step > 0
    assert across > 3 * step


def test_head_moves_a_little_and_smoothly(cap):
    seg, frames = next(cap.clips())
    poses = np.stack([cap.head_pose(seg, f) for f in frames]).astype(np.float64)
    t = poses[:, :, 3]
    assert 0 < np.linalg.norm(np.diff(t, axis=0), axis=1).max() < 2.0  # mm per frame
    angles = [np.degrees(np.arccos((np.trace(p[:, :3]) - 1) / 2)) for p in poses]
    assert max(angles) < 15.0


def test_per_camera_textures_depend_on_the_camera(cap):
    seg, frame = cap.frames[2]
    a, b = cap.texture(seg, frame, "400002"), cap.texture(seg, frame, "400004")
    seen_a, seen_b = (a > 0).all(0), (b > 0).all(0)
    assert 0.2 < seen_a.mean() < 0.8 and 0.2 < seen_b.mean() < 0.8  # back faces are 0
    assert (seen_a != seen_b).mean() > 0.1  # cameras on opposite sides see different texels
    both = seen_a & seen_b
    assert np.abs(a - b)[:, both].mean() > 1.0  # view-dependent shading and colour gain


def _region(model: TextureModel, th: tuple, ph: tuple) -> tuple[slice, slice]:
    rows = np.nonzero((model.ph >= ph[0]) & (model.ph <= ph[1]))[0]
    cols = np.nonzero((model.th >= th[0]) & (model.th <= th[1]))[0]
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _weights(**kw: float) -> np.ndarray:
    return np.array([kw.get(name, 0.0) for name in EXPRESSIONS])


def test_open_jaw_darkens_the_mouth(texture_model):
    rs, cs = _region(texture_model, (-0.2, 0.2), (2.0, 2.05))
    closed = texture_model.expression(_weights())[0][:, rs, cs].mean()
    opened = texture_model.expression(_weights(jaw_open=1.0))[0][:, rs, cs].mean()
    assert opened < 0.7 * closed


def test_blink_covers_the_eyes_with_lids(texture_model):
    rs, cs = _region(texture_model, (0.40, 0.48), (1.28, 1.32))
    open_eye = texture_model.expression(_weights())[0][:, rs, cs]
    shut_eye = texture_model.expression(_weights(blink=1.0))[0][:, rs, cs]
    assert open_eye.std() > 2 * shut_eye.std()  # iris and pupil disappear under the lid


def test_brow_raise_wrinkles_the_forehead(texture_model):
    rs, cs = _region(texture_model, (-0.2, 0.2), (0.85, 1.0))
    smooth = texture_model.expression(_weights())[0][:, rs, cs]
    wrinkled = texture_model.expression(_weights(brow_raise=1.0))[0][:, rs, cs]
    assert wrinkled.std(axis=1).mean() > 3 * smooth.std(axis=1).mean()


def test_smile_draws_nasolabial_folds(texture_model):
    rs, cs = _region(texture_model, (0.15, 0.35), (1.85, 2.0))
    rest = texture_model.expression(_weights())[0][:, rs, cs]
    smile = texture_model.expression(_weights(smile=1.0))[0][:, rs, cs]
    assert (rest - smile).max() > 30  # a dark crease appears where the cheek folds


# ---------------------------------------------------------------- determinism and errors
def test_same_seed_gives_identical_files_and_another_seed_does_not(root, tmp_path):
    again = write_synthetic_capture(tmp_path / "a", SMALL)
    assert _tree_digest(again) == _tree_digest(root)
    other = write_synthetic_capture(
        tmp_path / "b", SyntheticCaptureConfig(**{**SMALL.to_dict(), "seed": 1})
    )
    d_root, d_other = _tree_digest(root), _tree_digest(other)
    assert d_other["KRT"] != d_root["KRT"]
    assert d_other["tex_mean.png"] != d_root["tex_mean.png"]


def test_existing_root_needs_overwrite(tmp_path):
    cfg = SyntheticCaptureConfig(
        texture_size=16, n_cameras=1, segment_frames=(1,), mesh_bands=8, mesh_sectors=8
    )
    root = write_synthetic_capture(tmp_path, cfg)
    with pytest.raises(AvatarqError, match="already exists"):
        write_synthetic_capture(tmp_path, cfg)
    (root / "stale.txt").write_text("x")
    assert write_synthetic_capture(tmp_path, cfg, overwrite=True) == root
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ROOT_NAME]  # no .partial left


# ---------------------------------------------------------------- detail and motion options

#: sha256 over the file names and contents (PNG pixels, other files' bytes) of the SMALL
#: capture as written before the detail and motion_seed options existed.
SMALL_CONTENT_SHA256 = "d7b7d5337d8918a994c3c0177ccb3ed5d81f5884bd8759763fde86e0a754d2d8"


def _content_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            with Image.open(p) if p.suffix == ".png" else open(p, "rb") as f:
                h.update(np.asarray(f).tobytes() if p.suffix == ".png" else f.read())
    return h.hexdigest()


def test_the_default_capture_is_unchanged_by_the_detail_and_motion_options(root):
    assert _content_digest(root) == SMALL_CONTENT_SHA256


def test_options_at_their_defaults_stay_out_of_the_config_dict():
    d = SMALL.to_dict()
    assert "detail" not in d and "motion_seed" not in d
    fine = SyntheticCaptureConfig(detail="fine", motion_seed=3).to_dict()
    assert (fine["detail"], fine["motion_seed"]) == ("fine", 3)
    assert SyntheticCaptureConfig.from_dict(fine).detail == "fine"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"detail": "ultra"}, "detail must be one of standard, fine, got 'ultra'"),
        ({"motion_seed": -1}, "motion_seed must be None or an integer >= 0, got -1"),
    ],
)
def test_bad_detail_and_motion_seed_are_refused(kwargs, match):
    with pytest.raises(AvatarqError, match=match):
        SyntheticCaptureConfig(**kwargs)


def _high_frequency(albedo: np.ndarray) -> float:
    """Mean |discrete Laplacian| of the albedo (0..255 units): texel-scale content."""
    a = albedo.mean(axis=0)
    lap = 4 * a[1:-1, 1:-1] - a[:-2, 1:-1] - a[2:, 1:-1] - a[1:-1, :-2] - a[1:-1, 2:]
    return float(np.abs(lap).mean())


def test_fine_detail_adds_texel_scale_content_at_full_size():
    standard = TextureModel(1024, np.random.default_rng(0))
    fine = TextureModel(1024, np.random.default_rng(0), "fine", np.random.default_rng(1))
    neutral = np.zeros(4)
    # measured: 0.70 standard, 10.5 fine
    assert _high_frequency(fine.expression(neutral)[0]) > 5 * _high_frequency(
        standard.expression(neutral)[0]
    )


def test_fine_wrinkles_deepen_with_the_smile_and_the_brow():
    fine = TextureModel(256, np.random.default_rng(0), "fine", np.random.default_rng(1))
    neutral = fine.expression(np.zeros(4))[0]
    smile = fine.expression(np.array([0.0, 1.0, 0.0, 0.0]))[0]
    brow = fine.expression(np.array([0.0, 0.0, 0.0, 1.0]))[0]
    rs, cs = fine.forehead
    assert _high_frequency(brow[:, rs, cs]) > 1.2 * _high_frequency(neutral[:, rs, cs])
    assert smile.sum() < neutral.sum()  # crow's feet and folds darken


def test_another_motion_seed_moves_the_same_face_differently(root, tmp_path):
    other = write_synthetic_capture(
        tmp_path, SyntheticCaptureConfig(**{**SMALL.to_dict(), "motion_seed": 5})
    )
    assert (other / "KRT").read_bytes() == (root / "KRT").read_bytes()
    a, b = MultifaceCapture(root), MultifaceCapture(other)
    seg, frame = a.frames[1]
    assert not np.allclose(a.vertices(seg, frame), b.vertices(seg, frame))
