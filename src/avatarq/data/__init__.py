"""avatarq.data: Multiface capture reader, latent-sequence files, synthetic captures.

- `MultifaceCapture` reads a capture in the Multiface on-disk layout (lazily).
- `LatentSequence` is an ordered (z, view) sequence stored as .npz.
- `write_synthetic_capture` writes a deterministic synthetic avatar in the same layout.
"""

from avatarq.data.capture import (
    AVERAGE,
    Camera,
    MultifaceCapture,
    Sample,
    read_krt,
    read_obj_topology,
    write_krt,
)
from avatarq.data.latents import LatentSequence
from avatarq.data.synthetic_capture import (
    EXPRESSIONS,
    ROOT_NAME,
    SyntheticCaptureConfig,
    write_synthetic_capture,
)

__all__ = [
    "AVERAGE",
    "EXPRESSIONS",
    "ROOT_NAME",
    "Camera",
    "LatentSequence",
    "MultifaceCapture",
    "Sample",
    "SyntheticCaptureConfig",
    "read_krt",
    "read_obj_topology",
    "write_krt",
    "write_synthetic_capture",
]
