"""Fixed-point and chunking constants shared by the torch rasterizer modules."""

SUBPIXEL_BITS = 4
"""cudaraster's CR_SUBPIXEL_LOG2: vertex positions snap to 1/16 pixel."""

BOUNDARY_MODES = ("wrap", "clamp", "zero")
"""Texture boundary modes of nvdiffrast's ``texture()``; its default is 'wrap'."""

_SUB = 1 << SUBPIXEL_BITS
_HALF = _SUB // 2
_MAX_SNAPPED = 1 << 28  # keeps int64 edge-function products below 2^60
_ROWS_PER_CHUNK = 1 << 19  # (triangle, row) pairs set up at once
_FRAGMENTS_PER_CHUNK = 1 << 21  # covered (triangle, pixel) pairs resolved at once
_PIXELS_PER_CHUNK = 1 << 20  # pixels shaded / interpolated / textured at once
_TRI_ID_FLOAT_LIMIT = 1 << 24
_TRI_ID_FLOAT_BIAS = 0x4A800000
