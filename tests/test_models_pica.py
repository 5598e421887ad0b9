"""PiCA-style decoders (arch ``pica``): NPVA's block layout, BatchNorm folding, checkpoints."""

import onnx
import pytest
import torch
from typer.testing import CliRunner

from avatarq.cli import app
from avatarq.errors import AvatarqError
from avatarq.export.onnx_export import export_onnx
from avatarq.models import (
    DAMConfig,
    DeepAppearanceModel,
    DeployableDecoder,
    load_checkpoint,
    save_checkpoint,
)
from avatarq.models.pica import (
    ConvUpBlock,
    Upsampler,
    fold_batch_norm,
    npva_upsampler,
    vertex_uvs,
)

runner = CliRunner()


def _randomize_batch_norms(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen))
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=gen))
            m.bias.data.copy_(torch.randn(c, generator=gen))
        if hasattr(m, "bias") and isinstance(m.bias, torch.nn.Parameter) and m.bias.dim() == 3:
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))


def _pica_model(seed: int = 0) -> DeepAppearanceModel:
    torch.manual_seed(seed)
    config = DAMConfig("pica", z_dim=128, tex_size=32, n_vertices=5, n_cams=2, has_encoder=False)
    model = DeepAppearanceModel(config)
    _randomize_batch_norms(model)
    model.dec.set_vertex_uv(torch.rand(5, 2).numpy())
    return model.eval()


def test_a_block_doubles_the_side_with_npva_key_names():
    block = ConvUpBlock(4, 16, 8)
    assert block(torch.zeros(2, 4, 8, 8)).shape == (2, 16, 16, 16)
    assert sorted(block.state_dict()) == [
        "conv1.bias",
        "conv1.bn.bias",
        "conv1.bn.num_batches_tracked",
        "conv1.bn.running_mean",
        "conv1.bn.running_var",
        "conv1.bn.weight",
        "conv1.conv.weight",
        "conv2.bias",
        "conv2.weight",
    ]


def test_folding_batch_norm_keeps_the_eval_outputs():
    up = Upsampler([4, 16, 8])
    _randomize_batch_norms(up)
    up.eval()
    x = torch.randn(3, 4, 8, 8)
    want = up(x)
    folded = fold_batch_norm(up)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), want, atol=1e-5, rtol=1e-5)


def test_the_exported_graph_has_depth_to_space_and_no_batch_norm():
    ops = {n.op_type for n in export_onnx(DeployableDecoder(_pica_model())).graph.node}
    assert "DepthToSpace" in ops
    assert "BatchNormalization" not in ops


def test_a_pica_decoder_declares_z_view_texture_and_vertices():
    declaration = DeployableDecoder(_pica_model()).declaration
    assert declaration.arch == "pica"
    assert declaration.outputs == ("texture", "vertices")
    assert declaration.output_shapes == ((3, 32, 32), (5, 3))


def test_a_pica_checkpoint_loads_back_identically(tmp_path):
    model = _pica_model()
    save_checkpoint(model, tmp_path / "pica.pt")
    loaded = load_checkpoint(tmp_path / "pica.pt")
    assert loaded.config == model.config
    z, view = torch.randn(2, 128), torch.nn.functional.normalize(torch.randn(2, 3), dim=1)
    for a, b in zip(loaded.decode(z, view), model.decode(z, view), strict=True):
        torch.testing.assert_close(a, b)


def test_pica_latents_are_multiples_of_an_8x8_grid():
    with pytest.raises(AvatarqError, match="z_dim 100 is not a multiple of 64"):
        DAMConfig("pica", z_dim=100, tex_size=32, n_vertices=5, n_cams=2)


def test_an_npva_state_dict_loads_by_its_key_names():
    source = Upsampler([4, 32, 16, 3])
    _randomize_batch_norms(source, seed=3)
    state = {f"module.geomDecoder.{k}": v for k, v in source.state_dict().items()}
    for i in range(3):  # NPVA's Conv2dBNUB also saves its unused inherited conv weight
        state[f"module.geomDecoder.upsample.{i}.conv1.weight"] = torch.zeros(1)
    loaded = npva_upsampler(state, "module.geomDecoder.")
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(loaded(x), source.eval()(x))


def test_an_npva_state_dict_with_a_wrong_shape_names_the_key():
    state = {f"exprDecoder.{k}": v for k, v in Upsampler([4, 16, 3]).state_dict().items()}
    state["exprDecoder.upsample.0.conv1.bias"] = torch.zeros(16, 4, 4)
    with pytest.raises(AvatarqError, match=r"key exprDecoder.upsample.0.conv1.bias has shape"):
        npva_upsampler(state, "exprDecoder.")


def test_vertex_uvs_take_the_first_corner_of_each_vertex():
    uv = vertex_uvs(
        [[0, 1, 2]], [[2, 1, 0]], torch.tensor([[0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]).numpy(), 4
    )
    assert uv.tolist() == [[1.0, 1.0], [0.5, 0.5], [0.0, 0.0], [0.5, 0.5]]


def test_low_bit_formats_calibrate_a_pica_decoder():
    from avatarq.calibration import CalibrationConfig
    from avatarq.calibration.pipeline import calibrate
    from avatarq.calibration.samples import samples_from_prior

    decoder = DeployableDecoder(_pica_model())
    samples = samples_from_prior(128, n_random=4, n_clips=1, clip_length=2)
    artifact = calibrate(decoder, samples, CalibrationConfig(bits="w4a8", iters=1))
    assert set(artifact.precision.values()) == {"w4a8"}
    assert "dec.texDecoder.upsample.0.conv1.conv" in artifact.precision


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.slow
def test_synth_pica_then_export_int8_with_the_capture(tmp_path):
    synth = tmp_path / "synth"
    made = _cli(
        "synth",
        synth,
        "--arch",
        "pica",
        "--z-dim",
        64,
        "--iters",
        5,
        "--texture-size",
        64,
        "--model-texture-size",
        32,
    )
    assert made.exit_code == 0, made.stderr
    capture = synth / "capture"
    calibrated = _cli(
        "calibrate",
        "--model",
        synth / "dam.pt",
        "--data",
        capture,
        "--samples",
        8,
        "--iters",
        2,
        "-o",
        tmp_path / "calib",
    )
    assert calibrated.exit_code == 0, calibrated.stderr
    exported = _cli(
        "export",
        "--model",
        synth / "dam.pt",
        "--capture",
        capture,
        "--int8",
        "--calib",
        tmp_path / "calib",
        "-o",
        tmp_path / "pica.avq",
    )
    assert exported.exit_code == 0, exported.stderr
    ops = {n.op_type for n in onnx.load(tmp_path / "pica.avq" / "model.onnx").graph.node}
    assert {"DepthToSpace", "QuantizeLinear", "GridSample"} <= ops
    assert "BatchNormalization" not in ops
