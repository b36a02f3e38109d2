"""Test setup shared by every test module.

TensorFlow must see its logical CPU devices before it initialises, so the split of the CPU into
two replicas (for the MirroredStrategy tests) happens here, once, before any test imports it.
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))

DATA_ROOT = Path(os.environ.get("KERASLM_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("KERASLM_DATA", str(DATA_ROOT))
os.environ.setdefault("NLTK_DATA", str(DATA_ROOT / "nltk_data"))

TEST_CPU_REPLICAS = 2

try:
    from keraslm.training.devices import configure_cpu_devices
except ImportError:  # a serving-only install has no TensorFlow
    configure_cpu_devices = None
if configure_cpu_devices is not None:
    configure_cpu_devices(TEST_CPU_REPLICAS)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared, read-only data root holding the real corpora."""
    return DATA_ROOT
