"""The deployable decoder: (z, view) -> (texture, vertices) with weight norm folded away.

What `avatarq export` traces. Module names inside ``dec`` and ``warp`` are the checkpoint's
names (``dec.texture_decoder.upsample.0.conv1.deconv`` ...), so calibration entries,
checkpoint keys and ONNX node scopes all use one vocabulary.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avatarq.errors import AvatarqError
from avatarq.models.dam import DeepAppearanceModel
from avatarq.models.declaration import DecoderDeclaration, InputSpec
from avatarq.models.layers import Conv2dWN, ConvTranspose2dWN, DeconvTexelBias, LinearWN


@dataclass(frozen=True)
class Normalization:
    """Multiface normalization constants: texture = t * tex_std + tex_mean (0..255 units),
    vertices = v * vert_std + vert_mean.

    Attributes:
        tex_mean: float32 [3, T, T], flipped-on-load orientation (row 0 = v = 0).
        tex_std: scalar, sqrt(tex_var).
        vert_mean: float32 [V * 3] (x, y, z per vertex).
        vert_std: scalar, sqrt(vert_var).
    """

    tex_mean: np.ndarray
    tex_std: float
    vert_mean: np.ndarray
    vert_std: float


def _fold(module: nn.Module) -> nn.Module:
    """A plain torch layer with the effective (weight-normalized) weight of ``module``."""
    with torch.no_grad():
        if isinstance(module, LinearWN):
            plain: nn.Module = nn.Linear(module.in_features, module.out_features)
        elif isinstance(module, Conv2dWN | ConvTranspose2dWN):
            kind = nn.ConvTranspose2d if isinstance(module, ConvTranspose2dWN) else nn.Conv2d
            plain = kind(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                module.stride,
                module.padding,
            )
        else:
            raise TypeError(f"cannot fold {type(module).__name__}")
        plain.weight.copy_(module.effective_weight())
        plain.bias.copy_(module.bias)
    return plain


def fold_weight_norm(module: nn.Module) -> nn.Module:
    """Deep-copy ``module`` with every weight-normalized layer replaced by a plain one.

    The conv bias in front of an untied texel bias is added into the texel bias (exact),
    so each upsampling layer is one bias-free deconv plus one bias add.
    """
    module = copy.deepcopy(module)
    for child in list(module.modules()):
        if isinstance(child, DeconvTexelBias):
            with torch.no_grad():
                child.bias.add_(child.deconv.bias.view(1, -1, 1, 1))
            plain = _fold(child.deconv)
            plain.bias = None
            child.deconv = plain
    for name, child in list(module.named_modules()):
        if isinstance(child, (LinearWN, Conv2dWN, ConvTranspose2dWN)):
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, _fold(child))
    return module


class DeployableDecoder(nn.Module):
    """(z float32 [B, Z], view float32 [B, 3]) -> (texture [B, 3, T, T], vertices [B, V, 3]).

    The view direction is a unit vector from the head to the camera in head coordinates.
    Without normalization the outputs are in Multiface's normalized units; with it the
    texture is in 0..255 pixel units (flipped-on-load orientation) and the vertices in the
    capture's units. ``camera`` folds that camera's colour correction in (camera 0, the
    anchor, is the identity).
    """

    def __init__(
        self,
        model: DeepAppearanceModel,
        normalization: Normalization | None = None,
        camera: int | None = None,
    ) -> None:
        super().__init__()
        config = model.config
        self.config = config
        if config.arch == "pica":
            from avatarq.models.pica import fold_batch_norm

            self.dec = fold_batch_norm(copy.deepcopy(model.dec).eval())
        else:
            self.dec = fold_weight_norm(model.dec)
        self.warp = fold_weight_norm(model.warp) if config.arch == "warp" else None
        gain = torch.ones(1, 3, 1, 1)
        offset = torch.zeros(1, 3, 1, 1)
        if camera is not None:
            if not 0 <= camera < config.n_cams:
                raise AvatarqError(f"camera index {camera} out of range 0..{config.n_cams - 1}")
            with torch.no_grad():
                g, b = model.cc.gain_bias(torch.tensor([camera]))
            gain, offset = g.clone(), b.clone()
        tex_scale = torch.ones(1)
        tex_shift = torch.zeros(1, 3, config.tex_size, config.tex_size)
        vert_scale = torch.ones(1)
        vert_shift = torch.zeros(1, config.n_vertices, 3)
        if normalization is not None:
            mean = torch.as_tensor(np.asarray(normalization.tex_mean, np.float32))
            if mean.shape[-1] != config.tex_size:
                mean = F.interpolate(mean[None], size=(config.tex_size,) * 2, mode="area")[0]
            if tuple(mean.shape) != (3, config.tex_size, config.tex_size):
                raise AvatarqError(f"tex_mean has shape {list(mean.shape)}, expected [3, T, T]")
            vmean = np.asarray(normalization.vert_mean, np.float32).reshape(-1)
            if vmean.size != config.mesh_size:
                raise AvatarqError(
                    f"vert_mean has {vmean.size} values but the model has {config.n_vertices} vertices"
                )
            tex_scale = torch.tensor([float(normalization.tex_std)])
            tex_shift = mean[None]
            vert_scale = torch.tensor([float(normalization.vert_std)])
            vert_shift = torch.from_numpy(vmean).view(1, -1, 3)
        # Colour correction and de-normalization fold into one affine map per texel.
        self.register_buffer("tex_gain", gain * tex_scale)
        self.register_buffer("tex_offset", offset * tex_scale + tex_shift)
        self.register_buffer("vert_scale", vert_scale)
        self.register_buffer("vert_offset", vert_shift)
        self.denormalized = normalization is not None
        self.eval()

    @property
    def declaration(self) -> DecoderDeclaration:
        """Inputs z [Z], view [3]; outputs texture [3, T, T] and vertices [V, 3] (a mesh)."""
        c = self.config
        return DecoderDeclaration(
            c.arch,
            (InputSpec("z", (c.z_dim,)), InputSpec("view", (3,))),
            ("texture", "vertices"),
            ((3, c.tex_size, c.tex_size), (c.n_vertices, 3)),
            mesh=True,
            texture_output="texture",
            mesh_output="vertices",
        )

    def forward(self, z: torch.Tensor, view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        texture, mesh = self.dec(z, view)
        if self.warp is not None:
            texture = self.warp(z, texture)
        texture = texture * self.tex_gain + self.tex_offset
        vertices = mesh.view(z.shape[0], -1, 3) * self.vert_scale + self.vert_offset
        return texture, vertices
