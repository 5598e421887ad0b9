"""avatarq.core: what every layer shares and that belongs to no stage.

Atomic files and staged folders (`files`), sha256 digests (`hashing`), typed on-disk
documents (`documents`), the decoder-input container and the smooth clip (`inputs`), the
mesh topology (`topology`), the progress protocol (`progress`) and the one ONNX Runtime
session factory (`ort`). It imports nothing else of avatarq but `avatarq.errors`.
"""
