"""Exporters of pruned models (installed as ``structprune_graph.exporters``). ONNX export with
onnxruntime validation is tracked in its own issue; nothing is exported from here yet."""
