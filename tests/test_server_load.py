"""The scoring service under overload, slow senders and abandoned requests (issue 13, defects 1
and 7): admission before any work, one deadline from arrival, no model time for nobody."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import pytest
from helpers_server import (
    WAIT,
    Server,
    closed_by_server,
    in_thread,
    raw_connection,
    read_answer,
    ready,
    request_head,
    start_server,
    stop,
)

from keraslm.text import TextPipeline
from serve.scorer import Scorer
from serve.web.admission import Admission
from serve.web.schemas import ServiceError
from serve.web.service import _encode


def batches(s: Server) -> float:
    return s.metrics()["keraslm_batch_size_requests_count"]


# ---- admission control ---------------------------------------------------------------------------

@pytest.mark.parametrize("gated", [("--queue-size", "2")], indirect=True, ids=["queue-2"])
def test_a_full_service_refuses_at_arrival_without_reading_the_body(gated):
    s = ready(gated)
    gated.step.touch()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        held = in_thread(pool, s, ["held in the model"])
        s.wait_metric("keraslm_batch_running_requests", 1)
        queued = [in_thread(pool, s, ["queued"]) for _ in range(2)]
        s.wait_metric("keraslm_queue_depth", 2)
        with raw_connection(s) as sock:  # announces a body it never sends
            started = time.monotonic()
            sock.sendall(request_head(50_000))
            status, body = read_answer(sock)
            assert status == 503 and body["error"]["code"] == "overloaded"
            assert time.monotonic() - started < 5  # answered at once, not at the timeout
        gated.step.unlink()
        assert [f.result(WAIT).status_code for f in (held, *queued)] == [200, 200, 200]


def test_admission_refuses_work_that_would_finish_after_the_timeout():
    admission = Admission(queue_size=100, timeout=10, running=lambda: 0)
    admission.record(1000, 1.0)  # 1 ms per byte
    first = admission.admit(3000)  # alone, always admitted
    second = admission.admit(2000)  # 5 s of work expected: within 0.5 x 10 s
    with pytest.raises(ServiceError) as refused:
        admission.admit(2000)  # 7 s > 5 s
    assert (refused.value.status, refused.value.code, refused.value.limit) == (
        503, "overloaded", "timeout")
    assert refused.value.retry_after == 3  # half the 5 s of admitted work, rounded up
    first.close()
    first.close()  # harmless
    assert admission.backlog == 2000 and admission.in_flight == 1
    admission.admit(2000).close()  # room again
    second.close()
    assert (admission.backlog, admission.in_flight) == (0, 0)


def test_admission_learns_the_wall_time_between_answers_while_busy():
    now = [0.0]
    admission = Admission(queue_size=100, timeout=10, running=lambda: 0, clock=lambda: now[0])
    tickets = [admission.admit(1000) for _ in range(3)]  # busy from t = 0
    now[0] = 2.0
    admission.record(1000, 0.5, began=0.0)  # 0.5 s of work, but 2 s of wall time
    assert admission.work_seconds_per_byte == pytest.approx(0.0005)
    assert admission.wall_seconds_per_byte == pytest.approx(0.002)
    assert admission.seconds_per_byte == pytest.approx(0.002)  # the more cautious
    tickets[0].close()
    now[0] = 9.0
    admission.record(1000, 0.5, began=8.0)  # a slow upload until t = 8 is not service time
    assert admission.wall_seconds_per_byte == pytest.approx(0.8 * 0.002 + 0.2 * 0.001)
    for ticket in tickets[1:]:
        ticket.close()
    assert admission.busy_since is None  # idle: the next busy period starts afresh


def test_the_queue_bound_counts_requests_being_tokenized_too():
    running = [0]
    admission = Admission(queue_size=2, timeout=10, running=lambda: running[0])
    tickets = [admission.admit(10), admission.admit(10)]
    with pytest.raises(ServiceError):
        admission.admit(10)
    with pytest.raises(ServiceError):
        admission.arrive()  # full: refused before its body is read
    running[0] = 1  # one of them is now in the running batch
    tickets.append(admission.admit(10))
    assert admission.waiting == 2


def test_a_body_still_arriving_holds_no_place_and_is_charged_once_in():
    admission = Admission(queue_size=1, timeout=10, running=lambda: 0)
    admission.record(1000, 1.0)  # 1 ms per byte
    idle = [admission.arrive() for _ in range(5)]  # announced bodies that never come
    assert (admission.receiving, admission.waiting, admission.backlog) == (5, 0, 0)
    ticket = admission.arrive().admit(3000)  # another's body arrived: admitted
    assert (admission.receiving, admission.in_flight, admission.backlog) == (5, 1, 3000)
    with pytest.raises(ServiceError) as refused:  # the queue (of 1) is now full
        idle[0].admit(10)
    assert refused.value.limit == "queue_size" and admission.receiving == 4
    ticket.close()
    alone = idle[1].admit(6000)  # 6 s > 0.5 x 10 s, but alone: always admitted
    assert (alone.size, admission.receiving) == (6000, 3)
    alone.close()
    for arrival in idle:
        arrival.close()
        arrival.close()  # harmless
    assert admission.receiving == 0


# ---- tokenizing stops at the token limit ---------------------------------------------------------

class CountingPipeline(TextPipeline):
    """A real pipeline that counts the samples it tokenizes."""

    def tokenize(self, sample: str) -> list[str]:
        self.__dict__["calls"] = self.__dict__.get("calls", 0) + 1
        return super().tokenize(sample)


def test_tokenizing_stops_as_soon_as_a_text_passes_the_token_limit(tiny_bundle):
    scorer = Scorer(tiny_bundle.bundle, device="cpu", threads=1,
                    pipeline=CountingPipeline(split="lines", tokenizer="whitespace"))
    text = "a b c\n" * 5000  # 20,000 tokens on 5,000 lines
    with pytest.raises(ServiceError) as err:
        _encode(scorer, ["fine", text], 10_000, lambda: False, per_token=False)
    assert err.value.status == 413 and err.value.message.startswith("texts[1] has more than")
    assert scorer.pipeline.calls < 2600  # about half the lines: it stopped at the limit
    calls = scorer.pipeline.calls
    with pytest.raises(Exception) as stopped:
        _encode(scorer, [text], 10**6, lambda: True, per_token=False)
    assert type(stopped.value).__name__ == "Abandoned" and scorer.pipeline.calls == calls


# ---- one deadline, and no model time for requests that gave up -----------------------------------

@pytest.mark.parametrize("gated", [("--timeout", "4")], indirect=True, ids=["timeout-4"])
def test_requests_that_time_out_or_leave_are_never_scored(gated):
    s = ready(gated)
    before = batches(s)
    gated.step.touch()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = in_thread(pool, s, ["held in the model for many bptt steps " * 30])
        s.wait_metric("keraslm_batch_running_requests", 1)
        late = in_thread(pool, s, ["waits past its deadline"])
        with raw_connection(s) as sock:  # queued, then the client leaves
            body = json.dumps({"texts": ["left early"]}).encode()
            sock.sendall(request_head(len(body)) + body)
            s.wait_metric("keraslm_queue_depth", 2)
        s.wait_metric("keraslm_queue_depth", 1)  # the one that left is withdrawn at once
        assert late.result(WAIT).status_code == 504
        assert held.result(WAIT).status_code == 504  # its deadline passed while held
        s.wait_metric("keraslm_queue_depth", 0)
        gated.step.unlink()
    s.wait_metric("keraslm_texts_abandoned_total", 1)  # the held text left after its one call
    s.wait_metric("keraslm_batch_running_requests", 0)
    assert batches(s) == before + 1  # no call after the one running when they gave up
    assert s.score(["free again"])[0]["num_tokens"] == 3


@pytest.mark.parametrize("gated", [("--timeout", "3", "--queue-size", "1")], indirect=True,
                         ids=["timeout-3-queue-1"])
def test_generation_is_admitted_and_timed_like_scoring(gated):
    s = ready(gated)
    gated.step.touch()
    ask = {"prompt": "the", "tokens": 5, "seed": 1}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        held = in_thread(pool, s, ["held in the model"])
        s.wait_metric("keraslm_batch_running_requests", 1)
        started = time.monotonic()
        waiting = pool.submit(s.post, "/v1/generate", json=ask)  # waits for the model thread
        s.wait_metric("keraslm_requests_in_progress", 2)
        refused = s.post("/v1/generate", json=ask)  # the queue (1) is full
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        answer = waiting.result(WAIT)
        assert answer.status_code == 504 and answer.json()["error"]["code"] == "timeout"
        assert 2.5 < time.monotonic() - started < 10
        gated.step.unlink()
        assert held.result(WAIT).status_code == 504
    s.wait_metric("keraslm_requests_in_progress", 0)
    again = s.post("/v1/generate", json=ask)
    assert again.status_code == 200 and len(again.json()["tokens"]) == 5


@pytest.mark.parametrize("gated", [("--timeout", "1.5")], indirect=True, ids=["timeout-1.5"])
def test_a_body_still_arriving_at_the_deadline_gets_408_and_the_connection_closes(gated):
    s = ready(gated)
    with raw_connection(s) as sock:
        started = time.monotonic()
        sock.sendall(request_head(100) + b'{"texts": [')
        for _ in range(4):  # a byte every half second: never done in time
            time.sleep(0.5)
            try:
                sock.sendall(b" ")
            except OSError:
                break
        status, body = read_answer(sock)
        assert status == 408 and body["error"] == {
            "code": "body_timeout", "limit": "timeout", "max": 1.5,
            "message": "the request body did not arrive within 1.5 s (timeout)"}
        assert 1.4 < time.monotonic() - started < 10
        assert closed_by_server(sock)


# ---- connections -----------------------------------------------------------------------------------

@pytest.mark.parametrize("http", ["httptools", "h11"])
def test_slow_headers_are_cut_off_and_connections_are_capped(http, tiny_bundle, tmp_path):
    s = start_server(tmp_path, "--model", str(tiny_bundle.bundle), "--header-timeout", "1",
                     "--max-connections", "4", "--http", http)
    try:
        s.wait_ready()
        with raw_connection(s) as slow:
            slow.sendall(b"POST /v1/score HTTP/1.1\r\n")
            started = time.monotonic()
            for _ in range(10):  # a header line every 0.3 s, never finishing
                time.sleep(0.3)
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
            assert closed_by_server(slow) and time.monotonic() - started < 5
        idle = [raw_connection(s) for _ in range(4)]
        try:
            s.wait_for(lambda: _refused(s) is not None, "a refused connection")
            status, body = _refused(s)
            assert status == 503 and body["error"]["code"] == "too_many_connections"
            assert body["error"]["limit"] == "max_connections"
        finally:
            for sock in idle:
                sock.close()
        s.wait_for(lambda: _status(s) == 200, "connections accepted again")
        assert s.metrics()["keraslm_connections_refused_total"] >= 1
    finally:
        stop(s)


def _refused(s: Server) -> tuple[int, dict] | None:
    with raw_connection(s) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, body = read_answer(sock)
        return (status, body) if status == 503 else None


def _status(s: Server) -> int | None:
    try:
        return s.get("/healthz").status_code
    except Exception:  # noqa: BLE001 - refused or reset while the idle sockets close
        return None


def test_sigterm_is_not_held_up_by_slow_senders(tiny_bundle, tmp_path):
    s = start_server(tmp_path, "--model", str(tiny_bundle.bundle), "--header-timeout", "30",
                     "--queue-size", "64")  # --timeout 30: the slow bodies are not timed out
    try:
        s.wait_ready()
        slow = [raw_connection(s) for _ in range(20)]
        for i, sock in enumerate(slow):  # half mid-headers, half mid-body
            sock.sendall(b"POST /v1/score HTTP/1.1\r\n" if i % 2 else request_head(100) + b"{")
        s.wait_metric("keraslm_requests_receiving", 10)  # bodies still arriving
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=WAIT) == 0
        assert time.monotonic() - started < 10  # not the 30 s body deadline
        status, body = read_answer(slow[0])
        assert status == 503 and body["error"]["code"] == "shutting_down"
        for sock in slow:
            sock.close()
    finally:
        stop(s)
