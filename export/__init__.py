"""edge_qmul.export: ONNX export of the int8 model and its onnxruntime validation (DESIGN §3, §5-§6)."""
