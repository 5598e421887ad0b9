"""MultifaceCapture and KRT reading, on a small synthetic capture in the Multiface layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avatarq.data.capture import (
    Camera,
    MultifaceCapture,
    read_krt,
    read_obj_topology,
    write_krt,
)
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.errors import AvatarqError

SMALL = SyntheticCaptureConfig(
    texture_size=64, n_cameras=2, segment_frames=(4, 4), mesh_bands=16, mesh_sectors=24
)
SEG0, SEG1 = "E001_Jaw_Open_Brow_Raise", "E002_Smile_Blink"
FRAMES0 = ["000100", "000103", "000106", "000109"]
FRAMES1 = ["000412", "000415", "000418", "000421"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return write_synthetic_capture(tmp_path_factory.mktemp("capture"), SMALL)


@pytest.fixture(scope="module")
def cap(root) -> MultifaceCapture:
    return MultifaceCapture(root)


@pytest.fixture
def copy(root, tmp_path) -> Path:
    """A private copy of the capture that a test may modify."""
    return Path(shutil.copytree(root, tmp_path / root.name))


def _camera(name: str, seed: int) -> Camera:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    K = np.array([[5000.0 + seed, 0.0, 660.5], [0.0, 5001.25, 1030.0], [0.0, 0.0, 1.0]])
    return Camera(name, K, rng.normal(size=5) * 0.01, q, rng.normal(size=3) * 100)


def _rigid(pose: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :] = pose
    return m


# ---------------------------------------------------------------- KRT
def test_krt_round_trip(tmp_path):
    cams = [_camera("400002", 1), _camera("400004", 2), _camera("400013", 3)]
    write_krt(tmp_path / "KRT", cams)
    back = read_krt(tmp_path / "KRT")
    assert list(back) == ["400002", "400004", "400013"]
    for cam in cams:
        got = back[cam.name]
        for attr in ("K", "distortion", "R", "t"):
            np.testing.assert_allclose(getattr(got, attr), getattr(cam, attr), rtol=1e-9)


def test_krt_tolerates_trailing_whitespace_and_missing_final_blank(tmp_path):
    text = (
        "cam_a  \n1 0 2 \n0 1 3\n0 0 1\n0 0 0 0 0\n1 0 0 10\n0 1 0 20\n0 0 1 30\n\n\n"
        "cam_b\n2 0 5\n0 2 6\n0 0 1\n0.1 0.2\n0 1 0 1\n-1 0 0 2\n0 0 1 3"
    )
    (tmp_path / "KRT").write_text(text)
    cams = read_krt(tmp_path / "KRT")
    assert list(cams) == ["cam_a", "cam_b"]
    np.testing.assert_array_equal(cams["cam_a"].t, [10, 20, 30])
    np.testing.assert_array_equal(cams["cam_b"].R, [[0, 1, 0], [-1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(cams["cam_b"].distortion, [0.1, 0.2])


def test_krt_with_a_short_intrinsics_line_names_the_line(tmp_path):
    (tmp_path / "KRT").write_text("c\n1 0\n0 1 3\n0 0 1\n0\n1 0 0 0\n0 1 0 0\n0 0 1 0\n")
    with pytest.raises(AvatarqError, match=r"KRT:2: expected 3 numbers, got 2"):
        read_krt(tmp_path / "KRT")


def test_krt_truncated_block_is_an_error(tmp_path):
    (tmp_path / "KRT").write_text("c\n1 0 0\n0 1 0\n0 0 1\n0\n1 0 0 0\n")
    with pytest.raises(AvatarqError, match="truncated"):
        read_krt(tmp_path / "KRT")


def test_camera_centre_is_minus_rt_t():
    cam = _camera("x", 4)
    np.testing.assert_allclose(cam.R @ cam.center + cam.t, 0.0, atol=1e-9)


# ---------------------------------------------------------------- layout and metadata
def test_reader_sees_frames_segments_and_cameras(cap):
    assert cap.segments == [SEG0, SEG1]
    assert cap.frames == [(SEG0, f) for f in FRAMES0] + [(SEG1, f) for f in FRAMES1]
    assert list(cap.cameras) == ["400002", "400004"]
    assert cap.image_size == (2048, 1334)
    assert (cap.cameras["400002"].height, cap.cameras["400002"].width) == (2048, 1334)
    assert cap.texture_size == 64


def test_frames_keep_file_order_and_clips_sort_numerically(copy):
    lines = [f"{SEG1} 000418", f"{SEG0} 000106", f"{SEG1} 000412", f"{SEG0} 000100"]
    (copy / "frame_list.txt").write_text("\n".join(lines) + "\n")
    cap = MultifaceCapture(copy)
    assert cap.frames == [(SEG1, "000418"), (SEG0, "000106"), (SEG1, "000412"), (SEG0, "000100")]
    assert cap.segments == [SEG1, SEG0]
    assert list(cap.clips()) == [(SEG1, ["000412", "000418"]), (SEG0, ["000100", "000106"])]
    assert list(cap.clips(segment=SEG0)) == [(SEG0, ["000100", "000106"])]


def test_clips_for_a_camera_skip_frames_without_its_texture(copy):
    (copy / "unwrapped_uv_1024" / SEG0 / "400004" / "000103.png").unlink()
    cap = MultifaceCapture(copy)
    assert dict(cap.clips(camera="400004"))[SEG0] == ["000100", "000106", "000109"]
    assert dict(cap.clips(camera="average"))[SEG0] == FRAMES0


def test_clips_reject_unknown_segment_and_camera(cap):
    with pytest.raises(AvatarqError, match="unknown segment 'nope'"):
        list(cap.clips(segment="nope"))
    with pytest.raises(AvatarqError, match="unknown camera '999'"):
        list(cap.clips(camera="999"))


def test_image_size_is_read_from_images_when_present(copy):
    path = copy / "images" / SEG0 / "400002" / "000100.png"
    path.parent.mkdir(parents=True)
    Image.fromarray(np.zeros((50, 30, 3), np.uint8)).save(path)
    assert MultifaceCapture(copy).image_size == (50, 30)


# ---------------------------------------------------------------- topology and vertices
def test_topology_indices_are_valid_and_uvs_in_unit_square(cap):
    topo = cap.topology
    n_verts = cap.vertices(SEG0, FRAMES0[0]).shape[0]
    assert topo.vert_ids.min() == 0 and topo.vert_ids.max() == n_verts - 1
    assert topo.uv_ids.min() == 0 and topo.uv_ids.max() == len(topo.uvs) - 1
    assert topo.uvs.min() >= 0.0 and topo.uvs.max() <= 1.0
    assert len(topo.uvs) > n_verts  # seam and poles duplicated in vt
    assert not np.array_equal(topo.vert_ids, topo.uv_ids)


def test_obj_parser_reads_one_based_faces(tmp_path):
    (tmp_path / "m.obj").write_text(
        "v 0 0 0\nv 1 0 0\nv 0 1 0\nvt 0 0\nvt 1 0\nvt 0 1\nvt 1 1\nf 1/4 2/2 3/3\n"
    )
    topo, verts = read_obj_topology(tmp_path / "m.obj")
    np.testing.assert_array_equal(topo.vert_ids, [[0, 1, 2]])
    np.testing.assert_array_equal(topo.uv_ids, [[3, 1, 2]])
    assert verts.shape == (3, 3) and topo.uvs.shape == (4, 2)


def test_obj_parser_rejects_quads(tmp_path):
    (tmp_path / "m.obj").write_text("v 0 0 0\nvt 0 0\nf 1/1 1/1 1/1 1/1\n")
    with pytest.raises(AvatarqError, match="only triangles"):
        read_obj_topology(tmp_path / "m.obj")


def test_vertices_come_from_the_bin_file(cap, root):
    raw = np.fromfile(root / "tracked_mesh" / SEG1 / "000415.bin", dtype=np.float32)
    v = cap.vertices(SEG1, "000415")
    assert v.dtype == np.float32 and v.shape == (362, 3)
    np.testing.assert_array_equal(v.reshape(-1), raw)


def test_normalized_vertices_use_vert_mean_and_sqrt_vert_var(cap, root):
    raw = np.fromfile(root / "tracked_mesh" / SEG0 / "000106.bin", dtype=np.float32)
    mean = np.fromfile(root / "vert_mean.bin", dtype=np.float32)
    std = float((root / "vert_var.txt").read_text()) ** 0.5
    np.testing.assert_allclose(cap.normalized_vertices(SEG0, "000106"), (raw - mean) / std, 1e-6)


def test_head_pose_is_a_rigid_3x4(cap):
    pose = cap.head_pose(SEG0, "000100")
    assert pose.shape == (3, 4) and pose.dtype == np.float32
    np.testing.assert_allclose(pose[:, :3] @ pose[:, :3].T, np.eye(3), atol=1e-6)


def test_head_pose_accepts_a_homogeneous_4x4(copy):
    path = copy / "tracked_mesh" / SEG0 / "000100_transform.txt"
    pose = np.loadtxt(path)
    np.savetxt(path, np.concatenate([pose, [[0, 0, 0, 1]]]))
    np.testing.assert_allclose(MultifaceCapture(copy).head_pose(SEG0, "000100"), pose, 1e-6)


def test_head_pose_of_the_wrong_shape_is_an_error(copy):
    np.savetxt(copy / "tracked_mesh" / SEG0 / "000100_transform.txt", np.eye(3))
    with pytest.raises(AvatarqError, match=r"_transform.txt:1: expected 4 numbers, got 3"):
        MultifaceCapture(copy).head_pose(SEG0, "000100")


# ---------------------------------------------------------------- textures
def test_texture_is_flipped_vertically_on_load(copy):
    r, c, ch = np.meshgrid(np.arange(4), np.arange(4), np.arange(3), indexing="ij")
    png = (10 * r + c + 100 * ch).astype(np.uint8)  # [4 rows, 4 cols, 3], no symmetry
    Image.fromarray(png).save(copy / "unwrapped_uv_1024" / SEG0 / "average" / "000100.png")
    tex = MultifaceCapture(copy).texture(SEG0, "000100")
    assert tex.shape == (3, 4, 4) and tex.dtype == np.float32
    np.testing.assert_array_equal(tex, png[::-1].transpose(2, 0, 1))
    assert tex[0, 0, 0] == 30  # row 0 of the tensor is the bottom row of the PNG


def test_tex_mean_is_flipped_like_textures(cap, root):
    png = np.asarray(Image.open(root / "tex_mean.png"), dtype=np.float32)
    np.testing.assert_array_equal(cap.tex_mean, png[::-1].transpose(2, 0, 1))


def test_normalized_texture_matches_formula_and_zeroes_unseen_texels(cap, root):
    png = root / "unwrapped_uv_1024" / SEG0 / "400002" / "000103.png"
    raw = np.asarray(Image.open(png), dtype=np.float32)[::-1].transpose(2, 0, 1)
    std = float((root / "tex_var.txt").read_text()) ** 0.5
    expected = (raw - cap.tex_mean) / std
    got = cap.normalized_texture(SEG0, "000103", "400002", zero_unseen=False)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    unseen = raw == 0
    assert unseen.any()
    masked = cap.normalized_texture(SEG0, "000103", "400002")
    assert np.all(masked[unseen] == 0) and np.allclose(masked[~unseen], expected[~unseen])


def test_missing_texture_names_the_path(cap):
    with pytest.raises(AvatarqError, match=r"texture not found: .*400002.*999999\.png"):
        cap.texture(SEG0, "999999", "400002")


# ---------------------------------------------------------------- geometry
def test_projection_equals_chained_rigid_transforms_and_intrinsics(cap):
    for seg, frame in [(SEG0, "000103"), (SEG1, "000421")]:
        v = cap.vertices(seg, frame).astype(np.float64)
        pose = cap.head_pose(seg, frame).astype(np.float64)
        for name, cam in cap.cameras.items():
            world = v @ pose[:, :3].T + pose[:, 3]
            camera = world @ cam.R.T + cam.t
            pix = camera @ cam.K.T
            expected = pix[:, :2] / pix[:, 2:]
            M = cap.projection(seg, frame, name).astype(np.float64)
            p = np.concatenate([v, np.ones((len(v), 1))], axis=1) @ M.T
            np.testing.assert_allclose(p[:, :2] / p[:, 2:], expected, atol=1e-2)


def test_view_direction_is_camera_centre_in_head_frame(cap):
    for seg, frame in [(SEG0, "000100"), (SEG1, "000418")]:
        head_to_world = _rigid(cap.head_pose(seg, frame).astype(np.float64))
        for name, cam in cap.cameras.items():
            world_to_cam = _rigid(cam.extrinsics)
            centre = np.linalg.inv(world_to_cam @ head_to_world) @ np.array([0, 0, 0, 1.0])
            expected = centre[:3] / np.linalg.norm(centre[:3])
            got = cap.view_direction(seg, frame, name)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, expected, atol=1e-6)


def test_sample_bundles_view_and_projection(cap):
    s = cap.sample(SEG1, "000412", "400004")
    assert (s.segment, s.frame, s.camera) == (SEG1, "000412", "400004")
    np.testing.assert_array_equal(s.view, cap.view_direction(SEG1, "000412", "400004"))
    np.testing.assert_array_equal(s.M, cap.projection(SEG1, "000412", "400004"))


def test_projected_head_lies_inside_the_image_and_fills_it(cap):
    h, w = cap.image_size
    for seg, frame in cap.frames:
        v = cap.vertices(seg, frame).astype(np.float64)
        for name in cap.cameras:
            p = np.concatenate([v, np.ones((len(v), 1))], 1) @ cap.projection(seg, frame, name).T
            assert p[:, 2].min() > 0
            x, y = p[:, 0] / p[:, 2], p[:, 1] / p[:, 2]
            assert 0 <= x.min() and x.max() < w and 0 <= y.min() and y.max() < h
            assert y.max() - y.min() > 0.4 * h


# ---------------------------------------------------------------- bad inputs
def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(AvatarqError, match="capture root not found"):
        MultifaceCapture(tmp_path / "nowhere")


@pytest.mark.parametrize("name", ["KRT", "frame_list.txt", "tex_mean.png", "vert_var.txt"])
def test_missing_required_file_is_named(copy, name):
    (copy / name).unlink()
    with pytest.raises(AvatarqError, match=f"is missing {name} "):
        MultifaceCapture(copy)


def test_malformed_krt_in_a_capture_is_an_error(copy):
    text = (copy / "KRT").read_text().splitlines()
    text[2] = "1.0 zero 3.0"
    (copy / "KRT").write_text("\n".join(text))
    with pytest.raises(AvatarqError, match=r"KRT:3: not a number"):
        MultifaceCapture(copy)


def test_malformed_frame_list_names_the_line(copy):
    (copy / "frame_list.txt").write_text(f"{SEG0} 000100\n{SEG0}\n")
    with pytest.raises(AvatarqError, match=r"frame_list.txt:2: expected 'SEGMENT FRAMEID'"):
        MultifaceCapture(copy)


def test_vertex_count_mismatch_with_vert_mean_is_an_error(copy):
    np.zeros(9, np.float32).tofile(copy / "vert_mean.bin")
    with pytest.raises(AvatarqError, match="vert_mean.bin holds 9"):
        MultifaceCapture(copy).normalized_vertices(SEG0, "000100")
