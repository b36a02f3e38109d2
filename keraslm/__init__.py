"""keraslm: word-level LSTM language models with Keras, exported to ONNX, scored with onnxruntime."""

import os

# The training side needs the TensorFlow backend whatever a user's ~/.keras/keras.json says.
os.environ["KERAS_BACKEND"] = "tensorflow"

__version__ = "0.1.0"
