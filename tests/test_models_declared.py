"""Decoder declarations: any module, declared by its inputs and outputs, calibrates and exports."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from avatarq.calibration import CalibrationConfig
from avatarq.calibration.pipeline import calibrate
from avatarq.calibration.samples import CalibrationSamples
from avatarq.core.inputs import DecoderInputs
from avatarq.core.ort import make_session
from avatarq.errors import AvatarqError
from avatarq.export.exporter import export_decoder
from avatarq.export.options import ExportOptions
from avatarq.models.declaration import InputSpec, declare, load_factory


class TwoInputs(nn.Module):
    """(code [B, 2, 4, 4], t [B, 1]) -> (mask [B, 1, 8, 8], image [B, 3, 8, 8])."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.film = nn.Linear(1, 2)
        self.conv = nn.Conv2d(2, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)
        self.head = nn.Conv2d(3, 1, 1)

    def forward(self, code, t):
        x = code * self.film(t)[:, :, None, None]
        image = self.shuffle(self.conv(x))
        return torch.sigmoid(self.head(image)), image


class Sorter(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


class WithSort(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        self.head = Sorter()

    def forward(self, x):
        return self.head(self.conv(x))


def _inputs(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return DecoderInputs(
        {
            "code": rng.standard_normal((n, 2, 4, 4)).astype(np.float32),
            "t": rng.uniform(0, 1, (n, 1)).astype(np.float32),
        },
        clips=(tuple(range(n)),),
        source="test inputs",
    )


def test_input_spec_reads_name_and_shape():
    assert InputSpec.parse("code:4x8x8") == InputSpec("code", (4, 8, 8))


def test_input_spec_without_a_shape_is_a_user_error():
    with pytest.raises(AvatarqError, match="--input must be NAME:SHAPE"):
        InputSpec.parse("z")


def test_declare_puts_the_texture_output_first():
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    assert decoder.declaration.outputs == ("output1", "output0")
    assert decoder.declaration.output_shapes == ((3, 8, 8), (1, 8, 8))


def test_declare_names_the_outputs_of_an_unknown_texture_output():
    with pytest.raises(AvatarqError, match="names no output; the decoder returns output0, output1"):
        declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output="rgb")


def test_a_mesh_output_must_be_vertices():
    with pytest.raises(AvatarqError, match=r"must be vertices \[B, V, 3\]"):
        declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1, mesh_output=0)


def test_inputs_the_module_cannot_take_are_one_line():
    with pytest.raises(AvatarqError, match="the decoder fails on inputs code:3x4x4, t:1"):
        declare(TwoInputs(), ["code:3x4x4", "t:1"], texture_output=1)


def test_an_unsupported_op_names_the_op_and_the_module_path():
    with pytest.raises(AvatarqError, match=r"unsupported op aten\.sort in model\.head \(Sorter\)"):
        declare(WithSort(), ["x:1x4x4"], texture_output=0)


def test_calibration_feeds_declared_inputs_by_name():
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    samples = CalibrationSamples(_inputs())
    artifact = calibrate(decoder, samples, CalibrationConfig(iters=2))
    assert artifact.layer_names == ["model.film", "model.conv", "model.head"]


def test_layers_feeding_only_other_outputs_stay_float():
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    artifact = calibrate(decoder, CalibrationSamples(_inputs()), CalibrationConfig(iters=2))
    assert artifact.precision == {"model.film": "w8a8", "model.conv": "w8a8", "model.head": "fp32"}


def test_calibration_data_without_a_declared_input_is_refused():
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    samples = CalibrationSamples(DecoderInputs({"code": _inputs()["code"]}))
    with pytest.raises(AvatarqError, match="the calibration data has no array 't'"):
        calibrate(decoder, samples, CalibrationConfig(iters=2))


def test_exported_graph_has_the_declared_names_and_matches_torch(tmp_path):
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    result = export_decoder(decoder, tmp_path / "two.avq", ExportOptions())
    graph = onnx.load(tmp_path / "two.avq" / "model.onnx").graph
    assert [i.name for i in graph.input] == ["code", "t"]
    assert [o.name for o in graph.output] == ["output1", "output0"]
    feeds = _inputs(4).batch(0, 4)
    got = make_session(tmp_path / "two.avq" / "model.onnx", "cpu").run(None, feeds)
    want = decoder(*(torch.from_numpy(feeds[n]) for n in ("code", "t")))
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5)
    assert result.bundle.manifest.n_vertices == 0


@pytest.mark.slow
def test_int8_export_of_a_declared_decoder_has_qdq_on_every_layer(tmp_path):
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    result = export_decoder(
        decoder, tmp_path / "q.avq", ExportOptions(int8=True), data=_inputs(), force=False
    )
    assert result.validation
    assert set(result.bundle.manifest.layer_precision) == {"model.film", "model.conv", "model.head"}
    ops = {n.op_type for n in onnx.load(tmp_path / "q.avq" / "model.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "DepthToSpace"} <= ops


def test_int8_export_without_data_asks_for_it(tmp_path):
    decoder = declare(TwoInputs(), ["code:2x4x4", "t:1"], texture_output=1)
    with pytest.raises(AvatarqError, match="needs --data latents.npz holding its inputs"):
        export_decoder(decoder, tmp_path / "q.avq", ExportOptions(int8=True))
    assert not (tmp_path / "q.avq").exists()


def test_load_factory_names_a_missing_function(tmp_path):
    source = tmp_path / "mine.py"
    source.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(2, 2)\n")
    with pytest.raises(AvatarqError, match="mine.py defines no function 'build'"):
        load_factory(f"{source}:build")


def test_load_factory_refuses_a_factory_that_returns_no_module(tmp_path):
    source = tmp_path / "mine.py"
    source.write_text("def make():\n    return 3\n")
    with pytest.raises(AvatarqError, match=r"make\(\) returned int, not a torch.nn.Module"):
        load_factory(f"{source}:make")
