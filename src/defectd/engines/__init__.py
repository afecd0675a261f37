"""Inference engines behind one contract: OpenVINO, ONNX Runtime, TensorRT, torch."""
