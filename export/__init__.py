"""edge_qmul.export: ONNX export of the int8 model and its onnxruntime validation (ARCHITECTURE.md §3, §5-§6)."""
