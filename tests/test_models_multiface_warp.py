"""A warp checkpoint written by Multiface's own code loads unchanged and decodes identically.

The fixture ``data/multiface_warp_t16.pt`` was made by the public Multiface ``models.py``
(facebookresearch/multiface) and saved as its training script saves a DistributedDataParallel
model: ``state_dict()`` with every key prefixed ``module.``. Multiface itself only builds 512
and 1024 textures, whose warp models hold 25 M and 33 M parameters; so that the fixture stays
under 2 MB it is a reduced size built from Multiface's own classes: a ``WarpFieldDecoder``
(tex_size=16, z_dim=8) whose four ConvUpsample blocks were replaced by one public
``ConvUpsample(256, 32, 16, 2)`` followed, as in Multiface, by ``nn.Upsample(size=16,
mode="bilinear")`` and ``nn.Conv2d(16, 2, 3, 1, 1)`` (so the keys are ``warp.mlp.{0,2}``,
``warp.upsample.0.*``, ``warp.upsample.2.*`` and the buffer ``warp.normal_grid``); a
``DeepAppearanceDecoder`` (z_dim=8, 12 vertices) whose texture decoder is one public
``ConvUpsample(8, 8, 3, 4, no_activ=True)`` (4 -> 16 texels); and a ``ColorCorrection`` of 3
cameras. No encoder (avatarq reads decoder-only checkpoints). Weights are Multiface's glorot
initialisation, then perturbed with fixed seeds (weight-norm gains x(1 + 0.2 N), texel biases
N(0, 0.2^2), colour correction around 1 / 0, and the last warp conv scaled so that the warp
field moves texels by about one texel).

``data/multiface_warp_t16_outputs.npz`` holds fixed inputs (``z`` [3, 8], unit ``view``
[3, 3], ``cams`` = [0, 1, 2]) and what the public code computed from them:
``unwarped_texture`` and ``mesh`` from ``dec(z, view)``, ``warped_texture`` and ``grid``
([3, 16, 16, 2]) from ``warp(z, unwarped_texture)``, ``texture`` = ``cc(warped_texture,
cams)``.
"""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from avatarq.export.onnx_export import export_onnx
from avatarq.models import DAMConfig, DeployableDecoder, load_checkpoint, read_state_dict
from avatarq.models.checkpoint import model_from_state_dict, strip_prefix

DATA = Path(__file__).parent / "data"
CHECKPOINT = DATA / "multiface_warp_t16.pt"
# float32 rounding only: the same operations in the same order give the same bits in
# PyTorch; folding weight norm and ONNX Runtime's kernels reorder sums.
EXACT_TOL = 1e-6
FOLDED_TOL = 1e-5


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    with np.load(DATA / "multiface_warp_t16_outputs.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def inputs(expected) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(expected["z"]),
        torch.from_numpy(expected["view"]),
        torch.from_numpy(expected["cams"]),
    )


def _max_abs(actual: torch.Tensor | np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(np.asarray(actual, np.float64) - reference).max())


def test_the_fixture_has_multiface_key_names():
    keys = set(read_state_dict(CHECKPOINT))
    assert all(k.startswith("module.") for k in keys)
    for key in (
        "module.warp.normal_grid",
        "module.warp.mlp.0.g",
        "module.warp.mlp.2.weight",
        "module.warp.upsample.0.conv1.deconv.weight",
        "module.warp.upsample.0.conv2.bias",
        "module.warp.upsample.2.weight",
        "module.warp.upsample.2.bias",
    ):
        assert key in keys


def test_the_multiface_warp_checkpoint_loads_with_its_config_inferred():
    model = load_checkpoint(CHECKPOINT)
    assert model.config == DAMConfig(
        arch="warp", z_dim=8, tex_size=16, n_vertices=12, n_cams=3, has_encoder=False
    )


def test_every_tensor_loads_unchanged_including_the_normal_grid_buffer():
    state = strip_prefix(read_state_dict(CHECKPOINT))
    loaded = load_checkpoint(CHECKPOINT).state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_bare_keys_load_like_ddp_prefixed_keys(inputs):
    z, view, cams = inputs
    bare = model_from_state_dict(strip_prefix(read_state_dict(CHECKPOINT)))
    prefixed = load_checkpoint(CHECKPOINT)
    with torch.no_grad():
        assert torch.equal(bare.decode(z, view, cams)[0], prefixed.decode(z, view, cams)[0])


def test_the_sampling_grid_is_multiface_s(inputs, expected):
    model = load_checkpoint(CHECKPOINT)
    with torch.no_grad():
        grid = model.warp.grid(inputs[0])
    assert grid.shape == (3, 16, 16, 2)
    assert _max_abs(grid, expected["grid"]) <= EXACT_TOL


def test_the_decoded_texture_and_mesh_are_multiface_s(inputs, expected):
    z, view, cams = inputs
    model = load_checkpoint(CHECKPOINT)
    with torch.no_grad():
        unwarped, _ = model.dec(z, view)
        texture, mesh = model.decode(z, view, cams)
    assert _max_abs(unwarped, expected["unwarped_texture"]) <= EXACT_TOL
    assert _max_abs(texture, expected["texture"]) <= EXACT_TOL
    assert _max_abs(mesh, expected["mesh"]) <= EXACT_TOL


def test_the_warp_moves_texels_so_the_comparison_is_not_vacuous(expected):
    moved = np.abs(expected["warped_texture"] - expected["unwarped_texture"]).max()
    assert moved > 0.1


def test_colour_correction_applies_after_the_warp(inputs, expected):
    z, view, _ = inputs
    model = load_checkpoint(CHECKPOINT)
    with torch.no_grad():
        warped, _ = model.decode(z, view)
    assert _max_abs(warped, expected["warped_texture"]) <= EXACT_TOL


@pytest.mark.parametrize("camera", [0, 1, 2])
def test_the_deployable_decoder_reproduces_multiface_per_camera(inputs, expected, camera):
    z, view, cams = inputs
    decoder = DeployableDecoder(load_checkpoint(CHECKPOINT), camera=camera)
    with torch.no_grad():
        texture, vertices = decoder(z, view)
    row = int(np.flatnonzero(cams.numpy() == camera)[0])
    assert _max_abs(texture[row], expected["texture"][row]) <= FOLDED_TOL
    assert _max_abs(vertices, expected["mesh"]) <= FOLDED_TOL


def test_the_onnx_graph_under_onnx_runtime_reproduces_multiface(inputs, expected):
    z, view, _ = inputs
    # Camera 0 is the anchor (no correction), so the graph's texture is the warped one.
    graph = export_onnx(DeployableDecoder(load_checkpoint(CHECKPOINT)))
    grid_samples = [n for n in graph.graph.node if n.op_type == "GridSample"]
    assert len(grid_samples) == 1
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    texture, vertices = session.run(None, {"z": z.numpy(), "view": view.numpy()})
    assert _max_abs(texture, expected["warped_texture"]) <= FOLDED_TOL
    assert _max_abs(vertices, expected["mesh"]) <= FOLDED_TOL
