"""Export a trained keraslm run to an ONNX bundle."""
