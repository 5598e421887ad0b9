"""FP32/FP16 export: the ONNX graph, the bundle directory, validation against PyTorch."""

import json

import numpy as np
import onnx
import pytest
import torch

from avatarq.core.ort import make_session
from avatarq.data.capture import MultifaceCapture
from avatarq.data.encode import capture_normalization, encode_frames
from avatarq.errors import AvatarqError
from avatarq.export import ExportOptions, export_bundle, layer_nodes, open_bundle
from avatarq.models import DeployableDecoder, load_checkpoint


def _real_codes(avatar, n=4):
    capture = MultifaceCapture(avatar.capture_root)
    model = load_checkpoint(avatar.checkpoint)
    frames = capture.frames[:n]
    z = encode_frames(model, capture, frames)
    cam = next(iter(capture.cameras))
    view = torch.from_numpy(np.stack([capture.view_direction(s, f, cam) for s, f in frames]))
    return model, capture, z, view


def test_bundle_holds_model_manifest_normalization_and_topology(small_bundle):
    assert sorted(p.name for p in small_bundle.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "normalization.npz",
        "topology.npz",
    ]


def test_the_normalization_arrays_are_in_the_bundle_even_when_folded(small_avatar, small_bundle):
    from avatarq.data.capture import MultifaceCapture
    from avatarq.data.encode import capture_normalization

    bundle = open_bundle(small_bundle)
    arrays = bundle.normalization_arrays()
    expected = capture_normalization(MultifaceCapture(small_avatar.capture_root))
    assert bundle.manifest.normalization.folded
    np.testing.assert_array_equal(arrays["tex_mean"], np.asarray(expected.tex_mean, np.float32))
    assert float(arrays["vert_std"]) == pytest.approx(expected.vert_std)


def test_the_manifest_pins_the_graph_by_sha256(small_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy.avq"
    shutil.copytree(small_bundle, copy)
    bundle = open_bundle(copy)
    assert bundle.checked_model_path() == copy / "model.onnx"
    (copy / "model.onnx").write_bytes((copy / "model.onnx").read_bytes() + b"\0")
    with pytest.raises(AvatarqError, match="not the graph this bundle's manifest describes"):
        open_bundle(copy).checked_model_path()


def test_graph_has_named_inputs_outputs_and_dynamic_batch(small_bundle):
    model = onnx.load(small_bundle / "model.onnx")
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["z", "view"]
    assert [o.name for o in model.graph.output] == ["texture", "vertices"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value


def test_fp32_graph_matches_pytorch_to_1e4_on_real_codes(small_avatar, small_bundle):
    model, capture, z, view = _real_codes(small_avatar)
    decoder = DeployableDecoder(model, capture_normalization(capture))
    texture, vertices = make_session(small_bundle / "model.onnx").run(
        None, {"z": z.numpy(), "view": view.numpy()}
    )
    with torch.no_grad():
        ref_texture, ref_vertices = decoder(z, view)
    assert np.abs(texture - ref_texture.numpy()).max() < 1e-4 * 255
    assert np.abs(vertices - ref_vertices.numpy()).max() < 1e-3


def test_batch_dimension_accepts_other_sizes(small_bundle):
    session = make_session(small_bundle / "model.onnx")
    manifest = open_bundle(small_bundle).manifest
    for batch in (1, 5):
        z = np.zeros((batch, manifest.z_dim), np.float32)
        view = np.tile(np.float32([[0, 0, 1]]), (batch, 1))
        texture, vertices = session.run(None, {"z": z, "view": view})
        assert texture.shape == (batch, 3, manifest.tex_size, manifest.tex_size)
        assert vertices.shape == (batch, manifest.n_vertices, 3)


def test_manifest_records_io_precision_normalization_and_validation(small_bundle, small_avatar):
    manifest = open_bundle(small_bundle).manifest
    assert manifest.precision == "fp32"
    assert [t.name for t in manifest.inputs] == ["z", "view"]
    assert manifest.outputs[0].shape == ["batch", 3, 64, 64]
    assert manifest.normalization.folded is True
    assert manifest.validation.passed is True
    assert manifest.validation.texture_psnr_db > 80
    assert len(manifest.model_sha256) == 64 and manifest.reference is None
    assert set(manifest.layer_precision.values()) == {"fp32"}
    assert "dec.texture_decoder.upsample.0.conv1.deconv" in manifest.layer_precision
    assert len(manifest.source_checkpoint_sha256) == 64


def test_fp16_export_keeps_float32_io_and_reaches_50db(small_avatar, tmp_path):
    result = export_bundle(
        small_avatar.checkpoint,
        tmp_path / "fp16.avq",
        small_avatar.capture_root,
        ExportOptions(fp16=True),
    )
    assert result.validation.image.psnr_all > 50
    model = onnx.load(tmp_path / "fp16.avq" / "model.onnx")
    float32 = onnx.TensorProto.FLOAT
    assert all(
        v.type.tensor_type.elem_type == float32 for v in [*model.graph.input, *model.graph.output]
    )
    weight = next(i for i in model.graph.initializer if i.name.endswith("conv1.deconv.weight"))
    assert weight.data_type == onnx.TensorProto.FLOAT16


def test_every_quantizable_layer_is_found_by_its_module_name(small_bundle):
    found = layer_nodes(onnx.load(small_bundle / "model.onnx"))
    assert set(found) == {
        "dec.view_fc",
        "dec.z_fc",
        "dec.texture_fc",
        "dec.mesh_fc",
        "dec.texture_decoder.upsample.0.conv1.deconv",
        "dec.texture_decoder.upsample.0.conv2.deconv",
        "dec.texture_decoder.upsample.1.conv1.deconv",
        "dec.texture_decoder.upsample.1.conv2.deconv",
    }
    assert found["dec.texture_decoder.upsample.1.conv2.deconv"].op_type == "ConvTranspose"
    assert found["dec.mesh_fc"].op_type == "Gemm"


def test_same_checkpoint_gives_byte_identical_onnx(small_avatar, tmp_path):
    for name in ("a.avq", "b.avq"):
        export_bundle(
            small_avatar.checkpoint, tmp_path / name, options=ExportOptions(validate=False)
        )
    assert (tmp_path / "a.avq/model.onnx").read_bytes() == (
        tmp_path / "b.avq/model.onnx"
    ).read_bytes()


def test_failed_export_leaves_no_bundle_behind(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(AvatarqError):
        export_bundle(bad, tmp_path / "out.avq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pt"]


def test_opening_a_directory_without_manifest_is_a_user_error(tmp_path):
    with pytest.raises(AvatarqError, match="manifest.json is missing"):
        open_bundle(tmp_path)


def test_opening_a_bundle_with_a_corrupt_manifest_is_a_user_error(small_bundle, tmp_path):
    import shutil

    copy = tmp_path / "copy.avq"
    shutil.copytree(small_bundle, copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(AvatarqError, match="not valid JSON"):
        open_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(AvatarqError, match="schema_version"):
        open_bundle(copy)


def test_exported_graph_carries_no_source_paths_of_the_exporting_machine(small_bundle):
    model = onnx.load(small_bundle / "model.onnx")
    keys = {p.key for node in model.graph.node for p in node.metadata_props}
    assert "pkg.torch.onnx.stack_trace" not in keys
    assert b".py" not in (small_bundle / "model.onnx").read_bytes()
