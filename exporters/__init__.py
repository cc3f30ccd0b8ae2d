"""Exporters of dense or pruned models (installed as ``structprune_graph.exporters``)."""

from .gguf import GgufCheck, GgufExportError, GgufResult, GgufValidationError, export_gguf, validate_gguf
from .onnx import ExportError, ExportResult, ExportValidationError, export_onnx, validate_onnx
from .onnx_decoder import DecoderExportResult, DecoderValidationError, export_decoder, validate_decoder

__all__ = ["export_onnx", "validate_onnx", "ExportResult", "ExportError", "ExportValidationError", "export_gguf",
           "validate_gguf", "GgufResult", "GgufCheck", "GgufExportError", "GgufValidationError", "export_decoder",
           "validate_decoder", "DecoderExportResult", "DecoderValidationError"]
