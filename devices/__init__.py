"""edge_qmul.devices: device profiles and the on-board runtime (onnxruntime + numpy only, ARCHITECTURE.md §7)."""
