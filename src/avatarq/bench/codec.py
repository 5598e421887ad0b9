"""Running a decoder behind the latent codec: what a telepresence receiver decodes.

`LatentCodecRunner` wraps a runner so that every z is coded with a `avatarq.codec.Codebook`
(sender) and decoded back (receiver) before the decoder sees it; `bench --vq` measures
it against the FP32 reference fed the unquantized z, so the comparison holds the whole
cost of the stream: the codec's error, seen through the decoder, plus the decoder's own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from avatarq.bench.results import CodecRecord
from avatarq.codec import Codebook, load_codebook
from avatarq.core.documents import shared_fields
from avatarq.errors import AvatarqError

SUFFIX = "+vq"


class LatentCodecRunner:
    """A runner whose decode(z, view) is inner.decode(decode(encode(z)), view).

    The timed ``decode`` stage includes encoding and decoding z (numpy on the CPU).
    """

    def __init__(self, inner: Any, codebook: Codebook, name: str) -> None:
        self.inner = inner
        self.codebook = codebook
        self.name = name

    def __enter__(self) -> LatentCodecRunner:
        self.inner.__enter__()
        inner_name = getattr(self.inner, "name", "runner")
        self.name = f"{inner_name} behind the latent codec ({self.codebook.describe()})"
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> Any:
        return self.inner.__exit__(exc_type, exc, tb)

    def decode(self, z: np.ndarray, view: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.inner.decode(self.codebook.quantize(z), view)


def bench_codebook(bundle: Any, codebook: str | Path | None) -> tuple[Codebook, str]:
    """The codebook ``bench --vq`` uses: the file ``codebook``, else the bundle's
    (sha256-checked); with a label for the report. Its z size must be the bundle's."""
    if getattr(bundle.manifest, "declaration", None) is not None:
        raise AvatarqError(
            f"--vq codes the latent z of a (z, view) decoder; bundle {bundle.root} declares "
            "its own inputs"
        )
    if codebook is None:
        book = bundle.codebook()
        label = f"{bundle.root.name}/{bundle.manifest.codebook.path}"
    else:
        book = load_codebook(codebook)
        label = str(codebook)
    if book.z_dim != bundle.manifest.z_dim:
        raise AvatarqError(
            f"codebook {label} codes z of {book.z_dim} dimensions, bundle {bundle.root} "
            f"decodes z of {bundle.manifest.z_dim}"
        )
    return book, label


def codec_record(book: Codebook, label: str) -> CodecRecord:
    """What the report records of the codec (`RunnerResult.codec`)."""
    return shared_fields(book, CodecRecord, kind="residual product VQ", codebook=label)
