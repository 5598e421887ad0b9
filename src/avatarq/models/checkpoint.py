"""Load and save Multiface-format checkpoints; infer the configuration from tensor shapes."""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from avatarq.core.files import atomic_path, existing_file
from avatarq.errors import AvatarqError
from avatarq.models.config import MAX_TEX_SIZE, DAMConfig
from avatarq.models.dam import DeepAppearanceModel

DDP_PREFIX = "module."
_BLOCK_KEY = re.compile(r"^dec\.texture_decoder\.upsample\.(\d+)\.")


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the DistributedDataParallel ``module.`` prefix if every key has it."""
    if state and all(k.startswith(DDP_PREFIX) for k in state):
        return {k[len(DDP_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise AvatarqError(f"not a Multiface DAM state_dict: missing key {key!r}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise AvatarqError(f"key {key!r} has shape {list(shape)}, expected a {ndim}-d tensor")
    return shape


def _infer_pica(state: Mapping[str, torch.Tensor]) -> DAMConfig:
    """The config of a pica model (``dec.texDecoder.*``, ``dec.geomDecoder.*``)."""
    from avatarq.models.pica import LATENT_SIDE

    first = _shape(state, "dec.geomDecoder.upsample.0.conv1.conv.weight", 4)
    z_dim = first[1] * LATENT_SIDE * LATENT_SIDE
    blocks = {
        int(m.group(1)) for k in state if (m := re.match(r"^dec\.texDecoder\.upsample\.(\d+)\.", k))
    }
    if not blocks or blocks != set(range(len(blocks))) or LATENT_SIDE << len(blocks) > MAX_TEX_SIZE:
        raise AvatarqError("a pica state_dict needs consecutive 'dec.texDecoder.upsample.N' blocks")
    n_vertices = _shape(state, "dec.vertex_uv", 2)[0]
    n_cams = _shape(state, "cc.weight", 4)[0] + 1
    has_encoder = any(k.startswith("enc.") for k in state)
    return DAMConfig("pica", z_dim, LATENT_SIDE << len(blocks), n_vertices, n_cams, has_encoder)


def infer_config(state: Mapping[str, torch.Tensor]) -> DAMConfig:
    """Infer arch, z, texture size, vertex count and camera count from a (bare) state_dict."""
    if "dec.geomDecoder.upsample.0.conv1.conv.weight" in state:
        return _infer_pica(state)
    z_dim = _shape(state, "dec.z_fc.weight", 2)[1]
    if z_dim < 1:
        raise AvatarqError("key 'dec.z_fc.weight' has 0 inputs; the latent size must be >= 1")
    mesh_size = _shape(state, "dec.mesh_fc.weight", 2)[0]
    if mesh_size < 3 or mesh_size % 3:
        raise AvatarqError(
            f"key 'dec.mesh_fc.weight' has {mesh_size} outputs; expected 3 per vertex (>= 3)"
        )
    n_cams = _shape(state, "cc.weight", 4)[0] + 1
    code = _shape(state, "dec.texture_fc.weight", 2)[0]
    base = round((code / z_dim) ** 0.5)
    if base not in (2, 4) or base * base * z_dim != code:
        raise AvatarqError(
            f"key 'dec.texture_fc.weight' has {code} outputs; expected z*4*4 or z*2*2 with z={z_dim}"
        )
    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise AvatarqError(
            "not a Multiface DAM state_dict: no 'dec.texture_decoder.upsample.*' keys"
        )
    if blocks != set(range(len(blocks))) or base * 4 ** len(blocks) > MAX_TEX_SIZE:
        raise AvatarqError(
            f"keys 'dec.texture_decoder.upsample.N' run over N in {sorted(blocks)[:8]}; a "
            f"texture of at most {MAX_TEX_SIZE} needs consecutive blocks from 0"
        )
    tex_size = base * 4 ** len(blocks)
    first_deconv = state.get("dec.texture_decoder.upsample.0.conv1.deconv.weight")
    last_bias = state.get(f"dec.texture_decoder.upsample.{len(blocks) - 1}.conv2.bias")
    if any(k.startswith("warp.") for k in state):
        arch = "warp"
    elif any(".res1." in k for k in state if k.startswith("dec.")):
        arch = "res"
    elif first_deconv is not None and first_deconv.ndim == 4 and first_deconv.shape[-1] == 3:
        arch = "bilinear"
    elif last_bias is not None and last_bias.ndim >= 1 and last_bias.shape[-1] == 1:
        arch = "non"
    else:
        arch = "base"
    has_encoder = any(k.startswith("enc.") for k in state)
    return DAMConfig(arch, z_dim, tex_size, mesh_size // 3, n_cams, has_encoder)


def model_from_state_dict(state: Mapping[str, torch.Tensor]) -> DeepAppearanceModel:
    """Build the model the state_dict describes and load it; shape mismatches name the key."""
    bare = strip_prefix(state)
    config = infer_config(bare)
    with torch.device("meta"):  # shapes only: nothing is allocated before they all match
        expected = DeepAppearanceModel(config).state_dict()
    for key, tensor in bare.items():
        if key not in expected:
            raise AvatarqError(
                f"unexpected key {key!r} for a {config.arch} DAM (z={config.z_dim}, "
                f"texture {config.tex_size})"
            )
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AvatarqError(
                f"key {key!r} has shape {list(tensor.shape)} but a {config.arch} DAM with "
                f"z={config.z_dim}, texture {config.tex_size} needs {list(expected[key].shape)}"
            )
    missing = [k for k in expected if k not in bare]
    if missing:
        raise AvatarqError(f"checkpoint is missing key {missing[0]!r} ({len(missing)} missing)")
    for key, tensor in bare.items():
        if not bool(torch.isfinite(tensor).all()):
            raise AvatarqError(f"tensor {key!r} holds NaN or infinite values")
    model = DeepAppearanceModel(config)
    model.load_state_dict({k: v.float() for k, v in bare.items()})
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file as a flat {name: tensor} dict (weights only, never code)."""
    path = existing_file(path, "checkpoint")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        raise AvatarqError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AvatarqError(
            f"{path} holds pickled objects, not a plain state_dict; save model.state_dict() instead"
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes
        kind = "truncated or corrupt" if magic[:2] == b"PK" else "unreadable"
        raise AvatarqError(
            f"{path} is a {kind} PyTorch checkpoint ({type(exc).__name__})"
        ) from None
    if isinstance(obj, Mapping):
        for nested in ("state_dict", "model", "model_state_dict"):
            if nested in obj and isinstance(obj[nested], Mapping):
                obj = obj[nested]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise AvatarqError(f"{path} does not hold a state_dict (found {type(obj).__name__})")
    for key, value in obj.items():
        _check_entry(path, key, value)
    return dict(obj)


FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_entry(path: Path, key: object, value: object) -> None:
    """One state_dict entry: a parameter name and a dense real floating-point tensor that
    stores every element it claims (a stride-0 view may claim terabytes in a few bytes)."""
    if not isinstance(key, str):
        raise AvatarqError(
            f"{path}: key {key!r} is a {type(key).__name__}; a state_dict's keys are "
            "parameter names (strings)"
        )
    if not isinstance(value, torch.Tensor):
        raise AvatarqError(
            f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a "
            "plain state_dict"
        )
    if value.layout != torch.strided:
        raise AvatarqError(
            f"{path}: tensor {key!r} is {str(value.layout).removeprefix('torch.')}; expected "
            "a dense floating-point tensor"
        )
    counter = key.endswith(".num_batches_tracked") and value.dtype == torch.int64
    if value.dtype not in FLOAT_DTYPES and not counter:  # BatchNorm counts batches in int64
        raise AvatarqError(
            f"{path}: tensor {key!r} has dtype {str(value.dtype).removeprefix('torch.')}; "
            "expected float32 (or float16, bfloat16, float64)"
        )
    claimed = value.numel() * value.element_size()
    stored = value.untyped_storage().nbytes()
    if claimed > stored:
        raise AvatarqError(
            f"{path}: tensor {key!r} has shape {list(value.shape)} ({claimed} bytes) but the "
            f"file stores {stored} bytes of it; the checkpoint's sizes are inconsistent"
        )


def load_checkpoint(path: str | Path) -> DeepAppearanceModel:
    """Load a Multiface-format DAM checkpoint (with or without ``module.``) in eval mode.

    Every failure is an AvatarqError naming the file: unreadable bytes, pickled objects,
    keys that are not strings, tensors that are not dense floating point, sizes the file
    does not store, shapes no DAM has, NaN or infinite weights."""
    state = read_state_dict(path)
    try:
        return model_from_state_dict(state)
    except AvatarqError as exc:
        raise AvatarqError(f"{path}: {exc}") from None


def save_checkpoint(model: DeepAppearanceModel, path: str | Path, ddp_prefix: bool = True) -> None:
    """Save ``model.state_dict()`` as Multiface does (keys prefixed ``module.`` by default)."""
    prefix = DDP_PREFIX if ddp_prefix else ""
    state = {prefix + k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
