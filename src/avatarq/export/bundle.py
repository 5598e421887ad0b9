"""The bundle: the directory `avatarq export` writes and every later command reads.

Layout (see docs/bundle.md)::

    dam.avq/
      model.onnx        the decoder with its precision plan
      manifest.json     schema, I/O, normalization, precision per layer, hashes, engines
      topology.npz      vert_ids, uv_ids, uvs (what the render stage needs), when known
      calib.json, ...   the calibration artifact, when quantized
      engines/          serialized engines, named by backend and target
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from avatarq.errors import AvatarqError
from avatarq.jsonfile import read_json_object

SCHEMA_VERSION = 1
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TOPOLOGY_FILE = "topology.npz"
ENGINES_DIR = "engines"


@dataclass
class TensorSpec:
    """One graph input or output: name, dtype, shape (``"batch"`` for the dynamic dim), meaning."""

    name: str
    dtype: str
    shape: list[int | str]
    meaning: str


@dataclass
class EngineRecord:
    """An engine file built from model.onnx (path relative to the bundle)."""

    backend: str
    path: str
    library_version: str
    target: str
    settings: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0


@dataclass
class Manifest:
    """What a runtime in any language needs to know about a bundle."""

    arch: str
    z_dim: int
    tex_size: int
    n_vertices: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    precision: str
    layer_precision: dict[str, str]
    normalization: dict[str, Any]
    source_checkpoint_sha256: str
    versions: dict[str, str]
    calib_sha256: str | None = None
    camera: int | None = None
    validation: dict[str, Any] = field(default_factory=dict)
    engines: list[EngineRecord] = field(default_factory=list)
    # what the graph stores: {layer: LayerStorage fields} and bytes by role ("model.onnx",
    # "initializers", "layer_weights", "texel_biases", "other", "fp32_initializers")
    layer_storage: dict[str, dict[str, Any]] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise AvatarqError(
                f"bundle manifest schema_version is {version!r}; this avatarq reads {SCHEMA_VERSION}"
            )
        try:
            data = dict(data)
            data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
            data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
            data["engines"] = [EngineRecord(**e) for e in data.get("engines", [])]
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise AvatarqError(f"bundle manifest is malformed ({exc})") from None


@dataclass(frozen=True)
class Bundle:
    """An opened bundle directory (read side)."""

    root: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def topology_path(self) -> Path:
        return self.root / TOPOLOGY_FILE

    def topology(self):  # -> avatarq.render.topology.Topology
        from avatarq.render.topology import Topology

        if not self.topology_path.is_file():
            raise AvatarqError(
                f"bundle {self.root} has no {TOPOLOGY_FILE}; re-export with --capture to include the mesh topology"
            )
        return Topology.load(self.topology_path)

    def save_manifest(self) -> None:
        """Rewrite manifest.json atomically (used when engines are added)."""
        _atomic_write_text(self.root / MANIFEST_FILE, self.manifest.to_json())


def open_bundle(path: str | Path) -> Bundle:
    """Open and validate a bundle directory; a broken one is an AvatarqError naming the problem."""
    root = Path(path)
    if not root.exists():
        raise AvatarqError(f"bundle not found: {root}")
    if not root.is_dir():
        raise AvatarqError(
            f"{root} is not a bundle directory (expected model.onnx + manifest.json)"
        )
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise AvatarqError(f"{root} is not a bundle: {MANIFEST_FILE} is missing")
    manifest = Manifest.from_dict(read_json_object(manifest_path))
    if not (root / MODEL_FILE).is_file():
        raise AvatarqError(f"bundle {root} has no {MODEL_FILE}")
    return Bundle(root, manifest)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


class BundleWriter:
    """Builds a bundle in a temporary sibling directory and moves it into place on commit,
    so a failed export never leaves a half-written bundle behind."""

    def __init__(self, out: str | Path, overwrite: bool = True) -> None:
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise AvatarqError(f"{self.out} exists; pass --force to overwrite")
        if (
            self.out.exists()
            and not (self.out / MANIFEST_FILE).exists()
            and any(self.out.iterdir())
        ):
            raise AvatarqError(f"{self.out} exists and is not a bundle; refusing to overwrite it")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))

    def path(self, name: str) -> Path:
        target = self.staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self, manifest: Manifest) -> Bundle:
        _atomic_write_text(self.staging / MANIFEST_FILE, manifest.to_json())
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.staging, self.out)
        return Bundle(self.out, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.staging.exists():
            self.abort()
