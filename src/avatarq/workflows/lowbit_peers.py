"""The low-bit study's peers that are not avatarq calibrations.

- ONNX Runtime's ``quantize_static`` (QDQ, MinMax, per-channel weights): int8 weights at
  w8a8, INT4 weights (``QuantType.QInt4``) at w4a8, int8 activations; other widths it has no
  form for. Measured like avatarq's graphs: the quantized graph under ONNX Runtime.
- NVIDIA ModelOpt's torch PTQ (``modelopt.torch.quantization``, an optional package:
  ``pip install nvidia-modelopt``): its recipes on the deployable decoder with the
  calibration samples as the forward loop, measured as ModelOpt's own fake-quant torch
  model (its export path targets TensorRT-LLM checkpoints, not a decoder's ONNX graph).
  Recipes per width: w8a8 ``INT8_DEFAULT_CFG`` (max) and ``INT8_SMOOTHQUANT_CFG``; w4a8
  ``W4A8_AWQ_BETA_CFG`` (INT4 AWQ weights in blocks of 128, FP8 activations) and
  ``INT4_AWQ_CFG`` (INT4 AWQ weights, activations left in floating point: W4A16, a
  weaker constraint than w4a8); fp8 ``FP8_DEFAULT_CFG``; any other wXaY the INT8 recipe with
  X-bit weights and Y-bit activations (max calibration).

`PeerRecipe.applies_to` says which widths a peer has a form for; `peer_textures` returns
the textures of one clip ([0, 1] units) and the stored bytes (0 where the peer writes no
deployable graph).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from avatarq.errors import AvatarqError
from avatarq.workflows.peers import TEXTURE_PEAK

MODELOPT_RECIPES = {
    "modelopt-max": {"w8a8": "INT8_DEFAULT_CFG", "fp8": "FP8_DEFAULT_CFG", "*": "INT8_DEFAULT_CFG"},
    "modelopt-smoothquant": {"w8a8": "INT8_SMOOTHQUANT_CFG"},
    "modelopt-awq-w4a8": {"w4a8": "W4A8_AWQ_BETA_CFG"},
    "modelopt-awq-w4a16": {"w4a8": "INT4_AWQ_CFG"},
}
ORT_WEIGHT_BITS = {"w8a8": 8, "w4a8": 4}


@dataclass(frozen=True)
class PeerRecipe:
    """A peer of the low-bit study: ``kind`` "ort" (quantize_static) or "modelopt"."""

    name: str
    kind: str

    def applies_to(self, bits: str) -> bool:
        if self.kind == "ort":
            return bits in ORT_WEIGHT_BITS
        recipes = MODELOPT_RECIPES[self.name]
        return bits in recipes or ("*" in recipes and bits.startswith("w"))


def default_peers() -> list[PeerRecipe]:
    return [PeerRecipe("ort-minmax", "ort")] + [PeerRecipe(n, "modelopt") for n in MODELOPT_RECIPES]


def modelopt_config(name: str, bits: str) -> dict[str, Any]:
    """ModelOpt's quantization config of peer ``name`` at ``bits`` (a deep copy)."""
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise AvatarqError(
            f"the ModelOpt peers need nvidia-modelopt ({exc}); pip install nvidia-modelopt"
        ) from None
    recipes = MODELOPT_RECIPES[name]
    recipe = recipes.get(bits) or recipes["*"]
    config = copy.deepcopy(getattr(mtq, recipe))
    if bits not in recipes:  # wXaY from the INT8 recipe
        w_bits, a_bits = (int(x) for x in bits[1:].split("a"))
        for entry in config["quant_cfg"]:
            cfg = entry.get("cfg") if isinstance(entry, dict) else None
            if not cfg or "num_bits" not in cfg:
                continue
            if entry["quantizer_name"] == "*weight_quantizer":
                cfg["num_bits"] = w_bits
            elif entry["quantizer_name"] == "*input_quantizer":
                cfg["num_bits"] = a_bits
    return config


def peer_textures(
    peer: PeerRecipe,
    bits: str,
    decoder: Any,
    fp32_path: Path,
    out_path: Path,
    calibration: tuple[np.ndarray, np.ndarray],
    clip: tuple[np.ndarray, np.ndarray],
    threads: int = 0,
) -> tuple[np.ndarray, int]:
    """(textures float32 [T, 3, S, S] in [0, 1] of ``clip``, bytes of the graph written).

    Args:
        decoder: the FP32 deployable decoder (ModelOpt quantizes a copy).
        fp32_path: its FP32 graph (quantize_static's input); out_path: where that writes.
        calibration, clip: (z float32 [N, Z], view float32 [N, 3]) to calibrate on / decode.
    """
    if not peer.applies_to(bits):
        raise AvatarqError(f"{peer.name} has no form for {bits}")
    if peer.kind == "ort":
        from avatarq.core.ort import make_session
        from avatarq.workflows.peers import PeerMethod, decode_clip, ort_quantize_static

        method = PeerMethod("ORT quantize_static MinMax", ort_method="MinMax")
        z, view = calibration
        ort_quantize_static(fp32_path, out_path, z, view, method, ORT_WEIGHT_BITS[bits])
        session = make_session(out_path, "cpu", threads)
        return decode_clip(session, *clip), out_path.stat().st_size
    return _modelopt_textures(peer, bits, decoder, calibration, clip), 0


def _modelopt_textures(
    peer: PeerRecipe,
    bits: str,
    decoder: Any,
    calibration: tuple[np.ndarray, np.ndarray],
    clip: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    import modelopt.torch.quantization as mtq
    import torch

    config = modelopt_config(peer.name, bits)
    z, view = (torch.from_numpy(np.ascontiguousarray(a, np.float32)) for a in calibration)

    def forward_loop(model: Any) -> None:
        with torch.no_grad():
            for start in range(0, z.shape[0], 4):
                model(z[start : start + 4], view[start : start + 4])

    model = mtq.quantize(copy.deepcopy(decoder).eval(), config, forward_loop)
    out = []
    with torch.no_grad():
        for start in range(0, clip[0].shape[0], 4):
            zc = torch.from_numpy(np.ascontiguousarray(clip[0][start : start + 4], np.float32))
            vc = torch.from_numpy(np.ascontiguousarray(clip[1][start : start + 4], np.float32))
            out.append(model(zc, vc)[0].numpy() / np.float32(TEXTURE_PEAK))
    return np.concatenate(out)
