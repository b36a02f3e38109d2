"""The test setup itself (conftest.py): two logical CPUs for TensorFlow, configured only when a
session imports it, and serve-only sessions that never do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import TEST_CPU_REPLICAS

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_this_sessions_tensorflow_has_two_logical_cpus():
    """Whichever test imported TensorFlow first in this session (or this one, now), the CPU
    was split before its runtime started."""
    import tensorflow as tf

    assert len(tf.config.list_logical_devices("CPU")) == TEST_CPU_REPLICAS


def test_tensorflow_through_keras_after_a_find_spec_still_gets_two_cpus():
    """Imported the way keraslm does (Keras first, which imports TensorFlow), after something only
    looked for it (importlib.util.find_spec): two CPUs, and TensorFlow keeps its own loader."""
    child = run_python("""
        import importlib.util, json, sys
        import conftest
        assert "tensorflow" not in sys.modules
        assert importlib.util.find_spec("tensorflow") is not None
        assert "tensorflow" not in sys.modules
        from keraslm.backend import tf
        print(json.dumps({
            "cpus": len(tf.config.list_logical_devices("CPU")),
            "loader": type(tf.__loader__).__name__,
            "hooks_left": [type(f).__name__ for f in sys.meta_path
                           if isinstance(f, conftest.AfterImport)],
        }))
    """)
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report == {"cpus": TEST_CPU_REPLICAS, "loader": "SourceFileLoader", "hooks_left": []}


def test_a_serve_only_session_never_imports_tensorflow():
    """`pytest` on a serve test file (the shared tiny bundle included: it is exported in a child
    process) leaves TensorFlow unimported in the session's process."""
    child = run_python("""
        import json, sys
        import pytest
        code = pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_serve_bundle.py", "-k",
                            "load_bundle_exposes or without_next_logprobs or bad_bundle"])
        print(json.dumps({"exit": int(code), "tensorflow": "tensorflow" in sys.modules,
                          "keras": "keras" in sys.modules}))
    """, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report == {"exit": 0, "tensorflow": False, "keras": False}, child.stdout[-3000:]
