"""Exporters of dense or pruned models (installed as ``structprune_graph.exporters``)."""

from .onnx import ExportError, ExportResult, ExportValidationError, export_onnx, validate_onnx

__all__ = ["export_onnx", "validate_onnx", "ExportResult", "ExportError", "ExportValidationError"]
