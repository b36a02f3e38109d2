"""Keras runs on TensorFlow whatever the user's environment says, and `import keraslm` changes
nothing: the backend is set in one place, keraslm/backend.py, which every user of Keras or
TensorFlow imports them from."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_python(script: str, env: dict[str, str]) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True,
                            text=True, timeout=180, check=False, cwd=ROOT,
                            env={**env, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.fixture
def jax_settings(tmp_path) -> dict[str, str]:
    """An environment asking Keras for JAX, by variable and by ~/.keras/keras.json."""
    home = tmp_path / "keras_home"
    home.mkdir()
    (home / "keras.json").write_text(json.dumps({"backend": "jax"}))
    return {**os.environ, "KERAS_BACKEND": "jax", "KERAS_HOME": str(home)}


@pytest.mark.parametrize("entry", [
    "import keraslm.model",
    "from keraslm.quiet import start_tensorflow; start_tensorflow()",  # what the CLIs do
    "import export.graph",  # tf2onnx imports TensorFlow too
])
def test_keras_runs_on_tensorflow_whatever_the_environment_asks(jax_settings, entry):
    out = run_python(f"""
        {entry}
        import keras
        print(keras.backend.backend())
    """, jax_settings)
    assert out.splitlines()[-1] == "tensorflow"


def test_importing_the_package_changes_no_environment_variable(jax_settings):
    env = {k: v for k, v in jax_settings.items() if k != "KERAS_BACKEND"}
    assert run_python("""
        import os
        before = dict(os.environ)
        import keraslm
        assert dict(os.environ) == before, "import keraslm changed os.environ"
        assert keraslm.__version__
        print("ok")
    """, env) == "ok"


def test_only_keraslm_backend_imports_keras_or_tensorflow():
    offenders = []
    for folder in ("keraslm", "export", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "keraslm" / "backend.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and
                         not node.level else [])
                if any(n.split(".")[0] in ("keras", "tensorflow") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"import them from keraslm.backend instead: {offenders}"
