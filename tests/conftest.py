"""Test setup shared by every test module, and the fixtures more than one module uses.

TensorFlow must see its logical CPU devices before its runtime starts, so that the
MirroredStrategy tests get two CPU replicas. A session that never imports TensorFlow (the serve
tests: `pytest tests/test_serve_scorer.py`) must not pay for it, so nothing here imports it:
an import hook splits the CPU right after `tensorflow` is first imported, whoever imports it,
before anything can start its runtime.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))

DATA_ROOT = Path(os.environ.get("KERASLM_DATA",
                                Path(__file__).resolve().parents[2] / "shared" / "data"))
os.environ.setdefault("KERASLM_DATA", str(DATA_ROOT))
os.environ.setdefault("NLTK_DATA", str(DATA_ROOT / "nltk_data"))

TEST_CPU_REPLICAS = 2


# ---- two logical CPUs, once TensorFlow is imported -----------------------------------------------

def split_the_cpu(tf) -> None:
    """What keraslm.training.devices.configure_cpu_devices(TEST_CPU_REPLICAS) does, on the module
    itself: importing keraslm.training from inside the import of tensorflow could meet a keraslm
    module (or keras) that is itself halfway through importing it."""
    cpu = tf.config.list_physical_devices("CPU")[0]  # listing does not start the runtime
    if len(tf.config.get_logical_device_configuration(cpu) or ()) < TEST_CPU_REPLICAS:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(TEST_CPU_REPLICAS)])


class _ThenLoader(importlib.abc.Loader):
    """The module's own loader, then `finder.then(module)` once the module has run."""

    def __init__(self, loader: importlib.abc.Loader, finder: AfterImport) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # the module sees its own
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        self.finder.then(module)


class AfterImport(importlib.abc.MetaPathFinder):
    """Calls `then(module)` right after the top-level module `name` is first imported (not when
    it is only looked for: `importlib.util.find_spec(name)` alone changes nothing)."""

    def __init__(self, name: str, then: Callable) -> None:
        self.name, self.then = name, then
        self._finding = False

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name or self._finding:
            return None
        self._finding = True
        try:  # the spec the other finders give
            spec = importlib.util.find_spec(fullname)
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenLoader(spec.loader, self)
        return spec


if "tensorflow" in sys.modules:  # a plugin imported it before this file
    split_the_cpu(sys.modules["tensorflow"])
else:
    sys.meta_path.insert(0, AfterImport("tensorflow", split_the_cpu))


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def data_root() -> Path:
    """The shared, read-only data root holding the real corpora."""
    return DATA_ROOT


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random 2x16 LSTM over a 202-token WikiText vocabulary, exported by export.to_onnx
    (helpers_runs.make_bundle), built once per session; `.run` and `.bundle` are its folders.
    Built in a child process when this session has no TensorFlow (see helpers_runs.build_bundle).
    """
    from helpers_runs import build_bundle

    return build_bundle(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="session")
def adaptive_bundle(tmp_path_factory):
    """The tiny bundle's model with the adaptive softmax as its output layer
    (helpers_runs.ADAPTIVE: a head of 20 words and two tail clusters), tied, random weights."""
    from helpers_runs import ADAPTIVE, build_bundle

    return build_bundle(tmp_path_factory.mktemp("serve"), "adaptive", **ADAPTIVE)


@pytest.fixture(params=["full", "adaptive"])
def each_bundle(request):
    """The tiny bundle of each softmax (`tiny_bundle`, `adaptive_bundle`): what serving must do
    the same way whichever output layer a bundle has."""
    return request.getfixturevalue({"full": "tiny_bundle",
                                    "adaptive": "adaptive_bundle"}[request.param])


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny bundle, free to damage."""
    return Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundle"))


@pytest.fixture
def gated(tiny_bundle, tmp_path, request) -> Iterator:
    """A server of the tiny bundle (helpers_server.Gated) started with loading held; extra flags
    by indirect parametrization."""
    from helpers_server import Gated, start_server, stop

    load, step = tmp_path / "load.gate", tmp_path / "step.gate"
    load.touch()
    s = start_server(tmp_path, "--model", str(tiny_bundle.bundle), *getattr(request, "param", ()),
                     gated=True, env={"TEST_LOAD_GATE": str(load), "TEST_STEP_GATE": str(step)})
    try:
        yield Gated(s, load, step)
    finally:
        load.unlink(missing_ok=True)
        step.unlink(missing_ok=True)
        stop(s)
