"""Where a rewritten tensor lives in memory, and the nodes that move it between layouts.

The integer layers work channels-last, so their tensors exist in other layouts than the
graph's NCHW:

- ``nchw``: the graph's own layout.
- ``nhwc``: [N, H, W, C].
- ``phases``: a ConvTranspose(k4, s2, p1) output [N, C, 2H, 2W] as the merged phase
  conv computes it, [N, H + 1, W + 1, 4C] (channel (2u + v) C + c is texel
  (2i - 1 + u, 2j - 1 + v), see `phases.merged_phase_weights`).

`Layouts` records, for each tensor of the original graph that the rewrite recomputed, the
values that hold it in each layout, and makes the others on demand (memoized). Moving data
never changes it, so 8-bit tensors stay 8-bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from avatarq.errors import InternalError
from avatarq.export.ort_rewrite.graph import Builder
from avatarq.export.ort_rewrite.phases import broadcastable, nhwc_constant, phases_constant

NCHW, NHWC, PHASES = "nchw", "nhwc", "phases"


@dataclass(frozen=True)
class PhaseGrid:
    """The merged phase grid of a layer: its output [N, C, 2h, 2w] lives in [N, h + 1,
    w + 1, 4C]."""

    channels: int
    h: int
    w: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the layer output."""
        return (self.channels, 2 * self.h, 2 * self.w)


class Layouts:
    """The layouts each recomputed tensor is available in (see the module docstring)."""

    def __init__(self, builder: Builder) -> None:
        self.b = builder
        self._reps: dict[ir.Value, dict[str, ir.Value]] = {}
        self._converted: dict[ir.Value, dict[str, ir.Value]] = {}  # of untouched values
        self._grid: dict[ir.Value, PhaseGrid] = {}
        self._shape: dict[ir.Value, tuple[int, int, int]] = {}

    # ------------------------------------------------------------------ bookkeeping

    def recomputed(self, value: ir.Value) -> bool:
        return value in self._reps

    def available(self, value: ir.Value) -> set[str]:
        """Layouts ``value`` exists in without a conversion (NCHW for untouched values)."""
        return set(self._reps[value]) if value in self._reps else {NCHW}

    def grid(self, value: ir.Value) -> PhaseGrid | None:
        return self._grid.get(value)

    def shape(self, value: ir.Value) -> tuple[int, int, int] | None:
        """(C, H, W) of a 4-d tensor, if known."""
        if value in self._shape:
            return self._shape[value]
        shape = value.shape
        if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[1:]):
            return (shape[1], shape[2], shape[3])
        return None

    def add(
        self,
        original: ir.Value,
        layout: str,
        value: ir.Value,
        *,
        grid: PhaseGrid | None = None,
        shape: tuple[int, int, int] | None = None,
    ) -> None:
        """Record that ``value`` holds ``original`` in ``layout``."""
        self._reps.setdefault(original, {})[layout] = value
        if grid is not None:
            self._grid[original] = grid
            self._shape[original] = grid.shape
        elif shape is not None:
            self._shape[original] = shape

    def alias(self, original: ir.Value, source: ir.Value) -> None:
        """``original`` holds the same data as the recomputed ``source`` (an identity op)."""
        self._reps[original] = self._reps[source]
        if source in self._grid:
            self._grid[original] = self._grid[source]
        if source in self._shape:
            self._shape[original] = self._shape[source]

    # ------------------------------------------------------------------ conversions

    def get(self, value: ir.Value, layout: str) -> ir.Value:
        """``value`` in ``layout``, converting (once) if needed."""
        if value in self._reps:
            reps = self._reps[value]
        else:
            reps = self._converted.setdefault(value, {NCHW: value})
        if layout in reps:
            return reps[layout]
        base = str(value.name or "t")
        if layout == NHWC:
            if PHASES in reps:
                out = self._interleave(reps[PHASES], self._grid[value], base)
            else:
                out = self.b.op("Transpose", [reps[NCHW]], f"{base}.nhwc", perm=[0, 2, 3, 1])
        elif layout == NCHW:
            out = self.b.op("Transpose", [self.get(value, NHWC)], f"{base}.nchw", perm=[0, 3, 1, 2])
        else:
            raise InternalError(f"{base} cannot be made available in layout {layout}")
        reps[layout] = out
        return out

    def _interleave(self, merged: ir.Value, grid: PhaseGrid, base: str) -> ir.Value:
        """[N, h + 1, w + 1, 4C] -> [N, 2h, 2w, C]: one Transpose of 2 x 2 blocks (runs of
        2C contiguous values), then a crop of the extra border texel."""
        b, (c, h, w) = self.b, (grid.channels, grid.h, grid.w)
        blocks_shape = b.const(f"{base}.blocks_shape", np.array([0, h + 1, w + 1, 2, 2, c]))
        blocks = b.op("Reshape", [merged, blocks_shape], f"{base}.blocks")
        rows = b.op("Transpose", [blocks], f"{base}.interleaved", perm=[0, 1, 3, 2, 4, 5])
        padded_shape = b.const(f"{base}.padded_shape", np.array([0, 2 * h + 2, 2 * w + 2, c]))
        padded = b.op("Reshape", [rows, padded_shape], f"{base}.padded")
        starts = b.const(f"{base}.crop_starts", np.array([1, 1]))
        ends = b.const(f"{base}.crop_ends", np.array([2 * h + 1, 2 * w + 1]))
        axes = b.const(f"{base}.crop_axes", np.array([1, 2]))
        return b.op("Slice", [padded, starts, ends, axes], f"{base}.nhwc")

    # ------------------------------------------------------------------ constants

    def constant(self, value: np.ndarray, layout: str, original: ir.Value) -> np.ndarray | None:
        """A constant operand of an elementwise op on ``original`` laid out for ``layout``
        (None when it does not broadcast against ``original`` per channel/texel)."""
        if layout == NCHW:
            return value
        shape = self.shape(original)
        if value.ndim == 0 or value.size == 1:
            return value.reshape(()) if value.ndim > 4 else value
        if shape is None or not broadcastable(value, shape):
            return None
        if layout == NHWC:
            return nhwc_constant(value)
        grid = self._grid.get(original)
        if grid is None:
            return None
        return phases_constant(value, grid.channels, (grid.h, grid.w))
