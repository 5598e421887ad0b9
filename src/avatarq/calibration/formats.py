"""Layer formats: how a layer's weights are stored and its input is quantized.

A format is written as a short string, the vocabulary of ``--bits`` and ``--precision``:

- ``wXaY`` (X, Y in 2..8): integer weights of X bits (symmetric, narrow range
  ``[-(2^(X-1)-1), 2^(X-1)-1]``, per-output-channel or block scales) and a per-tensor
  integer input quantizer of Y bits. Weights of X <= 4 bits are stored PACKED as ONNX INT4
  (two per byte); X in 5..8 sits in an INT8 container (only X = 8 uses all of it).
  Activations always use the 8-bit container; Y < 8 clips to the Y-bit grid first.
- ``fp8``: FP8 E4M3 (``FLOAT8E4M3FN``: max 448, no infinities) weights with per-output-
  channel scales and a per-tensor FP8 input quantizer (scale = amax / 448).
- ``fp16``: the layer in float16 between casts; ``fp32``: unchanged.

``int8`` is the pre-format name of "quantized": in ``--precision`` it means the ``--bits``
format; in an old calibration file, "int8" with ``bits`` N means ``wNaN``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from avatarq.errors import AvatarqError

MIN_BITS, MAX_BITS = 2, 8
INT4_MAX_BITS = 4  # weights of at most this many bits are stored packed as INT4
FP8_MAX = 448.0  # largest finite FLOAT8E4M3FN value
FLOATS = ("fp16", "fp32")
LEGACY_INT8 = "int8"
DEFAULT_BITS = "w8a8"
_INT = re.compile(r"^w(\d+)a(\d+)$")
EXAMPLES = "w8a8, w6a6, w4a8, w4a4, fp8, fp16 or fp32"


@dataclass(frozen=True)
class LayerFormat:
    """One layer's numeric format.

    Attributes:
        name: the canonical string ("w4a8", "fp8", "fp16", "fp32").
        kind: "int", "fp8", "fp16" or "fp32".
        weight_bits, act_bits: integer widths of the "int" kind (None otherwise).
    """

    name: str
    kind: str
    weight_bits: int | None = None
    act_bits: int | None = None

    @property
    def quantized(self) -> bool:
        """Q/DQ format (int or fp8) rather than a float layer."""
        return self.kind in ("int", "fp8")

    @property
    def weight_container(self) -> str:
        """ONNX element type of the stored weights: int4, int8, float8e4m3fn, float16, float32."""
        if self.kind == "int":
            return "int4" if self.weight_bits <= INT4_MAX_BITS else "int8"
        return {"fp8": "float8e4m3fn", "fp16": "float16", "fp32": "float32"}[self.kind]

    @property
    def weight_bits_stored(self) -> int:
        """Bits each weight occupies in its container (4, 8, 16 or 32)."""
        return {"int4": 4, "int8": 8, "float8e4m3fn": 8, "float16": 16, "float32": 32}[
            self.weight_container
        ]

    @property
    def weight_grid(self) -> int | str:
        """What the weight quantizers take as ``bits``: an int, or "fp8"."""
        return "fp8" if self.kind == "fp8" else int(self.weight_bits or 0)

    @property
    def act_grid(self) -> int | str:
        """What the activation quantizers take as ``bits``: an int, or "fp8"."""
        return "fp8" if self.kind == "fp8" else int(self.act_bits or 0)

    def __str__(self) -> str:
        return self.name


def int_format(weight_bits: int, act_bits: int) -> LayerFormat:
    for what, bits in (("weight", weight_bits), ("activation", act_bits)):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise AvatarqError(
                f"{what} bits must lie in {MIN_BITS}..{MAX_BITS}, got {bits} "
                f"(w{weight_bits}a{act_bits})"
            )
    return LayerFormat(f"w{weight_bits}a{act_bits}", "int", weight_bits, act_bits)


def parse_format(text: str | int, what: str = "--bits", legacy: str | None = None) -> LayerFormat:
    """Parse a format string (``w4a8``, ``fp8``, ``fp16``, ``fp32``; an int N means wNaN).

    Args:
        text: the string (case-insensitive) or an integer bit width.
        what: the argument named in error messages.
        legacy: what "int8" means here (a format string); None: "int8" is refused.

    Raises:
        AvatarqError: anything else, in one line naming ``what``, the expected forms and
            the value given.
    """
    if isinstance(text, bool):
        raise AvatarqError(f"{what} must be one of {EXAMPLES}, got {text!r}")
    if isinstance(text, int):
        if not MIN_BITS <= text <= MAX_BITS:
            raise AvatarqError(
                f"{what} as a number must be a bit width in {MIN_BITS}..{MAX_BITS}, got {text}"
            )
        return int_format(text, text)
    if not isinstance(text, str):
        raise AvatarqError(f"{what} must be one of {EXAMPLES}, got {text!r}")
    value = text.strip().lower()
    if value.isdigit():
        return parse_format(int(value), what)
    if value == LEGACY_INT8 and legacy is not None:
        return parse_format(legacy, what)
    if value in ("fp8", "fp8e4m3", "e4m3"):
        return LayerFormat("fp8", "fp8")
    if value in FLOATS:
        return LayerFormat(value, value)
    match = _INT.match(value)
    if match is None:
        raise AvatarqError(
            f"{what} must be one of {EXAMPLES} (wXaY, X and Y in 2..8), got {text!r}"
        )
    weight_bits, act_bits = int(match.group(1)), int(match.group(2))
    if not (MIN_BITS <= weight_bits <= MAX_BITS and MIN_BITS <= act_bits <= MAX_BITS):
        raise AvatarqError(
            f"{what} {text!r}: weight and activation bits must lie in {MIN_BITS}..{MAX_BITS}"
        )
    return int_format(weight_bits, act_bits)


def canonical_bits(value: str | int) -> str:
    """The canonical string of a quantized ``--bits`` value (int N -> "wNaN")."""
    fmt = parse_format(value, "bits")
    if not fmt.quantized:
        raise AvatarqError(f"bits must be a quantized format (wXaY or fp8), got {value!r}")
    return fmt.name
