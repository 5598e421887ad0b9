"""The bundle: the directory `avatarq export` writes and every later command reads.

Layout (see docs/bundle.md)::

    dam.avq/
      model.onnx           the decoder with its precision plan
      manifest.json        typed, versioned (`avatarq.export.manifest.Manifest`)
      normalization.npz    tex_mean, tex_std, vert_mean, vert_std, whenever known
      topology.npz         vert_ids, uv_ids, uvs (what the render stage needs), when known
      reference/model.onnx the FP32 graph non-FP32 bundles are judged against
      calib/               the calibration artifact, when quantized
      engines/             serialized engines, named by backend and target
      codebook/codebook.npz the latent-stream codebook (``avatarq vq --bundle``), optional

Opening a bundle validates the manifest and checks that every path it names stays inside
the bundle (no absolute paths, no ``..``, no symbolic links). The graph's sha256 is checked
against the manifest before anything is built from it (`Bundle.checked_model_path`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avatarq.core.documents import dump_document, load_versioned_document, shared_fields
from avatarq.core.files import StagedDirectory, atomic_write_text, inside
from avatarq.core.hashing import file_sha256
from avatarq.errors import AvatarqError
from avatarq.export.manifest import (
    READABLE_SCHEMA_VERSIONS,
    CodebookRecord,
    Manifest,
    OnnxRuntimeEngineRecord,
    TensorRTEngineRecord,
    TensorSpec,
    engine_files,
)

MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
TOPOLOGY_FILE = "topology.npz"
NORMALIZATION_FILE = "normalization.npz"
REFERENCE_FILE = "reference/model.onnx"
ENGINES_DIR = "engines"
CODEBOOK_FILE = "codebook/codebook.npz"
EngineRecord = OnnxRuntimeEngineRecord | TensorRTEngineRecord

__all__ = [
    "CODEBOOK_FILE",
    "ENGINES_DIR",
    "MANIFEST_FILE",
    "MODEL_FILE",
    "NORMALIZATION_FILE",
    "REFERENCE_FILE",
    "TOPOLOGY_FILE",
    "Bundle",
    "BundleWriter",
    "EngineRecord",
    "Manifest",
    "TensorSpec",
    "is_bundle",
    "open_bundle",
]


@dataclass
class Bundle:
    """An opened bundle directory (read side)."""

    root: Path
    manifest: Manifest
    _model_checked: bool = field(default=False, repr=False, compare=False)

    @property
    def model_path(self) -> Path:
        return self.root / MODEL_FILE

    @property
    def topology_path(self) -> Path:
        return self.root / TOPOLOGY_FILE

    @property
    def is_quantized(self) -> bool:
        return self.manifest.precision in ("int8", "mixed")

    def checked_model_path(self) -> Path:
        """model.onnx, after checking its sha256 and its inputs and outputs against the
        manifest (once per Bundle)."""
        if not self._model_checked:
            if file_sha256(self.model_path) != self.manifest.model_sha256:
                raise AvatarqError(
                    f"{self.model_path} is not the graph this bundle's manifest describes (its "
                    "sha256 differs); re-export the bundle"
                )
            check_graph_io(self.model_path, self.manifest)
            self._model_checked = True
        return self.model_path

    def reference_path(self) -> Path | None:
        """The FP32 reference graph (sha256-checked): model.onnx itself for an FP32 bundle,
        ``reference/model.onnx`` for others, None when the bundle was exported without it."""
        if self.manifest.precision == "fp32":
            return self.checked_model_path()
        ref = self.manifest.reference
        if ref is None:
            return None
        path = inside(self.root, ref.path, "reference graph")
        if not path.is_file():
            raise AvatarqError(f"bundle {self.root} lists {ref.path} but the file is missing")
        if file_sha256(path) != ref.sha256:
            raise AvatarqError(f"{path} is not the reference graph the manifest pins (sha256)")
        check_graph_io(path, self.manifest)
        return path

    def caching_graph_path(self, which: str) -> Path:
        """The Neural-Caching graph ``which`` ("cache" or "warp"), after checking its sha256
        and its inputs and outputs against the manifest's caching record."""
        record = self.manifest.caching
        if record is None:
            raise AvatarqError(
                f"bundle {self.root} has no Neural-Caching graphs; add them with avatarq "
                "distill-warp --bundle"
            )
        if which not in ("cache", "warp"):
            raise AvatarqError(f"caching graph must be 'cache' or 'warp', got {which!r}")
        graph = getattr(record, which)
        path = inside(self.root, graph.path, "caching graph")
        if not path.is_file():
            raise AvatarqError(f"bundle {self.root} lists {graph.path} but the file is missing")
        if file_sha256(path) != graph.sha256:
            raise AvatarqError(f"{path} is not the {which} graph the manifest pins (sha256)")
        check_graph_specs(path, [*graph.inputs, *graph.outputs])
        return path

    def topology(self):  # -> avatarq.core.topology.Topology
        from avatarq.core.topology import Topology

        if not self.topology_path.is_file():
            raise AvatarqError(
                f"bundle {self.root} has no {TOPOLOGY_FILE}; re-export with --capture to include the mesh topology"
            )
        return Topology.load(self.topology_path)

    def normalization_arrays(self) -> dict[str, np.ndarray] | None:
        """tex_mean float32 [3, T, T], tex_std, vert_mean float32 [V * 3], vert_std, or None."""
        name = self.manifest.normalization.arrays
        if name is None:
            return None
        path = inside(self.root, name, "normalization")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in ("tex_mean", "tex_std", "vert_mean", "vert_std")}
        except (OSError, KeyError, ValueError) as exc:
            raise AvatarqError(f"{path} is not a readable normalization file ({exc})") from None
        for key, value in arrays.items():
            if not np.isfinite(value).all():
                raise AvatarqError(f"{path}: {key} holds NaN or infinite values")
        return arrays

    def codebook(self):  # -> avatarq.codec.Codebook
        """The latent-stream codebook, after checking its sha256 and its shape against the
        manifest and the decoder's z size.

        Raises:
            AvatarqError: the bundle has none (train one with ``avatarq vq --bundle``), the
                file is missing, altered or not a codebook.
        """
        from avatarq.codec import load_codebook

        record = self.manifest.codebook
        if record is None:
            raise AvatarqError(
                f"bundle {self.root} has no codebook; train one with avatarq vq --bundle "
                f"{self.root}"
            )
        path = inside(self.root, record.path, "codebook")
        if not path.is_file() or path.is_symlink():
            raise AvatarqError(f"bundle {self.root} lists {record.path} but the file is missing")
        if file_sha256(path) != record.sha256:
            raise AvatarqError(
                f"{path} is not the codebook the manifest pins (sha256 differs); retrain it "
                "with avatarq vq --bundle --force"
            )
        book = load_codebook(path)
        shape = (book.codebook_size, book.stages, book.groups, book.bits_per_frame)
        if shape != (record.codebook_size, record.stages, record.groups, record.bits_per_frame):
            raise AvatarqError(f"{path} does not have the shape the manifest records")
        if book.z_dim != self.manifest.z_dim:
            raise AvatarqError(
                f"{path} codes z of {book.z_dim} dimensions, the decoder takes {self.manifest.z_dim}"
            )
        return book

    def add_codebook(self, codebook, force: bool = False) -> CodebookRecord:
        """Write ``codebook`` (`avatarq.codec.Codebook`) into the bundle as `CODEBOOK_FILE`
        and record it in the manifest (file first, then the manifest, each atomically).

        Raises:
            AvatarqError: z sizes differ; the bundle already has a codebook and not ``force``.
        """
        if codebook.z_dim != self.manifest.z_dim:
            raise AvatarqError(
                f"the codebook codes z of {codebook.z_dim} dimensions, bundle {self.root} "
                f"decodes z of {self.manifest.z_dim}"
            )
        if self.manifest.codebook is not None and not force:
            raise AvatarqError(
                f"bundle {self.root} already has a codebook; pass --force to replace it"
            )
        folder = self.root / CODEBOOK_FILE.split("/")[0]
        if folder.is_symlink() or folder.exists() and not folder.is_dir():
            raise AvatarqError(f"{folder} is not a folder avatarq wrote; remove it first")
        path = codebook.save(self.root / CODEBOOK_FILE)
        record = shared_fields(
            codebook,
            CodebookRecord,
            path=CODEBOOK_FILE,
            sha256=file_sha256(path),
            train_mse=list(codebook.train_mse),
        )
        self.manifest.codebook = record
        self.save_manifest()
        return record

    def save_manifest(self) -> None:
        """Rewrite manifest.json atomically (used when engines are added)."""
        atomic_write_text(self.root / MANIFEST_FILE, dump_document(self.manifest))


_ONNX_TYPES = {"float32": 1, "float16": 10}  # onnx.TensorProto.FLOAT, FLOAT16


def check_graph_io(path: Path, manifest: Manifest) -> None:
    """AvatarqError unless the ONNX graph at ``path`` has the inputs and outputs the manifest
    describes: same names, element types and shapes (``batch`` = any dynamic dimension)."""
    check_graph_specs(path, [*manifest.inputs, *manifest.outputs])


def check_graph_specs(path: Path, specs: list[TensorSpec]) -> None:
    """`check_graph_io` against a list of tensor specs."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - any failure to parse the file
        raise AvatarqError(f"{path} is not a readable ONNX graph ({type(exc).__name__})") from None
    declared = {v.name: v.type.tensor_type for v in [*graph.input, *graph.output]}
    for spec in specs:
        tensor = declared.get(spec.name)
        if tensor is None:
            raise AvatarqError(
                f"{path} has no tensor {spec.name!r} that the manifest describes; it has "
                f"{', '.join(declared) or 'none'}"
            )
        shape = [d.dim_value if d.HasField("dim_value") else "batch" for d in tensor.shape.dim]
        expected = [d if isinstance(d, int) else "batch" for d in spec.shape]
        if tensor.elem_type != _ONNX_TYPES[spec.dtype] or shape != expected:
            raise AvatarqError(
                f"{path}: tensor {spec.name} is {onnx.TensorProto.DataType.Name(tensor.elem_type).lower()} "
                f"{shape}, the manifest says {spec.dtype} {expected}"
            )


def is_bundle(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding an avatarq bundle manifest (what avatarq may
    replace with ``--force``); any other folder is never deleted."""
    manifest = Path(path) / MANIFEST_FILE
    if not manifest.is_file() or manifest.stat().st_size > 64 << 20:
        return False
    try:
        data = json.loads(manifest.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    keys = {"schema_version", "arch", "inputs", "outputs", "layer_precision"}
    return isinstance(data, dict) and keys <= set(data)


def open_bundle_to_extend(path: str | Path, part: str, what: str, force: bool) -> Bundle:
    """`open_bundle` for a command that adds manifest field ``part`` (``"codebook"``,
    ``"caching"``) to the bundle; one that has it already (``what``) needs ``force``."""
    opened = open_bundle(path)
    if getattr(opened.manifest, part) is not None and not force:
        raise AvatarqError(f"bundle {opened.root} already has {what}; pass --force to replace")
    return opened


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
    inside(root, MANIFEST_FILE, "manifest")
    manifest = load_versioned_document(
        manifest_path,
        Manifest,
        READABLE_SCHEMA_VERSIONS,
        f"bundle manifest {manifest_path}",
        "re-export the bundle with this avatarq",
    )
    if not (root / MODEL_FILE).is_file():
        raise AvatarqError(f"bundle {root} has no {MODEL_FILE}")
    inside(root, MODEL_FILE, "model graph")
    for record in manifest.engines:
        for name in engine_files(record):
            inside(root, name, f"engine file of {record.backend}")
    if manifest.reference is not None:
        inside(root, manifest.reference.path, "reference graph")
    if manifest.normalization.arrays is not None:
        inside(root, manifest.normalization.arrays, "normalization")
    if manifest.codebook is not None:
        inside(root, manifest.codebook.path, "codebook")
    if manifest.caching is not None:
        for graph in (manifest.caching.cache, manifest.caching.warp):
            inside(root, graph.path, "caching graph")
    return Bundle(root, manifest)


class BundleWriter:
    """Builds a bundle in a staging sibling folder and moves it into place on commit, so a
    failed export never leaves a half-written bundle behind.

    An existing ``out`` is replaced only when it is an avatarq bundle and ``force`` is set;
    any other existing path is refused (avatarq never deletes what it did not write).
    """

    def __init__(self, out: str | Path, force: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() or self.out.is_symlink():
            if self.out.is_symlink() or not self.out.is_dir():
                raise AvatarqError(
                    f"{self.out} exists and is not a bundle folder; choose another output"
                )
            if not is_bundle(self.out):
                if any(self.out.iterdir()):
                    raise AvatarqError(
                        f"{self.out} exists and is not an avatarq bundle; refusing to replace it"
                    )
            elif not force:
                raise AvatarqError(f"{self.out} exists; pass --force to replace that bundle")
        self.stage = StagedDirectory(self.out, replace=True)

    def path(self, name: str) -> Path:
        return self.stage.file(name)

    def commit(self, manifest: Manifest) -> Bundle:
        atomic_write_text(self.stage.path / MANIFEST_FILE, dump_document(manifest))
        self.stage.commit()
        return Bundle(self.out, manifest)

    def abort(self) -> None:
        self.stage.abort()

    def __enter__(self) -> BundleWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.stage.committed:
            self.abort()
