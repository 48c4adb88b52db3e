"""GPU/CPU inference workers. Never imports torch: nodes carry ONNX Runtime or TensorRT only."""
