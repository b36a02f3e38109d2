"""Hostile clients get bounded answers (issue 23, item 1): a prompt dense in tokens, bodies that
never arrive, on any path, heads too big to buffer, work whose client left, and shutdown during a
slow generation. Real servers on loopback, spoken to over raw sockets; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers_server import (
    WAIT,
    Server,
    closed_by_server,
    raw_connection,
    read_answer,
    request_head,
    serving,
)

from keraslm.text import TextPipeline
from serve import generate as generation
from serve.bundle import load_bundle
from serve.scorer import Scorer
from serve.web.generation import GenerateRequest, generate_text
from serve.web.schemas import ScoreRequest, ServiceError
from serve.web.service import RequestContext, Service
from serve.web.settings import Settings


def rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """One server with small limits: 300 tokens a text, a 2 s deadline, a queue of 2."""
    with serving(tmp_path_factory.mktemp("hostile"), tiny_bundle.bundle,
                 "--max-tokens-per-text", "300", "--timeout", "2", "--queue-size", "2") as s:
        yield s


# ---- the generate prompt is bounded in tokens -----------------------------------------------------

@pytest.mark.parametrize("prompt", ["\n" * 400_000, "a\n" * 200_000, "\r\n" * 200_000],
                         ids=["line-breaks", "short-lines", "crlf"])
def test_a_prompt_dense_in_tokens_is_refused_by_its_tokens(server, prompt):
    before = rss_mb(server)
    started = time.monotonic()
    answer = server.post("/v1/generate", json={"prompt": prompt, "tokens": 5})
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert (error["code"], error["limit"], error["max"]) == (
        "too_many_tokens", "max_tokens_per_text", 300)
    assert "prompt" in error["message"]
    assert time.monotonic() - started < 2  # within the timeout, not at it
    assert rss_mb(server) - before < 50  # no context of 400,000 tokens was run


def test_a_prompt_of_exactly_the_limit_is_taken_and_one_more_is_not(server):
    ask = {"tokens": 3, "seed": 0}
    assert server.post("/v1/generate", json={"prompt": "the " * 300, **ask}).status_code == 200
    refused = server.post("/v1/generate", json={"prompt": "the " * 301, **ask})
    assert refused.status_code == 413
    # a scored text's limit counts its <eos>: 299 words are 300 tokens
    assert server.score(["the " * 299])[0]["num_tokens"] == 300
    assert server.post(json={"texts": ["the " * 300]}).status_code == 413


def test_a_long_context_runs_in_chunks_that_ask_to_stop_between_them(tiny_bundle, monkeypatch):
    bundle = load_bundle(tiny_bundle.bundle)
    prompt = "the game began in 1998 , with the team . " * 40  # 440 tokens
    whole = generation.generate(bundle, prompt, tokens=8, seed=3)[0]
    monkeypatch.setattr(generation, "CONTEXT_CHUNK", 100)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return False

    chunked = generation.generate(bundle, prompt, tokens=8, seed=3, stop=stop)[0]
    assert len(asked) == 5 + 7  # ceil(441 / 100) context calls, then one per drawn token after
    assert chunked.tokens == whole.tokens

    def stop_at_third_call() -> bool:
        asked.append(1)
        return len(asked) > 2

    asked.clear()
    with pytest.raises(generation.GenerationStopped):  # between two chunks of the context
        generation.generate(bundle, prompt, tokens=8, stop=stop_at_third_call)
    assert len(asked) == 3


# ---- bodies that never arrive ---------------------------------------------------------------------

def test_announced_bodies_that_never_come_do_not_lock_others_out(server):
    idle = [raw_connection(server) for _ in range(6)]  # three times the queue
    try:
        for sock in idle:
            sock.sendall(request_head((1 << 20) - 1))  # almost max_body_bytes, never sent
        server.wait_metric("keraslm_requests_receiving", 6)
        for _ in range(3):
            assert server.score(["the game began ."])[0]["num_tokens"] == 5
        generated = server.post("/v1/generate", json={"prompt": "the", "tokens": 3})
        assert generated.status_code == 200
        for sock in idle:  # each still gets its 408 at its deadline
            status, body = read_answer(sock)
            assert (status, body["error"]["code"]) == (408, "body_timeout")
    finally:
        for sock in idle:
            sock.close()
    server.wait_metric("keraslm_requests_receiving", 0)


@pytest.mark.parametrize("method, path", [
    ("POST", "/x"), ("POST", "/v1/score/"), ("POST", "/"), ("PUT", "/v1/score"),
    ("POST", "/healthz"), ("GET", "/readyz"), ("DELETE", "/metrics")])
def test_every_path_has_the_body_deadline(server, method, path):
    with raw_connection(server) as sock:
        started = time.monotonic()
        sock.sendall(request_head(5000, path).replace(b"POST", method.encode(), 1) + b"{")
        status, body = read_answer(sock)
        assert (status, body["error"]["code"]) == (408, "body_timeout")
        assert 1.5 < time.monotonic() - started < 2 + 3  # the 2 s deadline
        assert closed_by_server(sock)


def test_a_body_announced_over_the_limit_on_another_path_is_413_at_once(server):
    with raw_connection(server) as sock:
        started = time.monotonic()
        sock.sendall(request_head(50 << 20, "/x"))
        status, body = read_answer(sock)
        assert (status, body["error"]["code"]) == (413, "body_too_large")
        assert time.monotonic() - started < 1


def test_a_chunked_body_on_another_path_is_bounded_by_max_body_bytes(server):
    with raw_connection(server) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        try:
            for _ in range(40):  # 2.5 MB, over the 1 MiB limit
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # closed on us mid-send: the answer is already there
            pass
        status, body = read_answer(sock)
        assert (status, body["error"]["code"]) == (413, "body_too_large")


@pytest.mark.parametrize("body", [
    b'{"texts": ' + b"[" * 300_000 + b"]" * 300_000 + b"}",
    b'{"texts": ["a"], "x": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
    b'{"texts": ["\xff\xfe"]}'], ids=["nested-lists", "nested-objects", "not-utf8"])
def test_a_body_json_cannot_parse_is_a_400_saying_why(server, body):
    answer = server.post(content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["code"] == "invalid_json"
    assert "not UTF-8, or nested too deeply" in answer.json()["error"]["message"]


# ---- request heads ---------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["httptools", "h11"])
def parser_server(request, tiny_bundle, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("heads"), tiny_bundle.bundle, "--http", request.param,
                 "--max-header-bytes", "8192") as s:
        yield s


@pytest.mark.parametrize("head", [
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
    b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Many: a\r\n" * 1000 + b"\r\n"],
    ids=["one-header", "request-line", "many-headers"])
def test_a_head_over_max_header_bytes_is_answered_431_and_closed(parser_server, head):
    with raw_connection(parser_server) as sock:
        sock.sendall(head)
        status, body = read_answer(sock)
        assert status == 431
        assert (body["error"]["limit"], body["error"]["max"]) == ("max_header_bytes", 8192)
        assert closed_by_server(sock)
    fits = {"X-Fits": "a" * 7000}
    assert parser_server.get("/healthz", headers=fits).status_code == 200


def test_a_64_mb_head_sent_fast_is_not_buffered(parser_server):
    before = rss_mb(parser_server)
    with raw_connection(parser_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        try:
            for _ in range(1024):
                sock.sendall(b"a" * 65536)
        except OSError:
            pass  # closed on us: what matters is what the server kept
    assert rss_mb(parser_server) - before < 16
    assert parser_server.get("/healthz").status_code == 200


def test_the_next_request_on_a_kept_alive_connection_is_capped_too(parser_server):
    with raw_connection(parser_server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _ = read_answer(sock)
        assert status == 200
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        status, _ = read_answer(sock)
        assert status == 431


def test_pipelining_is_answered_in_order_up_to_a_bound(parser_server, request):
    healthz = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with raw_connection(parser_server) as sock:
        sock.sendall(healthz * 10)
        data = b""
        while data.count(b"HTTP/1.1 200") < 10:
            chunk = sock.recv(65536)
            assert chunk, f"closed after {data.count(b'HTTP/1.1 200')} answers"
            data += chunk
    before = rss_mb(parser_server)
    with raw_connection(parser_server) as sock:  # 20,000 in one write: httptools parses and
        try:                                   # queues them all (closed), h11 one at a time
            sock.sendall(healthz * 20_000)
            while sock.recv(1 << 20):
                pass
        except OSError:
            pass
    assert rss_mb(parser_server) - before < 16
    assert parser_server.get("/healthz").status_code == 200


# ---- work whose client left never starts ----------------------------------------------------------

class CountingPipeline(TextPipeline):
    """A real pipeline that counts the texts it splits into samples."""

    def samples(self, text: str) -> list[str]:
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        return super().samples(text)


def _service(bundle: Path) -> Service:
    """A Service over `bundle` with its scorer loaded, outside any server."""
    service = Service(Settings(bundle, threads=1))
    service.scorer = Scorer(bundle, device="cpu", threads=1,
                            pipeline=CountingPipeline(split="lines", tokenizer="whitespace"))
    return service


def _blocked(pool) -> threading.Event:
    """Occupy the single thread of `pool` until the event is set."""
    release = threading.Event()
    pool.submit(release.wait, WAIT)
    return release


def test_tokenizing_queued_for_a_request_that_gave_up_never_starts(tiny_bundle):
    service = _service(tiny_bundle.bundle)

    async def main():
        release = _blocked(service.tokenizer_thread)
        loop = asyncio.get_running_loop()
        ctx = RequestContext(loop.time() + 0.3, service.admission.arrive(), size=0)
        with pytest.raises(ServiceError) as err:
            await service.tokenize(service.scorer, ["the game . " * 2000], ctx)
        assert err.value.status == 504
        release.set()
        await loop.run_in_executor(service.tokenizer_thread, lambda: None)  # drained

    asyncio.run(main())
    assert service.scorer.pipeline.__dict__.get("calls", 0) == 0
    service.tokenizer_thread.shutdown()


def test_a_generation_queued_for_a_client_that_left_never_runs_the_model(tiny_bundle):
    service = _service(tiny_bundle.bundle)
    session = service.scorer.bundle.session
    calls = []
    run = session.next_logprobs
    session.next_logprobs = lambda *a: calls.append(1) or run(*a)

    async def main():
        release = _blocked(service.model_thread)
        loop = asyncio.get_running_loop()
        ctx = RequestContext(loop.time() + WAIT, service.admission.arrive(), size=0)
        loop.call_later(0.2, ctx.disconnected.set)
        with pytest.raises(ServiceError) as err:
            await generate_text(service, GenerateRequest(prompt="the game", tokens=20), ctx)
        assert err.value.status == 499
        release.set()
        await loop.run_in_executor(service.model_thread, lambda: None)  # drained

    asyncio.run(main())
    assert calls == []
    assert service.scorer.pipeline.__dict__.get("calls", 0) == 1  # the prompt, off that thread
    service.model_thread.shutdown()


def test_a_request_sure_to_pass_the_token_limit_is_413_even_when_busy(tiny_bundle):
    service = _service(tiny_bundle.bundle)
    service.admission.record(1000, 1.0)  # 1 ms a byte: a 400 kB body is 400 s of work
    busy = service.admission.admit(10)  # another request in flight

    async def answer(call, body):
        loop = asyncio.get_running_loop()
        ctx = RequestContext(loop.time() + WAIT, service.admission.arrive(), size=400_000)
        try:
            await call(body, ctx)
        except ServiceError as err:
            return err.status, err.code
        finally:
            ctx.close()

    async def main():
        generate = lambda body, ctx: generate_text(service, body, ctx)
        assert await answer(generate, GenerateRequest(prompt="\n" * 400_000)) == (
            413, "too_many_tokens")
        assert await answer(generate, GenerateRequest(prompt="\u2028" * 400_000)) == (
            413, "too_many_tokens")
        assert await answer(service.score, ScoreRequest(texts=["a\n" * 200_000])) == (
            413, "too_many_tokens")
        # a body the limit cannot refuse without tokenizing: refused by admission, 503
        assert await answer(generate, GenerateRequest(prompt="the " * 100)) == (
            503, "overloaded")

    asyncio.run(main())
    busy.close()
    assert (service.admission.in_flight, service.admission.receiving) == (0, 0)


# ---- shutdown during a slow generation -------------------------------------------------------------

def slow_generation(tmp: Path, tiny_bundle, *args: str):
    """A ready server whose every generation step takes 50 ms (helpers_server's launcher)."""
    return serving(tmp, tiny_bundle.bundle, *args, gated=True,
                   env={"TEST_GENERATE_DELAY": "0.05"})


def send_generate(sock, tokens: int) -> None:
    body = json.dumps({"prompt": "the", "tokens": tokens}).encode()
    sock.sendall(request_head(len(body), "/v1/generate") + body)


def test_sigterm_during_a_slow_generation_ends_by_its_deadline(tiny_bundle, tmp_path):
    with slow_generation(tmp_path, tiny_bundle, "--timeout", "3") as s, raw_connection(s) as sock:
        send_generate(sock, 2000)  # 100 s of steps
        s.wait_metric("keraslm_requests_in_progress", 1)
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        status, answer = read_answer(sock)
        assert (status, answer["error"]["code"]) == (504, "timeout")
        assert s.proc.wait(timeout=WAIT) == 0
        assert time.monotonic() - started < 3 + 2  # its deadline, not 100 s


def test_a_long_generation_takes_turns_with_scoring(tiny_bundle, tmp_path):
    with slow_generation(tmp_path, tiny_bundle) as s, raw_connection(s) as sock:
        send_generate(sock, 400)  # 20 s of the model thread
        s.wait_metric("keraslm_requests_in_progress", 1)
        time.sleep(0.5)  # well into it
        started = time.monotonic()
        assert s.score(["the game began ."])[0]["num_tokens"] == 5
        assert time.monotonic() - started < 3  # a step's wait, not the generation's 20 s
        status, answer = read_answer(sock)
        assert status == 200 and len(answer["tokens"]) == 400


def test_the_generation_steps_really_are_slowed(tiny_bundle, tmp_path):
    """The tests above mean something only if TEST_GENERATE_DELAY slows generation."""
    with slow_generation(tmp_path, tiny_bundle) as s:
        started = time.monotonic()
        answer = s.post("/v1/generate", json={"prompt": "the", "tokens": 20})
        assert answer.status_code == 200 and time.monotonic() - started > 20 * 0.05
