"""Score text with an exported keraslm bundle on onnxruntime (never imports TensorFlow)."""
