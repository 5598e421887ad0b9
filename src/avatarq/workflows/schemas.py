"""The JSON Schemas of avatarq's on-disk documents, as published in docs/schemas/.

    python -m avatarq.workflows.schemas docs/schemas

writes one ``<name>.schema.json`` per document type; a test keeps the published files
equal to what the code validates against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def document_types() -> dict[str, Any]:
    """Document name -> the type `avatarq.core.documents` validates it as."""
    from avatarq.bench.report_document import ReportDocument
    from avatarq.calibration.document import CalibrationDocument
    from avatarq.export.manifest import BuildOptions, Manifest
    from avatarq.export.options import ExportOptions
    from avatarq.workflows.fleet import FleetSummary
    from avatarq.workflows.fleet_identity import IdentityResult
    from avatarq.workflows.fleet_manifest import FleetManifest

    return {
        "manifest": Manifest,
        "export-options": ExportOptions,
        "build-options": BuildOptions,
        "calibration": CalibrationDocument,
        "report": ReportDocument,
        "fleet-manifest": FleetManifest,
        "fleet-identity": IdentityResult,
        "fleet-summary": FleetSummary,
    }


def schema_texts() -> dict[str, str]:
    """File name -> JSON Schema text (sorted keys, newline-terminated)."""
    from avatarq.core.documents import document_schema

    return {
        f"{name}.schema.json": json.dumps(document_schema(kind), indent=2, sort_keys=True) + "\n"
        for name, kind in document_types().items()
    }


def write_schemas(folder: str | Path) -> list[Path]:
    from avatarq.core.files import atomic_write_text

    folder = Path(folder)
    paths = []
    for name, text in schema_texts().items():
        atomic_write_text(folder / name, text)
        paths.append(folder / name)
    return paths


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    for written in write_schemas(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas"):
        print(written)
