"""The data side (text, vocab, batching) and the configuration must work without TensorFlow;
the bundle contract shared by export and serve needs not even NumPy."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys
    import keraslm.text, keraslm.vocab, keraslm.batching, keraslm.config, keraslm.rundir
    assert "tensorflow" not in sys.modules, "importing the data modules loaded TensorFlow"
    assert "onnxruntime" not in sys.modules, "importing the data modules loaded onnxruntime"
    from keraslm.config import TrainConfig
    TrainConfig.from_values({"lr": 2.0, "preset": "standard_lstm_lm_650"}).model.resolve(100)

    # Using them, punkt and Moses included, must not load it either.
    from keraslm.text import RAW, WIKITEXT
    from keraslm.vocab import Vocab
    from keraslm.batching import BPTTBatches
    tokens = [t for s in RAW.process("Mr. Holmes came in. He sat <unk> down.") for t in s]
    tokens += [t for s in WIKITEXT.process("a b\\n\\nc\\n") for t in s]
    vocab = Vocab.build(tokens)
    list(BPTTBatches(vocab.encode(tokens), batch_size=2, bptt=3))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
    assert not loaded, loaded
    print("ok")
""")


def run_ok(script: str) -> None:
    """Run `script` in a fresh interpreter; it must print "ok"."""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_data_modules_never_import_tensorflow():
    run_ok(SCRIPT)


CONTRACT_SCRIPT = textwrap.dedent("""
    import sys
    import keraslm.contract
    heavy = ("tensorflow", "keras", "onnxruntime", "onnx", "numpy")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
    assert not loaded, loaded
    assert keraslm.contract.state_names(2) == ["h0", "c0", "h1", "c1"]
    print("ok")
""")


def test_bundle_contract_imports_no_tensorflow_onnxruntime_or_numpy():
    run_ok(CONTRACT_SCRIPT)


LIBRARY_SCRIPT = textwrap.dedent("""
    import sys
    import serve.bundle, serve.scorer, serve.generate, serve.score
    app = ("serve.web", "fastapi", "uvicorn", "starlette", "prometheus_client", "tensorflow")
    loaded = sorted(m for m in sys.modules if m.startswith(app))
    assert not loaded, loaded
    print("ok")
""")


def test_the_scoring_library_never_imports_the_http_app():
    """serve/'s library ([cpu]) works on a host without the [serve] extra."""
    run_ok(LIBRARY_SCRIPT)
