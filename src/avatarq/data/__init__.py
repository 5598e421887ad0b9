"""avatarq.data: Multiface capture reader, latent-sequence files, synthetic captures.

- `MultifaceCapture` reads a capture in the Multiface on-disk layout (lazily).
- `load_inputs` / `save_inputs` read and write latent files (ordered `DecoderInputs` in a .npz).
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
from avatarq.data.latents import load_inputs, save_inputs
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
    "MultifaceCapture",
    "Sample",
    "SyntheticCaptureConfig",
    "read_krt",
    "read_obj_topology",
    "write_krt",
    "load_inputs",
    "save_inputs",
    "write_synthetic_capture",
]
