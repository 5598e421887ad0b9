"""Export: trace the deployable decoder to ONNX, write and validate the bundle."""

from avatarq.export.bundle import Bundle, Manifest, open_bundle
from avatarq.export.exporter import ExportResult, export_bundle
from avatarq.export.onnx_export import ExportConfig, export_onnx, layer_nodes
from avatarq.export.options import ExportOptions

__all__ = [
    "Bundle",
    "ExportConfig",
    "ExportOptions",
    "ExportResult",
    "Manifest",
    "export_bundle",
    "export_onnx",
    "layer_nodes",
    "open_bundle",
]
