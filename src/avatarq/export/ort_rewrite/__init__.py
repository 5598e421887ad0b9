"""The ONNX Runtime CPU engine of a decoder graph, and the exact evaluation it matches.

Entry points:

- `rewrite_for_ort(model)`: FP32 graphs get ConvTranspose(k4, s2, p1) as phase
  convolutions; Q/DQ graphs get integer kernels (MatMulIntegerToFloat on channels-last
  8-bit data), bit-identical to
- `exact_reference(model)`: the Q/DQ graph with every quantized layer's sum computed
  exactly (integer-valued float32) and rescaled once, run by ONNX Runtime's float kernels.

Modules: `phases` (the phase-weight maths), `layers` (finding quantized layers), `exact`,
`integer` (integer kernels), `layout` (channels-last bookkeeping), `engine` (the INT8
walk), `float_phase` (float layers), `rewrite` (plan and entry point), `graph` (onnx-ir
helpers).
"""

from avatarq.export.ort_rewrite.exact import EXACT_DISABLED_OPTIMIZERS, exact_reference
from avatarq.export.ort_rewrite.layers import QuantLayer, find_layers
from avatarq.export.ort_rewrite.phases import (
    PHASES,
    TAPS,
    col2im_phase_weights,
    merged_phase_weights,
    phase_gemm_weights,
    phase_pads,
    phase_weights,
)
from avatarq.export.ort_rewrite.rewrite import (
    MODES,
    REWRITE_VERSION,
    LayerRewrite,
    OrtRewriteConfig,
    RewriteResult,
    rewrite_file,
    rewrite_for_ort,
)

__all__ = [
    "EXACT_DISABLED_OPTIMIZERS",
    "MODES",
    "PHASES",
    "REWRITE_VERSION",
    "TAPS",
    "LayerRewrite",
    "OrtRewriteConfig",
    "QuantLayer",
    "RewriteResult",
    "col2im_phase_weights",
    "exact_reference",
    "find_layers",
    "merged_phase_weights",
    "phase_gemm_weights",
    "phase_pads",
    "phase_weights",
    "rewrite_file",
    "rewrite_for_ort",
]
