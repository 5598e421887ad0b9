"""What a graph really stores: per-layer weight and activation formats, and bytes.

Read from the ONNX graph itself (not from the plan), so the manifest and ``avatarq info``
state what a runtime will load: the element type and layout of each layer's weight
initializer (INT4 packed, INT8, FP8, float16, float32; per channel, per tensor or blocks),
the quantizer on its input (its element type and, for a clipped grid inside the 8-bit
container, the effective bits), and the bytes of every initializer by role.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto

from avatarq.export.manifest import LayerStorage
from avatarq.export.onnx_export import QUANTIZABLE_OPS

_PASS_THROUGH = ("Cast", "Transpose", "Identity")
_BITS = {
    TensorProto.FLOAT: 32,
    TensorProto.FLOAT16: 16,
    TensorProto.INT8: 8,
    TensorProto.UINT8: 8,
    TensorProto.INT4: 4,
    TensorProto.UINT4: 4,
    TensorProto.FLOAT8E4M3FN: 8,
    TensorProto.INT64: 64,
    TensorProto.INT32: 32,
}
_SUFFIXES = (".weight_quantized", ".weight.fp16", ".weight")


def type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type).lower()


def initializer_bytes(init: onnx.TensorProto) -> int:
    """Stored bytes of one initializer (INT4: two values per byte)."""
    n = math.prod(init.dims) if init.dims else 1
    return math.ceil(n * _BITS.get(init.data_type, 32) / 8)


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.inits = {i.name: i for i in model.graph.initializer}
        self.producer = {o: n for n in model.graph.node for o in n.output}


def _weight(g: _Graph, name: str) -> tuple[str, LayerStorage] | None:
    scales, used = "none", 0
    while name in g.producer and g.producer[name].op_type in _PASS_THROUGH:
        name = g.producer[name].input[0]
    node = g.producer.get(name)
    if node is not None and node.op_type == "DequantizeLinear":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        scale = g.inits.get(node.input[1])
        if "block_size" in attrs:
            scales = f"blocks of {attrs['block_size']}"
        elif scale is not None and len(scale.dims) == 0:
            scales = "per-tensor"
        else:
            scales = "per-channel"
        used = sum(initializer_bytes(g.inits[i]) for i in node.input[1:] if i in g.inits)
        name = node.input[0]
    init = g.inits.get(name)
    if init is None:
        return None
    layer = next((name[: -len(s)] for s in _SUFFIXES if name.endswith(s)), None)
    if layer is None:
        return None
    storage = LayerStorage(
        type_name(init.data_type), scales, "float32", False, initializer_bytes(init) + used
    )
    return layer, storage


def _activation(g: _Graph, name: str, storage: LayerStorage) -> None:
    node = g.producer.get(name)
    if node is not None and node.op_type == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        storage.activation = type_name(to)
        return
    if node is None or node.op_type != "DequantizeLinear":
        return
    q = g.producer.get(node.input[0])
    zp = g.inits.get(node.input[2]) if len(node.input) > 2 else None
    kind = type_name(zp.data_type) if zp is not None else "int8"
    source = q.input[0] if q is not None else ""
    clip = g.producer.get(source)
    if clip is not None and clip.op_type == "Clip":
        lo, hi = (g.inits.get(i) for i in clip.input[1:3])
        scale = g.inits.get(node.input[1])
        if lo is not None and hi is not None and scale is not None:
            s = onnx.numpy_helper.to_array(scale).item()
            levels = (
                onnx.numpy_helper.to_array(hi).item() - onnx.numpy_helper.to_array(lo).item()
            ) / s
            kind = f"int{round(math.log2(levels + 1))} (in {kind})"
        source = clip.input[0]
    storage.activation = kind
    rotation = g.producer.get(source)
    storage.rotated = rotation is not None and rotation.name.endswith("/Rotate")


def describe_storage(model: onnx.ModelProto) -> tuple[dict[str, LayerStorage], dict[str, int]]:
    """({layer: storage}, bytes by role) of a graph.

    Roles: "layer_weights" (weights, scales, zero points, biases and input rotations of the
    quantizable layers),
    "texel_biases" ([1, C, H, W] bias initializers, with their scales), "other" (every
    other initializer) and "initializers" (the sum).
    """
    g = _Graph(model)
    layers: dict[str, LayerStorage] = {}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE_OPS or len(node.input) < 2:
            continue
        found = _weight(g, node.input[1])
        if found is None:
            continue
        name, storage = found
        _activation(g, node.input[0], storage)
        layers[name] = storage
    weight_names = set()
    for name in layers:
        weight_names |= {
            n
            for n in g.inits
            if n.startswith((name + ".weight", name + ".input_rotation"))
            or n in (name + ".bias", name + ".bias.fp16")
        }
    sizes = {"layer_weights": 0, "texel_biases": 0, "other": 0}
    for init in model.graph.initializer:
        nbytes = initializer_bytes(init)
        if init.name in weight_names:
            sizes["layer_weights"] += nbytes
        elif ".bias" in init.name and (
            len(init.dims) == 4
            or init.name.endswith((".bias.scale", ".bias.fp16", ".bias.quantized"))
        ):
            sizes["texel_biases"] += nbytes
        else:
            sizes["other"] += nbytes
    sizes["initializers"] = sum(sizes.values())
    return dict(sorted(layers.items())), sizes
