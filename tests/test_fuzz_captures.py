"""Fuzz: malformed Multiface captures (see fuzz_oracle).

Every file of a small valid capture is replaced in turn by binary junk, nothing, a folder,
half of itself, a dangling link, or a curated malformed variant (a singular head pose, a
decompression-bomb PNG, an OBJ with quads, NaN variances, ...). Reading the capture the way
calibrate, export and bench do must load it or fail with one line naming the file, with no
numpy warning and nothing written.
"""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from avatarq.data.capture import MultifaceCapture
from avatarq.data.encode import capture_normalization
from avatarq.data.synthetic_capture import SyntheticCaptureConfig, write_synthetic_capture
from avatarq.errors import AvatarqError
from avatarq.models import DAMConfig, DeepAppearanceModel, save_checkpoint
from fuzz_oracle import assert_untouched, call, fuzz_settings, restored, run_checked, snapshot

CAPTURE = SyntheticCaptureConfig(
    texture_size=16,
    n_cameras=2,
    segment_frames=(3,),
    image_height=64,
    image_width=64,
    mesh_bands=8,
    mesh_sectors=8,
    camera_textures_per_frame=1,
)
SEG = "E001_Jaw_Open_Brow_Raise"
FRAME = "000100"
#: What each fuzzed file is, relative to the identity folder.
FILES = {
    "frame list": "frame_list.txt",
    "KRT": "KRT",
    "tex_mean": "tex_mean.png",
    "tex_var": "tex_var.txt",
    "vert_mean": "vert_mean.bin",
    "vert_var": "vert_var.txt",
    "mesh OBJ": f"tracked_mesh/{SEG}/{FRAME}.obj",
    "vertices": f"tracked_mesh/{SEG}/{FRAME}.bin",
    "head pose": f"tracked_mesh/{SEG}/{FRAME}_transform.txt",
    "texture": f"unwrapped_uv_1024/{SEG}/average/{FRAME}.png",
    "photo": f"images/{SEG}/400002/{FRAME}.png",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """(a valid capture's identity folder with one photograph, a matching DAM checkpoint)."""
    folder = tmp_path_factory.mktemp("pristine")
    root = write_synthetic_capture(folder / "capture", CAPTURE)
    from PIL import Image

    photo = root / FILES["photo"]
    photo.parent.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(photo)
    torch.manual_seed(0)
    config = DAMConfig(z_dim=4, tex_size=16, n_vertices=CAPTURE.n_vertices, n_cams=2)
    save_checkpoint(DeepAppearanceModel(config).eval(), folder / "dam.pt")
    return root, folder / "dam.pt"


@pytest.fixture(scope="module")
def model(pristine):
    from avatarq.models.checkpoint import load_checkpoint

    return load_checkpoint(pristine[1])


def read_capture(root: Path, model) -> None:
    """Every file calibrate, export and bench read from a capture, read as they read it
    (the encoder itself runs in the `avatarq calibrate` cases below)."""
    capture = MultifaceCapture(root)
    capture_normalization(capture)
    capture.topology  # noqa: B018 - reads the OBJ
    for segment, frames in capture.clips():
        for frame in frames:
            capture.normalized_texture(segment, frame)
            capture.normalized_vertices(segment, frame)
            for camera in capture.cameras:
                capture.view_direction(segment, frame, camera)
                capture.projection(segment, frame, camera)
                if capture.has_texture(segment, frame, camera):
                    capture.texture(segment, frame, camera)


def copy_capture(pristine_root: Path, where: Path) -> Path:
    shutil.copytree(pristine_root.parent, where / "capture", symlinks=True)
    return where / "capture" / pristine_root.name


@pytest.fixture(scope="module")
def work(pristine, tmp_path_factory) -> Path:
    """One working copy of the capture (and dam.pt) that each input mutates and restores."""
    folder = tmp_path_factory.mktemp("work")
    copy_capture(pristine[0], folder)
    shutil.copy(pristine[1], folder / "dam.pt")
    return folder


def root_of(work: Path) -> Path:
    return next((work / "capture").iterdir())


# --------------------------------------------------------------------------- mutations


def _png(width: int, height: int, mode: int = 2, depth: int = 8, data: bytes = b"") -> bytes:
    """A PNG whose header claims width x height (colour type ``mode``), with ``data`` as its
    compressed image stream: a few bytes can claim gigapixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, depth, mode, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )


def _image(size: tuple[int, int], mode: str = "RGB") -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


GENERIC: dict[str, Callable[[Path], None]] = {
    "binary junk": lambda p: p.write_bytes(bytes(range(256)) * 8),
    "empty": lambda p: p.write_bytes(b""),
    "a folder": lambda p: (p.unlink(), p.mkdir()),
    "half of itself": _half,
    "missing": lambda p: p.unlink(),
    "a dangling link": lambda p: (p.unlink(), os.symlink(p.name + ".nowhere", p)),
}

TEXT = "{}\n"
SPECIFIC: dict[str, dict[str, bytes | Callable[[Path], None]]] = {
    "frame list": {
        "three columns": b"E001 000100 extra\n",
        "only blank lines": b"\n\n  \n",
        "a frame without files": f"{SEG} 999999\n".encode(),
        "a frame id that climbs out": f"{SEG} ../../../outside\n".encode(),
        "an absolute segment": b"/etc 000100\n",
        "latin-1 bytes": f"{SEG} 00010\xe9\n".encode("latin-1"),
    },
    "KRT": {
        "NaN intrinsics": b"400002\nnan 0 8\n0 nan 8\n0 0 1\n0 0 0 0 0\n1 0 0 0\n0 1 0 0\n0 0 1 500\n",
        "zero rotation": b"400002\n100 0 8\n0 100 8\n0 0 1\n0 0 0 0 0\n0 0 0 0\n0 0 0 0\n0 0 0 500\n",
        "singular intrinsics": b"400002\n0 0 0\n0 0 0\n0 0 0\n0 0 0 0 0\n1 0 0 0\n0 1 0 0\n0 0 1 500\n",
        "infinite translation": b"400002\n100 0 8\n0 100 8\n0 0 1\n\n1 0 0 inf\n0 1 0 0\n0 0 1 500\n",
        "truncated block": b"400002\n100 0 8\n0 100 8\n",
        "letters": b"400002\na b c\n0 100 8\n0 0 1\n0\n1 0 0 0\n0 1 0 0\n0 0 1 500\n",
        "a duplicate camera": b"c\n1 0 0\n0 1 0\n0 0 1\n0\n1 0 0 0\n0 1 0 0\n0 0 1 5\n\n" * 2,
        "a camera name with a slash": b"../x\n1 0 0\n0 1 0\n0 0 1\n0\n1 0 0 0\n0 1 0 0\n0 0 1 5\n",
    },
    "tex_var": {v: v.encode() for v in ("0", "-1", "nan", "inf", "1e400", "many words")},
    "vert_var": {v: v.encode() for v in ("0", "-4", "nan", "-inf")},
    "vert_mean": {
        "not a multiple of 3": np.zeros(7, np.float32).tobytes(),
        "another vertex count": np.zeros(30, np.float32).tobytes(),
        "NaN values": np.full(CAPTURE.n_vertices * 3, np.nan, np.float32).tobytes(),
        "infinite values": np.full(CAPTURE.n_vertices * 3, np.inf, np.float32).tobytes(),
    },
    "vertices": {
        "not a multiple of 3": np.zeros(5, np.float32).tobytes(),
        "another vertex count": np.zeros(33, np.float32).tobytes(),
        "NaN values": np.full(CAPTURE.n_vertices * 3, np.nan, np.float32).tobytes(),
    },
    "head pose": {
        "singular (all zero)": b"0 0 0 0\n0 0 0 0\n0 0 0 0\n",
        "rank one": b"1 1 1 0\n1 1 1 0\n1 1 1 0\n",
        "NaN": b"nan 0 0 0\n0 1 0 0\n0 0 1 0\n",
        "infinite translation": b"1 0 0 inf\n0 1 0 0\n0 0 1 0\n",
        "huge scale": b"1e30 0 0 0\n0 1e30 0 0\n0 0 1e30 0\n",
        "camera at the head origin": b"1 0 0 1e12\n0 1 0 0\n0 0 1 0\n",
        "2x4": b"1 0 0 0\n0 1 0 0\n",
        "ragged rows": b"1 0 0 0\n0 1 0\n0 0 1 0\n",
        "4x4 with a bad last row": b"1 0 0 0\n0 1 0 0\n0 0 1 0\n1 1 1 1\n",
        "words": b"identity\n",
    },
    "mesh OBJ": {
        "quads": b"v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\nf 1/1 2/1 3/1 4/1\n",
        "index 0": b"v 0 0 0\nvt 0 0\nf 0/1 1/1 1/1\n",
        "index out of range": b"v 0 0 0\nvt 0 0\nf 1/1 2/1 9/1\n",
        "negative index": b"v 0 0 0\nvt 0 0\nf -1/1 1/1 1/1\n",
        "huge index": b"v 0 0 0\nvt 0 0\nf 1/1 1/1 100000000000000000000000/1\n",
        "a vertex with two coordinates": b"v 0 0\nv 1 0 0\nv 1 1 0\nvt 0 0\nf 1/1 2/1 3/1\n",
        "a uv with one coordinate": b"v 0 0 0\nv 1 0 0\nv 1 1 0\nvt 0\nf 1/1 2/1 3/1\n",
        "faces without uvs": b"v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 3\n",
        "no faces": b"v 0 0 0\n",
        "NaN uvs": b"v 0 0 0\nv 1 0 0\nv 1 1 0\nvt nan 0\nf 1/1 2/1 3/1\n",
    },
    "tex_mean": {
        "not square": _image((16, 8)),
        "another size than the textures": _image((32, 32)),
        "grayscale": _image((16, 16), "L"),
        "RGBA": _image((16, 16), "RGBA"),
        "a decompression bomb (100000^2 claimed)": _png(100_000, 100_000),
        "a 16-bit PNG": _png(16, 16, mode=2, depth=16, data=bytes(16 * (1 + 16 * 6))),
        "a PNG with a broken stream": _png(16, 16, data=b"\x00" * 7),
    },
    "texture": {
        "another size": _image((8, 8)),
        "a decompression bomb (100000^2 claimed)": _png(100_000, 100_000),
        "a PNG with a broken stream": _png(16, 16, data=b"\x01\x02"),
        "a JPEG header": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(20),
    },
    "photo": {
        "a decompression bomb (100000^2 claimed)": _png(100_000, 100_000),
        "a zero-height header": _png(64, 0),
    },
}


def apply(mutation: bytes | Callable[[Path], None], path: Path) -> None:
    if callable(mutation):
        mutation(path)
    else:
        path.write_bytes(mutation)


CASES = [(f, m) for f in FILES for m in GENERIC] + [
    (f, m) for f, ms in SPECIFIC.items() for m in ms
]


@pytest.mark.parametrize("target, mutation", CASES)
def test_a_malformed_capture_reads_or_fails_with_one_line(target, mutation, work, model):
    root = root_of(work)
    with restored(root / FILES[target]):
        apply(SPECIFIC.get(target, {}).get(mutation) or GENERIC[mutation], root / FILES[target])
        before = snapshot(work)
        call("capture", read_capture, root, model)
        assert_untouched(before, work)


#: One malformed file of each kind, through `avatarq calibrate --data CAPTURE` end to end.
CLI_CASES = [
    ("frame list", "binary junk"),
    ("frame list", "a frame id that climbs out"),
    ("KRT", "a folder"),
    ("KRT", "zero rotation"),
    ("tex_mean", "a decompression bomb (100000^2 claimed)"),
    ("tex_var", "nan"),
    ("vert_mean", "NaN values"),
    ("mesh OBJ", "huge index"),
    ("vertices", "half of itself"),
    ("head pose", "singular (all zero)"),
    ("texture", "a PNG with a broken stream"),
    ("photo", "binary junk"),
]


@pytest.mark.parametrize("target, mutation", CLI_CASES)
def test_calibrate_on_a_malformed_capture_is_one_line(target, mutation, work):
    root = root_of(work)
    argv = ["calibrate", "--model", "dam.pt", "--data", root, "-o", "calib"]
    argv += ["--iters", "0", "--samples", "2", "--method", "max"]
    with restored(root / FILES[target]):
        apply(SPECIFIC.get(target, {}).get(mutation) or GENERIC[mutation], root / FILES[target])
        outcome = run_checked("capture", argv, work)
    assert FILES[target].split("/")[-1] in outcome.error or root.name in outcome.error


def test_the_pristine_capture_reads(work, model):
    assert not isinstance(call("capture", read_capture, root_of(work), model), AvatarqError)


# --------------------------------------------------------------------------- properties

NUMBERS = st.sampled_from(
    ["0", "1", "-1", "0.5", "1e3", "nan", "inf", "-inf", "1e400", "7", "x", "", "3/1", "1//1"]
)
LINES = st.lists(NUMBERS, max_size=6).map(" ".join)
TEXTS = {
    "frame list": st.lists(
        st.tuples(
            st.sampled_from([SEG, "E002", "..", "a/b", ""]),
            st.sampled_from(["000100", "000103", "1", "-1", "x", "../x", ""]),
        ).map(" ".join),
        max_size=4,
    ).map("\n".join),
    "KRT": st.lists(st.one_of(LINES, st.sampled_from(["400002", "400004", ""])), max_size=18).map(
        "\n".join
    ),
    "head pose": st.lists(LINES, max_size=5).map("\n".join),
    "mesh OBJ": st.lists(
        st.tuples(st.sampled_from(["v", "vt", "f", "#", "vn"]), LINES).map(" ".join), max_size=8
    ).map("\n".join),
    "tex_var": LINES,
}


@pytest.mark.parametrize("target", list(TEXTS))
def test_any_text_in_a_capture_file_reads_or_fails_with_one_line(target, work, model):
    root = root_of(work)

    @fuzz_settings(40)
    @given(text=TEXTS[target])
    def check(text):
        with restored(root / FILES[target]):
            (root / FILES[target]).write_text(text + "\n")
            call("capture", read_capture, root, model)

    check()
