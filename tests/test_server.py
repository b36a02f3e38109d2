"""The scoring service over real HTTP: `python -m serve.server` in a subprocess on a free port.

The numbers must be the library's (`Scorer.score`) and the CLI's (`score.py --per-line`), whether
requests come one by one or together. Overload, timeouts, readiness and draining need a model
that is slow on demand: `helpers_server.LAUNCHER` starts the same server with `Scorer.__init__`
and `Scorer.step` waiting while a gate file exists, so a test holds a batch as long as it needs
to (the `gated` fixture of conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers_server import REPO, WAIT, Server, free_port, in_thread, ready, serving

from serve import score as score_cli
from serve import server as server_module
from serve.scorer import Scorer

TEXTS = [
    "the game began in 1998 .",
    "",
    "\n",
    ("a much longer text , longer than several bptt chunks , with words like zyzzyva and "
     "flibbertigibbet that the vocabulary has never seen , on two\nlines . " * 6),
    "= Valkyria =",
    "one",
]

# ---- a server in a subprocess (helpers_server.py) -----------------------------------------------

@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory) -> Iterator[Server]:
    with serving(tmp_path_factory.mktemp("server"), tiny_bundle.bundle, "--max-batch", "8",
                 "--max-texts", "16", "--max-tokens-per-text", "300",
                 "--max-body-bytes", "20000") as s:
        yield s


@pytest.fixture(scope="module")
def scorer(tiny_bundle) -> Scorer:
    return Scorer(tiny_bundle.bundle, device="cpu", threads=1)


def assert_same(results: list[dict], expected) -> None:
    """Server results equal TextScores (or --per-line records) to float32 round-off."""
    assert len(results) == len(expected)
    for got, want in zip(results, expected):
        want = want if isinstance(want, dict) else want.to_dict()
        assert (got["num_tokens"], got["num_oov"]) == (want["num_tokens"], want["num_oov"])
        assert (got["tokens"], got["oov"]) == (got["num_tokens"], got["num_oov"])  # the aliases
        assert got["log_likelihood"] == pytest.approx(want["log_likelihood"], rel=1e-6, abs=1e-9)
        if want["perplexity"] is None:
            assert got["perplexity"] is None
        else:
            assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6)


# ---- the numbers -----------------------------------------------------------------------------------

def test_scores_equal_the_scorer_and_score_py_per_line(server, scorer, tiny_bundle, tmp_path,
                                                       capsys):
    response = server.post(json={"texts": TEXTS})
    assert response.status_code == 200 and response.json()["bundle"] == "tiny"
    results = response.json()["results"]
    assert_same(results, scorer.score(TEXTS))
    assert results[1] == {"num_tokens": 0, "num_oov": 0, "log_likelihood": 0.0,
                          "perplexity": None, "tokens": 0, "oov": 0}
    assert results[3]["num_oov"] >= 2 and results[3]["num_tokens"] > 4 * scorer.bptt

    lines = [line for text in TEXTS for line in text.splitlines()]
    corpus, out = tmp_path / "corpus.txt", tmp_path / "lines.jsonl"
    corpus.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    assert score_cli.main([str(corpus), "--model", str(tiny_bundle.bundle),
                           "--per-line", str(out)]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert_same(server.score([line + "\n" for line in lines]), records)


def test_per_token_logprobs_add_up_to_the_text_score(server, scorer):
    text = TEXTS[3]
    (plain,) = server.score([text])
    (detailed,) = server.score([text], per_token=True)
    assert "per_token" not in plain
    assert {k: v for k, v in detailed.items() if k != "per_token"} == plain
    per_token = detailed["per_token"]
    tokens = [t for sample in scorer.pipeline.process(text) for t in sample]
    assert [p["token"] for p in per_token] == tokens
    assert sum(p["oov"] for p in per_token) == plain["num_oov"]
    assert [p["token"] for p in per_token if p["oov"]] == [t for t in tokens
                                                           if t not in scorer.vocab]
    assert sum(p["logprob"] for p in per_token) == pytest.approx(plain["log_likelihood"],
                                                                  rel=1e-6)
    assert all(p["logprob"] < 0 for p in per_token)


def test_concurrent_requests_score_exactly_as_one_by_one(server):
    requests = [[TEXTS[i % len(TEXTS)], f"text number {i} of the game"] for i in range(16)]
    requests += [[TEXTS[3]] * 5]
    alone = [server.score(texts) for texts in requests]
    start = threading.Barrier(len(requests))

    def together(texts: list[str]) -> list[dict]:
        start.wait(timeout=WAIT)
        return server.score(texts)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        concurrent_results = list(pool.map(together, requests))
    for got, want in zip(concurrent_results, alone):
        assert [(r["num_tokens"], r["num_oov"]) for r in got] == [
            (r["num_tokens"], r["num_oov"]) for r in want]
        np.testing.assert_allclose([r["log_likelihood"] for r in got],
                                   [r["log_likelihood"] for r in want], rtol=1e-6)


# ---- the API around the numbers ---------------------------------------------------------------------

def test_openapi_documents_the_score_endpoint(server):
    spec = server.get("/openapi.json").json()
    operation = spec["paths"]["/v1/score"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/ScoreRequest")
    assert {"200", "400", "413", "422", "503", "504"} <= set(operation["responses"])
    request = spec["components"]["schemas"]["ScoreRequest"]
    assert set(request["properties"]) == {"texts", "per_token"}
    result = spec["components"]["schemas"]["TextResult"]["properties"]
    assert set(result) == {"num_tokens", "num_oov", "log_likelihood", "perplexity", "per_token",
                           "tokens", "oov"}
    assert result["tokens"]["deprecated"] and result["oov"]["deprecated"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(spec["paths"])


def test_health_readiness_and_prometheus_metrics(server):
    assert server.get("/healthz").json() == {"status": "alive"}
    assert server.get("/readyz").json() == {"status": "ready", "bundle": "tiny"}
    server.score(["the game began ."])
    response = server.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    sample = re.compile(r'^[a-z_]+(\{([a-z_]+="[^"]*",?)+\})? (-?[0-9.e+-]+|\+Inf|NaN)$')
    typed = set()
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
            name = line.split("{")[0].split()[0]
            assert name in typed or re.sub(r"_(bucket|sum|count)$", "", name) in typed, line
    m = server.metrics()
    assert m['keraslm_requests_total{path="/v1/score",status="200"}'] >= 1
    assert m["keraslm_tokens_scored_total"] >= 4 and m["keraslm_texts_scored_total"] >= 1
    assert m["keraslm_queue_depth"] == 0 and m["keraslm_ready"] == 1
    assert m["keraslm_batch_size_texts_count"] >= 1
    assert m['keraslm_batch_size_texts_bucket{le="+Inf"}'] == m["keraslm_batch_size_texts_count"]
    assert m['keraslm_request_duration_seconds_count{path="/v1/score"}'] >= 1
    for name in ("keraslm_request_errors_total", "keraslm_batch_size_requests",
                 "keraslm_batch_duration_seconds", "keraslm_requests_in_progress"):
        assert name in typed


@pytest.mark.parametrize("send, status, code, limit", [
    ({"content": b'{"texts": ["a"', "headers": {"content-type": "application/json"}},
     400, "invalid_json", None),
    ({"json": {"texts": "one text"}}, 422, "invalid_request", None),
    ({"json": {"texts": ["fine", 3]}}, 422, "invalid_request", None),
    ({"json": {"texts": ["a"], "per_token": "yes"}}, 422, "invalid_request", None),
    ({"json": {"text": ["a"]}}, 422, "invalid_request", None),
    ({"content": b'{"texts": ["a"]}', "headers": {"content-type": "text/plain"}},
     415, "unsupported_media_type", None),
    ({"json": {"texts": ["a"] * 17}}, 413, "too_many_texts", ("max_texts", 16)),
    ({"json": {"texts": ["fine", "word " * 300]}}, 413, "too_many_tokens",
     ("max_tokens_per_text", 300)),
    ({"json": {"texts": ["word " * 5000]}}, 413, "body_too_large", ("max_body_bytes", 20000)),
    ({"content": iter([b'{"texts": ["', b"word " * 5000, b'"]}']),  # chunked: no length
          "headers": {"content-type": "application/json"}},
     413, "body_too_large", ("max_body_bytes", 20000)),
    ({"content": b'{"texts": ["\xff\xfe"]}', "headers": {"content-type": "application/json"}},
     400, "invalid_json", None),
    ({"content": b'{"texts": ["a"]}', "headers": {}}, 415, "unsupported_media_type", None),
    ({"content": b'{"texts": ["a\\ud800b"], "per_token": true}',
      "headers": {"content-type": "application/json"}}, 422, "invalid_text", None),
    ({"content": b'{"texts": ["\\udc00"]}', "headers": {"content-type": "application/json"}},
     422, "invalid_text", None),
], ids=["bad-json", "texts-not-list", "text-not-str", "per-token-not-bool", "unknown-field",
        "not-json-type", "too-many-texts", "too-many-tokens", "body-too-large", "chunked-too-large",
        "not-utf8", "no-content-type", "lone-surrogate-per-token", "lone-surrogate"])
def test_bad_requests_get_a_json_error_naming_the_limit(server, send, status, code, limit):
    before = server.metrics().get(f'keraslm_request_errors_total{{code="{code}"}}', 0)
    response = server.post(**send)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if limit is not None:
        assert (error["limit"], error["max"]) == limit and limit[0] in error["message"]
    if code == "too_many_tokens":
        assert error["message"].startswith("texts[1] has more than 300 tokens")
    if code == "invalid_request" and "texts" in send.get("json", {}):
        assert "texts" in error["message"] or "per_token" in error["message"]
    assert server.metrics()[f'keraslm_request_errors_total{{code="{code}"}}'] == before + 1
    assert server.score(["still fine"])[0]["num_tokens"] == 3


def test_unknown_paths_and_methods_answer_json(server):
    assert server.get("/nope").status_code == 404
    response = server.get("/v1/score")
    assert response.status_code == 405 and response.json()["error"]["code"] == (
        "method_not_allowed")
    assert "POST" in response.headers["allow"]


# ---- load, overload, timeouts, stopping -----------------------------------------------------------

def test_readyz_is_503_until_the_model_is_loaded(gated):
    s = gated.server
    assert s.get("/healthz").status_code == 200
    response = s.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "loading"
    response = s.post(json={"texts": ["too early"]})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert s.metrics()["keraslm_ready"] == 0
    ready(gated)
    assert s.score(["now ready"])[0]["num_tokens"] == 3


@pytest.mark.parametrize("gated", [("--queue-size", "3", "--max-batch", "8")], indirect=True,
                         ids=["queue-3"])
def test_full_queue_answers_503_and_the_queued_requests_share_one_batch(gated, scorer):
    s = ready(gated)
    gated.step.touch()
    queued = [[TEXTS[0], TEXTS[3]], [TEXTS[4], "one more text"], [TEXTS[5], TEXTS[2]]]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        held = in_thread(pool, s, ["held in the model"])
        s.wait_metric("keraslm_batch_running_requests", 1)
        waiting = []
        for texts in queued:
            waiting.append(in_thread(pool, s, texts))
            s.wait_metric("keraslm_queue_depth", len(waiting))
        response = s.post(json={"texts": ["one too many"]})
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] == {
            "code": "overloaded", "limit": "queue_size", "max": 3,
            "message": "3 requests are already waiting (queue_size); retry shortly"}
        gated.step.unlink()
        assert held.result(WAIT).status_code == 200
        for texts, future in zip(queued, waiting):
            assert_same(future.result(WAIT).json()["results"], scorer.score(texts))
    m = s.metrics()
    # the three queued requests (6 texts) were gathered into one batch behind the held one
    assert m['keraslm_batch_size_requests_bucket{le="2.0"}'] < m[
        'keraslm_batch_size_requests_bucket{le="4.0"}']
    assert m['keraslm_batch_size_texts_bucket{le="4.0"}'] < m[
        'keraslm_batch_size_texts_bucket{le="8.0"}']
    assert m['keraslm_request_errors_total{code="overloaded"}'] == 1


@pytest.mark.parametrize("gated", [("--timeout", "0.5")], indirect=True, ids=["timeout-0.5"])
def test_a_request_not_answered_in_time_gets_504(gated):
    s = ready(gated)
    gated.step.touch()
    started = time.monotonic()
    response = s.post(json={"texts": ["stuck in the model"]})
    assert response.status_code == 504
    assert 0.5 <= time.monotonic() - started < 10
    assert response.json()["error"]["limit"] == "timeout"
    gated.step.unlink()
    assert s.score(["free again"])[0]["num_tokens"] == 3


def test_sigterm_drains_requests_in_flight_then_exits_0(gated, scorer):
    s = ready(gated)
    gated.step.touch()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = in_thread(pool, s, TEXTS)
        s.wait_metric("keraslm_batch_running_requests", 1)
        s.proc.send_signal(signal.SIGTERM)
        s.wait_for(lambda: s._status("/healthz") is None, "the listener to close")
        assert s.proc.poll() is None  # still draining
        gated.step.unlink()
        response = in_flight.result(WAIT)
    assert response.status_code == 200
    assert_same(response.json()["results"], scorer.score(TEXTS))
    assert s.proc.wait(timeout=WAIT) == 0


# ---- the command line -------------------------------------------------------------------------------

def test_bad_bundle_address_or_flags_are_one_line(capsys, tiny_bundle, tmp_path):
    assert server_module.main(["--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and err.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert server_module.main(["--model", str(tiny_bundle.bundle), "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
    with pytest.raises(SystemExit) as exit_info:
        server_module.main(["--max-batch", "0"])
    assert exit_info.value.code == 2


def test_newest_bundle_is_served_and_a_broken_one_stops_with_status_1(tiny_bundle, tmp_path):
    """No --model: the newest bundle under ./bundles; it cannot load, so one error and exit 1."""
    broken = Path(shutil.copytree(tiny_bundle.bundle, tmp_path / "bundles" / "broken"))
    (broken / "model.onnx").write_bytes(b"not a model")
    port = free_port()
    result = subprocess.run([sys.executable, "-m", "serve.server", "--port", str(port)],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=WAIT, check=False)
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: bundles/broken/model.onnx: onnxruntime cannot load it")


def test_serving_never_imports_tensorflow(tiny_bundle):
    check = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from fastapi.testclient import TestClient
        from serve.server import Settings, create_app
        with TestClient(create_app(Settings(Path({str(tiny_bundle.bundle)!r})))) as client:
            deadline = time.monotonic() + 60
            while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            response = client.post("/v1/score", json={{"texts": ["a b c"], "per_token": True}})
            assert response.status_code == 200, response.text
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras",
                                                                      "tf2onnx"))
        assert not loaded, loaded
    """)
    result = subprocess.run([sys.executable, "-c", check], cwd=REPO, capture_output=True,
                            text=True, timeout=WAIT, check=False)
    assert result.returncode == 0, result.stderr


def test_an_unexpected_failure_is_a_json_500_not_plain_text(tiny_bundle):
    from fastapi.testclient import TestClient

    app = server_module.create_app(server_module.Settings(tiny_bundle.bundle))

    async def broken(body, arrival):  # a fault deep inside scoring
        raise RuntimeError("disk on fire")

    app.state.service.score = broken
    with TestClient(app, raise_server_exceptions=False) as client:
        deadline = time.monotonic() + WAIT
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        response = client.post("/v1/score", json={"texts": ["a"]})
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "internal_error"
    assert "RuntimeError" in response.json()["error"]["message"]
