"""keraslm: word-level LSTM language models with Keras, exported to ONNX, scored with onnxruntime.

Importing the package has no side effects: the Keras backend is set where Keras and TensorFlow
are imported (`keraslm.backend`).
"""

__version__ = "0.1.0"
