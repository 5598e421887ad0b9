"""Check an exported graph against the PyTorch decoder it came from, with ONNX Runtime on the CPU.

Both sides are wrapped as `avatarq.measure.Decoder`s (`ModuleDecoder`, `SessionDecoder`) and
compared by the one comparator, `avatarq.measure.compare`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from avatarq.core.documents import shared_fields
from avatarq.core.inputs import DecoderInputs
from avatarq.core.ort import make_session
from avatarq.export.manifest import ValidationRecord
from avatarq.measure import Comparison, Tolerances, compare

DAM_OUTPUTS = ("texture", "vertices")


class ModuleDecoder:
    """A torch module as a `Decoder`: ``module(*inputs)`` in ``input_names`` order, no grad."""

    def __init__(
        self, name: str, module: nn.Module, input_names: Sequence[str] = ("z", "view")
    ) -> None:
        self.name = name
        self.module = module
        self.input_names = tuple(input_names)

    def run(self, feeds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, ...]:
        with torch.no_grad():
            outputs = self.module(*(torch.from_numpy(feeds[n]) for n in self.input_names))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return tuple(o.detach().float().cpu().numpy() for o in outputs)


class SessionDecoder:
    """An ONNX graph run by ONNX Runtime (CPU) as a `Decoder`."""

    def __init__(self, name: str, model: str | Path | bytes, threads: int = 0) -> None:
        self.name = name
        self.session = make_session(model, "cpu", threads)

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(feeds))


def validate_against_torch(
    model_path: str | Path,
    reference: nn.Module,
    inputs: DecoderInputs,
    tolerances: Tolerances,
    peak: float | None,
    reference_name: str = "torch",
    batch: int = 4,
) -> Comparison:
    """ONNX Runtime on ``model_path`` against ``reference`` (torch) on ``inputs``.

    ``peak``: 255 for a de-normalized texture in 0..255 units, else None (the reference's
    first-frame range). Tolerances apply to the texture on texture / peak.
    """
    from avatarq.models.declaration import declaration_of

    declaration = declaration_of(reference)
    names = declaration.input_names
    if set(inputs.arrays) != set(names):  # feed exactly the graph's inputs
        inputs = DecoderInputs({n: inputs[n] for n in names}, inputs.ids, source=inputs.source)
    return compare(
        ModuleDecoder(reference_name, reference, names),
        SessionDecoder("onnxruntime", model_path),
        inputs,
        tolerances,
        output_names=declaration.outputs,
        image_output=declaration.outputs[0],
        peak=peak,
        batch=batch,
        compute_ssim=False,
    )


def validation_record(comparison: Comparison, inputs_source: str) -> ValidationRecord:
    """The manifest's record of a comparison (texture errors in the texture's own units;
    ``texture_psnr_db`` is the PSNR over all inputs together)."""
    return shared_fields(
        comparison,
        ValidationRecord,
        inputs=inputs_source,
        n_samples=comparison.n_frames,
        texture_psnr_db=comparison.image.psnr_all,
        texture_psnr_min_db=comparison.image.psnr_min,
        tolerances={
            k: float(v)
            for k, v in comparison.tolerances.to_dict().items()
            if v is not None and k != "version"
        },
        passed=bool(comparison),
    )
