"""Who may use the service: API keys, allowed hosts and TLS, on real servers over loopback
(`python -m serve.server` in a subprocess, helpers_server.py) with real clients (httpx, curl, raw
sockets). The command line's refusals (bad key files, certificates, a non-loopback address without
keys) run `main` in this process with a missing bundle after them, so a check that wrongly passes
ends in the bundle's error instead of a server."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers_server import REPO, WAIT, Server, free_port, serving, start_server, stop

from serve import server as server_module

KEYS = ("alpha-0123456789", "beta-9876543210")
KEY_FILE = f"# the tests' keys\n{KEYS[0]}\n\n   {KEYS[1]}  \r\n# retired: gamma-000\n"
CHALLENGE = 'Bearer realm="keraslm"'
SCORE = {"texts": ["the game began in 1998 ."]}
TIMEOUT = 10  # seconds: every request here, and each server's --timeout
OPEN_HOSTS = "api.example.com,.corp.example,[::1],10.0.0.0/8"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def key_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(KEY_FILE)
    return path


def serve_tiny(tmp: Path, tiny_bundle, *args: str, env: dict | None = None) -> Iterator[Server]:
    with serving(tmp, tiny_bundle.bundle, "--timeout", str(TIMEOUT), *args, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def keyed(tiny_bundle, key_file, tmp_path_factory) -> Iterator[Server]:
    """Keys, on loopback with the default hosts, httptools; its log at info."""
    yield from serve_tiny(tmp_path_factory.mktemp("keyed"), tiny_bundle, "--api-key-file",
                       str(key_file), "--log-level", "info")


@pytest.fixture(scope="module")
def opened(tiny_bundle, key_file, tmp_path_factory) -> Iterator[Server]:
    """Keys on every interface (no --allow-unauthenticated needed), /metrics and the docs open,
    an explicit host list."""
    yield from serve_tiny(tmp_path_factory.mktemp("opened"), tiny_bundle, "--host", "0.0.0.0",
                       "--api-key-file", str(key_file), "--open-metrics", "--open-docs",
                       "--allowed-hosts", OPEN_HOSTS)


@pytest.fixture(scope="module")
def from_env(tiny_bundle, key_file, tmp_path_factory) -> Iterator[Server]:
    """Keys from KERASLM_API_KEY_FILE, any host, the h11 parser."""
    yield from serve_tiny(tmp_path_factory.mktemp("env"), tiny_bundle, "--allowed-hosts", "*",
                       "--http", "h11", env={"KERASLM_API_KEY_FILE": str(key_file)})


def raw(server: Server, request: bytes) -> tuple[int, bytes, float]:
    """Send `request` on a fresh connection; the status, the whole answer read to the server's
    close, and the seconds that took."""
    host, port = server.url.rsplit("/", 1)[1].rsplit(":", 1)
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer, time.monotonic() - started


def error_count(server: Server, code: str, headers: dict) -> float:
    text = server.get("/metrics", headers=headers).text
    found = re.search(rf'^keraslm_request_errors_total{{code="{code}"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


# ---- API keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("headers, code, message", [
    ({}, "missing_api_key", "needs an API key"),
    (bearer("wrong-key-000"), "invalid_api_key", "not valid"),
    (bearer(KEYS[0][:-1]), "invalid_api_key", "not valid"),
    (bearer(KEYS[0] + "x"), "invalid_api_key", "not valid"),
    (bearer(KEYS[0].upper()), "invalid_api_key", "not valid"),
    ({"Authorization": f"Basic {KEYS[0]}"}, "missing_api_key", "must be Bearer KEY"),
    ({"Authorization": "Bearer"}, "missing_api_key", "no key after Bearer"),
    ({"Authorization": KEYS[0]}, "missing_api_key", "must be Bearer KEY"),
    ([("Authorization", f"Bearer {KEYS[0]}"), ("Authorization", f"Bearer {KEYS[1]}")],
     "missing_api_key", "more than one Authorization"),
], ids=["missing", "wrong", "prefix", "longer", "other-case", "basic", "bearer-alone",
        "no-scheme", "two-headers"])
@pytest.mark.parametrize("path", ["/v1/score", "/v1/generate", "/v1/nope", "/v1/score/"])
def test_v1_without_the_right_key_is_401_with_a_challenge(keyed, path, headers, code, message):
    response = keyed.post(path, json=SCORE, headers=headers)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert error["code"] == code and message in error["message"]
    assert all(k not in error["message"] for k in KEYS) and "wrong-key" not in response.text
    wanted = CHALLENGE + (', error="invalid_token"' if code == "invalid_api_key" else "")
    assert response.headers["www-authenticate"] == wanted
    assert response.headers["connection"] == "close"  # the body was announced and not read


def test_the_right_key_scores_and_generates(keyed):
    for key in KEYS:  # the second has spaces and a \r around it in the file
        response = keyed.post(json={**SCORE, "per_token": True}, headers=bearer(key))
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["num_tokens"] == 7
    response = keyed.post(json=SCORE, headers={"Authorization": f"bearer   {KEYS[1]}"})
    assert response.status_code == 200, response.text
    response = keyed.post("/v1/generate", json={"prompt": "the game", "tokens": 5, "seed": 1},
                          headers=bearer(KEYS[0]))
    assert response.status_code == 200, response.text
    assert response.json()["text"].startswith("the game")


def test_probes_and_the_page_are_open_metrics_and_docs_are_not(keyed):
    for path in ("/healthz", "/readyz", "/"):
        assert keyed.get(path).status_code == 200, path
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                 "/nope", "/healthz/"):
        response = keyed.get(path)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == CHALLENGE
        assert "connection" not in response.headers  # no body announced: kept alive
    spec = keyed.get("/openapi.json", headers=bearer(KEYS[0])).json()
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/score"]["post"]["security"] == [{"apiKey": []}]
    assert spec["paths"]["/healthz"]["get"]["security"] == []
    assert {"401", "421"} <= set(spec["paths"]["/v1/score"]["post"]["responses"])


def test_refusals_are_counted_by_code(keyed):
    key = bearer(KEYS[0])
    before = error_count(keyed, "invalid_api_key", key)
    keyed.post(json=SCORE, headers=bearer("nope"))
    keyed.post(json=SCORE, headers=bearer("nope"))
    assert error_count(keyed, "invalid_api_key", key) == before + 2


def test_metrics_and_docs_open_with_their_flags(opened):
    host = {"Host": "api.example.com"}
    for path in ("/metrics", "/docs", "/redoc", "/openapi.json", "/healthz", "/"):
        assert opened.get(path, headers=host).status_code == 200, path
    assert "keraslm_requests_total" in opened.get("/metrics", headers=host).text
    assert opened.post(json=SCORE, headers=host).status_code == 401
    assert opened.post(json=SCORE, headers={**host, **bearer(KEYS[1])}).status_code == 200


def test_the_key_file_can_be_named_by_keraslm_api_key_file(from_env):
    assert from_env.post(json=SCORE).status_code == 401
    assert from_env.post(json=SCORE, headers=bearer(KEYS[0])).status_code == 200


@pytest.mark.parametrize("content, expected", [
    (None, "file not found: --api-key-file {path}"),
    ("dir", "--api-key-file {path}: is not a regular file (a directory)"),
    ("fifo", "--api-key-file {path}: is not a regular file (a FIFO)"),
    ("# only a comment\n\n   \n", "--api-key-file {path} holds no key"),
    ("", "--api-key-file {path} holds no key"),
    ("good-key-1\nbad key 2\n", "--api-key-file {path}, line 2: the key has a space inside"),
    ("good-key-1\n\n# c\nbad\tkey\n", "--api-key-file {path}, line 4: the key has a space inside"),
    ("cl\u00e9-secr\u00e8te\n",
     "--api-key-file {path}, line 1: the key has a character that is not visible ASCII (U+00E9)"),
    ("ok-key\nnul\x00key\n",
     "--api-key-file {path}, line 2: the key has a character that is not visible ASCII (U+0000)"),
    (b"ok-key\n\xff\xfe-key\n", "--api-key-file {path}, line 2: not UTF-8 text"),
    ("k" * (1 << 20) + "\n", "--api-key-file {path}: over 1,048,576 bytes"),
], ids=["missing", "directory", "fifo", "comments-only", "empty", "inner-space", "inner-tab",
        "non-ascii", "nul", "not-utf8", "too-large"])
def test_a_bad_key_file_is_one_line_and_exit_1(capsys, tmp_path, content, expected):
    path = tmp_path / "keys.txt"
    if content == "dir":
        path.mkdir()
    elif content == "fifo":
        os.mkfifo(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    missing = str(tmp_path / "no-bundle")
    assert server_module.main(["--model", missing, "--api-key-file", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected.format(path=path)) and err.count("\n") == 1, err
    assert "bad key 2" not in err and "secr" not in err  # never the key itself


def test_a_bad_file_named_by_the_variable_says_where_the_name_came_from(capsys, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("KERASLM_API_KEY_FILE", str(tmp_path / "absent.txt"))
    assert server_module.main(["--model", str(tmp_path / "no-bundle")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: file not found: KERASLM_API_KEY_FILE={tmp_path / 'absent.txt'}\n"


def test_a_non_loopback_host_without_keys_is_refused(capsys, tmp_path):
    assert server_module.main(["--model", str(tmp_path / "no-bundle"), "--host", "0.0.0.0",
                               "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to listen on 0.0.0.0 without API keys: anyone who "
                          "can reach it could use the model; give --api-key-file FILE")
    assert "--allow-unauthenticated" in err and err.count("\n") == 1


def test_allow_unauthenticated_starts_on_a_non_loopback_host_and_allows_any_host(tiny_bundle,
                                                                                 tmp_path):
    s = start_server(tmp_path, "--model", str(tiny_bundle.bundle), "--host", "0.0.0.0",
                     "--allow-unauthenticated")
    try:
        s.wait_ready()
        assert s.post(json=SCORE, headers={"Host": "evil.example"}).status_code == 200
    finally:
        stop(s)


# ---- allowed hosts ----------------------------------------------------------------------------

@pytest.mark.parametrize("host, allowed", [
    ("localhost", True), ("localhost:8080", True), ("LocalHost", True), ("localhost.", True),
    ("127.0.0.1", True), ("127.0.0.1:1234", True), ("127.3.4.5:80", True), ("[::1]", True),
    ("[::1]:8080", True), ("[0:0::1]:9", True),
    ("evil.example", False), ("evil.example:8080", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io", False), ("[::2]:80", False), ("128.0.0.1", False), ("0x7f.1", False),
    ("localhost:http", False), ("[::1]x", False), ("", False),
])
def test_the_default_on_loopback_allows_only_loopback_names(keyed, host, allowed):
    response = keyed.get("/", headers={"Host": host})
    if allowed:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 421, response.text
        assert response.json()["error"]["code"] == "host_not_allowed"
        assert "allowed_hosts" in response.json()["error"]["message"]


def test_dns_rebinding_is_refused_before_the_key_and_probes_are_exempt(keyed):
    response = keyed.post(json=SCORE, headers={"Host": "evil.example", **bearer(KEYS[0])})
    assert response.status_code == 421
    assert response.json()["error"]["message"] == (
        "this service does not answer for the host evil.example (allowed_hosts)")
    for path in ("/healthz", "/readyz"):  # orchestrators probe by pod address
        assert keyed.get(path, headers={"Host": "10.1.2.3:8080"}).status_code == 200


@pytest.mark.parametrize("head", [
    b"GET / HTTP/1.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\nConnection: close\r\n\r\n",
], ids=["missing", "twice"])
def test_a_missing_or_repeated_host_is_400(keyed, head):
    status, answer, _ = raw(keyed, head)
    assert status == 400 and b'"code":"bad_host"' in answer


@pytest.mark.parametrize("host, allowed", [
    ("api.example.com", True), ("API.Example.COM:443", True), ("corp.example", True),
    ("a.b.corp.example", True), ("[::1]:80", True), ("10.200.3.4", True),
    ("localhost", False), ("127.0.0.1", False), ("xcorp.example", False),
    ("example.com", False), ("www.api.example.com", False), ("11.0.0.1", False),
])
def test_an_explicit_list_takes_names_suffixes_addresses_and_networks(opened, host, allowed):
    assert opened.get("/", headers={"Host": host}).status_code == (200 if allowed else 421)


def test_star_allows_any_host(from_env):
    for host in ("evil.example", "[::2]:1", "anything:80"):
        assert from_env.get("/", headers={"Host": host}).status_code == 200


def test_a_bad_allowed_hosts_value_is_a_usage_error(capsys):
    for value in ("a,b@c", ",", "10.0.0.0/99", "[::1"):
        with pytest.raises(SystemExit) as exit_info:
            server_module.main(["--allowed-hosts", value])
        assert exit_info.value.code == 2
        assert "argument --allowed-hosts" in capsys.readouterr().err


@pytest.mark.parametrize("server_name, head, status", [
    ("keyed", ("POST /v1/score", "Host: localhost", "Content-Type: application/json",
               "Content-Length: 100000"), 401),
    ("keyed", ("POST /v1/generate", "Host: evil.example", "Transfer-Encoding: chunked"), 421),
    ("keyed", ("PUT /v1/anything", "Host: localhost", "Content-Length: 5"), 401),
    ("from_env", ("POST /v1/score", "Host: x", "Content-Type: application/json",
                  "Content-Length: 100000"), 401),
], ids=["length-httptools", "chunked-host-httptools", "put-httptools", "length-h11"])
def test_a_refused_request_is_answered_at_once_without_its_body_and_closed(request, server_name,
                                                                           head, status):
    server = request.getfixturevalue(server_name)
    request_line, *fields = head
    head = f"{request_line} HTTP/1.1\r\n" + "".join(f + "\r\n" for f in fields) + "\r\n"
    got, answer, seconds = raw(server, head.encode())  # the body never comes: read to the close
    assert got == status and b"connection: close" in answer.lower()
    assert seconds < TIMEOUT / 4, seconds  # not held until the body deadline


# ---- the command line and its log ---------------------------------------------------------------

def test_the_log_says_what_is_required_and_never_a_key(keyed):
    log = keyed.log.read_text()
    port = keyed.url.rsplit(":", 1)[1]
    assert (f"keraslm: listening on http://127.0.0.1:{port}; API key required (2 keys; /, "
            f"/healthz, /readyz open); allowed hosts: localhost, 127.0.0.0/8, ::1; loading") in log
    assert all(k not in log for k in KEYS)


def test_help_documents_every_access_and_tls_flag(capsys):
    with pytest.raises(SystemExit):
        server_module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--api-key-file FILE", "--open-metrics", "--open-docs", "--allow-unauthenticated",
                 "--allowed-hosts LIST", "--ssl-certfile FILE", "--ssl-keyfile FILE",
                 "--ssl-keyfile-password PASSWORD", "KERASLM_API_KEY_FILE", "https://",
                 "421", "401", "localhost, 127.0.0.0/8, ::1"):
        assert flag in text, flag


# ---- TLS ----------------------------------------------------------------------------------------

OPENSSL = "/usr/bin/openssl"


def openssl(*args: str) -> None:
    if not shutil.which(OPENSSL):
        pytest.fail(f"{OPENSSL} is missing: the TLS tests make their certificates with it",
                    pytrace=False)
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=WAIT)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A self-signed certificate for localhost and 127.0.0.1 (cert.pem, key.pem), another
    pair, the first key encrypted (password "secret"), and a file that is not PEM."""
    d = tmp_path_factory.mktemp("pki")
    for name, cn in (("", "localhost"), ("other-", "other")):
        openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                f"/CN={cn}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                "-keyout", str(d / f"{name}key.pem"), "-out", str(d / f"{name}cert.pem"))
    openssl("pkey", "-in", str(d / "key.pem"), "-aes256", "-passout", "pass:secret",
            "-out", str(d / "encrypted-key.pem"))
    (d / "garbage.pem").write_text("not a certificate\n")
    return d


def tls_server(tmp: Path, bundle: Path, pki: Path, *args: str) -> Server:
    """The server on https:// with the self-signed pair, once ready; its log at info."""
    port = free_port()
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "serve.server", "--model", str(bundle), "--port", str(port),
             "--threads", "1", "--ssl-certfile", str(pki / "cert.pem"),
             "--ssl-keyfile", str(pki / "key.pem"), *args], cwd=REPO, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO)})
    s = Server(proc, f"https://127.0.0.1:{port}", log)
    s.wait_for(lambda: https_status(s, pki, "/readyz") == 200, "https /readyz")
    return s


@pytest.fixture(scope="module")
def tls(tiny_bundle, pki, key_file, tmp_path_factory) -> Iterator[Server]:
    """The server on https:// with the self-signed pair, and keys."""
    s = tls_server(tmp_path_factory.mktemp("tls"), tiny_bundle.bundle, pki,
                   "--api-key-file", str(key_file))
    try:
        yield s
    finally:
        stop(s)


def https_status(server: Server, pki: Path, path: str) -> int | None:
    try:
        with https(server, pki) as client:
            return client.get(path).status_code
    except httpx.TransportError:
        return None


def https(server: Server, pki: Path) -> httpx.Client:
    return httpx.Client(base_url=server.url, verify=ssl.create_default_context(
        cafile=str(pki / "cert.pem")), timeout=TIMEOUT, trust_env=False)


def test_https_scores_with_the_certificate_as_ca(tls, pki, keyed):
    with https(tls, pki) as client:
        assert client.post("/v1/score", json=SCORE).status_code == 401
        response = client.post("/v1/score", json=SCORE, headers=bearer(KEYS[0]))
    assert response.status_code == 200, response.text
    want = keyed.post(json=SCORE, headers=bearer(KEYS[0])).json()
    assert response.json() == want
    curl = subprocess.run(  # the README's example
        ["curl", "-sS", "--noproxy", "*", "--max-time", str(TIMEOUT),
         "--cacert", str(pki / "cert.pem"), "-H", f"Authorization: Bearer {KEYS[1]}",
         "-H", "content-type: application/json", "-d", json.dumps(SCORE),
         f"https://localhost:{tls.url.rsplit(':', 1)[1]}/v1/score"],
        capture_output=True, text=True, timeout=WAIT, check=False)
    assert curl.returncode == 0, curl.stderr
    assert json.loads(curl.stdout) == want


def test_https_is_refused_by_a_client_that_does_not_trust_the_certificate(tls):
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(tls.url + "/healthz", timeout=TIMEOUT, trust_env=False)


def test_plain_http_to_the_https_port_gets_no_answer(tls):
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(tls.url.replace("https://", "http://") + "/healthz", timeout=TIMEOUT,
                  trust_env=False)


def test_the_log_says_https(tls):
    port = tls.url.rsplit(":", 1)[1]
    assert (f"keraslm: listening on https://127.0.0.1:{port}; API key required (2 keys; /, "
            f"/healthz, /readyz open); allowed hosts: localhost, 127.0.0.0/8, ::1; loading"
            ) in tls.log.read_text()


def test_tls_handshakes_are_bounded_by_header_timeout_and_counted_as_connections(
        tiny_bundle, pki, tmp_path):
    s = tls_server(tmp_path, tiny_bundle.bundle, pki, "--header-timeout", "1",
                   "--max-connections", "3")
    host, port = s.url.removeprefix("https://").split(":")
    try:
        silent = [socket.create_connection((host, int(port)), timeout=WAIT) for _ in range(3)]
        time.sleep(0.3)  # accepted: three handshakes under way, the cap reached
        with socket.create_connection((host, int(port)), timeout=WAIT) as fourth:
            assert fourth.recv(1) == b""  # refused at once, without a word of plain text
        started = time.monotonic()
        for sock in silent:  # never start their handshake: closed at --header-timeout
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
            sock.close()
        assert time.monotonic() - started < 1 + 2  # not the event loop's 60 s
        assert https_status(s, pki, "/healthz") == 200  # room again
        assert "keraslm_connections_refused_total 1.0" in httpx.get(
            s.url + "/metrics", verify=str(pki / "cert.pem"), trust_env=False).text
    finally:
        stop(s)


@pytest.mark.parametrize("cert, key, password, expected", [
    ("absent.pem", "key.pem", None, "file not found: --ssl-certfile {cert}"),
    ("cert.pem", "absent.pem", None, "file not found: --ssl-keyfile {key}"),
    (".", "key.pem", None, "--ssl-certfile {cert}: is not a regular file (a directory)"),
    ("garbage.pem", "key.pem", None, "--ssl-certfile {cert}: no PEM certificate in it"),
    ("key.pem", "key.pem", None, "--ssl-certfile {cert}: no PEM certificate in it"),
    ("cert.pem", "garbage.pem", None, "--ssl-keyfile {key}: not a PEM private key"),
    ("cert.pem", "cert.pem", None, "--ssl-keyfile {key}: not a PEM private key"),
    ("cert.pem", "other-key.pem", None,
     "--ssl-keyfile {key} is not the private key of the certificate in {cert}"),
    ("cert.pem", "encrypted-key.pem", None,
     "--ssl-keyfile {key}: the key is encrypted; give its password with --ssl-keyfile-password"),
    ("cert.pem", "encrypted-key.pem", "wrong",
     "--ssl-keyfile {key}: cannot decrypt it with --ssl-keyfile-password (wrong password?)"),
    ("cert.pem", "encrypted-key.pem", "secret", "{bundle}: no such bundle"),  # the next check
], ids=["no-cert", "no-key", "cert-is-dir", "garbage-cert", "key-as-cert", "garbage-key",
        "cert-as-key", "mismatched", "encrypted", "wrong-password", "right-password"])
def test_bad_tls_files_are_one_line_and_exit_1(capsys, pki, tmp_path, cert, key, password,
                                               expected):
    cert, key, bundle = pki / cert, pki / key, tmp_path / "no-bundle"
    argv = ["--model", str(bundle), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    assert server_module.main(argv + (["--ssl-keyfile-password", password] if password
                                      else [])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: " + expected.format(cert=cert, key=key, bundle=bundle)), err
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv, message", [
    (["--ssl-certfile", "c.pem"], "--ssl-certfile needs --ssl-keyfile too"),
    (["--ssl-keyfile", "k.pem"], "--ssl-keyfile needs --ssl-certfile too"),
    (["--ssl-keyfile-password", "x"],
     "--ssl-keyfile-password needs --ssl-keyfile and --ssl-certfile"),
])
def test_one_tls_flag_without_the_other_is_a_usage_error(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        server_module.main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith("error: " + message)
