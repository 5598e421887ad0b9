"""avatarq: a deployment compiler for codec-avatar decoders.

Importing the package is cheap: it pulls in neither torch's CUDA runtime, TensorRT nor
nvdiffrast. Stages live in subpackages (models, data, calibration, export, engines,
render, bench, runtime) and are imported on use.
"""

__version__ = "0.1.0"

from avatarq.errors import AvatarqError, InternalError  # noqa: E402

__all__ = ["AvatarqError", "InternalError", "__version__"]
