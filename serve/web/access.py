"""Who may use the service: the Host-header check and API keys, before any other work.

`Access.check(scope)` is asked by the edge (serve/web/edge.py) for every HTTP request, before
admission and before the body is read; it returns the ServiceError to answer or None to let the
request through:

- the health probes (/healthz, /readyz) are always let through: orchestrators probe by pod IP;
- a Host header that is not allowed gets 421 (misdirected: a page reaching a loopback service by
  DNS rebinding sends its own host name), a missing or repeated one 400 (RFC 9112, 3.2);
- with API keys, every other path but the page (/), and /metrics and the docs when opened, needs
  `Authorization: Bearer KEY`: 401 with `WWW-Authenticate` otherwise.

A refused request's body is never read, so a refusal of one that announced a body closes the
connection.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from collections.abc import Mapping

from keraslm.errors import UserError
from keraslm.files import read_bounded
from serve.web.schemas import ErrorResponse, ServiceError
from serve.web.settings import Settings

PROBE_PATHS = frozenset({"/healthz", "/readyz"})
PAGE_PATHS = frozenset({"/"})
METRICS_PATHS = frozenset({"/metrics"})
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
ANY_HOST = ("*",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.0/8", "::1")
API_KEY_FILE_VARIABLE = "KERASLM_API_KEY_FILE"
MAX_KEY_FILE_BYTES = 1 << 20
REALM = 'Bearer realm="keraslm"'
ACCESS_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (401, "no API key, or a wrong one (see WWW-Authenticate)"),
    (421, "a Host the service does not answer for (--allowed-hosts)"))}
_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*")


class Access:
    """The access rules of one app, from its Settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.hosts = HostMatcher(settings.allowed_hosts)
        self._digests = tuple(_digest(key.encode("ascii")) for key in settings.api_keys)
        self.open_paths = PAGE_PATHS | (METRICS_PATHS if settings.open_metrics else set()) | (
            DOCS_PATHS if settings.open_docs else set())

    @property
    def keys_required(self) -> bool:
        return bool(self._digests)

    def check(self, scope: dict) -> ServiceError | None:
        """The refusal for this request, or None if it may go on."""
        if scope["path"] in PROBE_PATHS:
            return None
        headers = scope["headers"]
        close = announces_body(headers)
        refusal = self._check_host(headers, close)
        if refusal is None and self.keys_required and scope["path"] not in self.open_paths:
            refusal = self._check_key(headers, close)
        return refusal

    def describe(self) -> str:
        """The rules in a few words, for the startup log."""
        keys = "no API key required"
        if self.keys_required:
            count = len(self._digests)
            keys = (f"API key required ({count} key{'s' if count > 1 else ''}; "
                    f"{', '.join(sorted(self.open_paths | PROBE_PATHS))} open)")
        hosts = "any" if self.hosts.any else ", ".join(self.hosts.patterns)
        return f"{keys}; allowed hosts: {hosts}"

    def _check_host(self, headers: list, close: bool) -> ServiceError | None:
        if self.hosts.any:
            return None
        values = [v for k, v in headers if k == b"host"]
        if len(values) != 1:
            count = f"{len(values)} Host headers" if values else "no Host header"
            return ServiceError(400, "bad_host", f"the request has {count}; it needs one "
                                f"(allowed_hosts)", close=close)
        header = values[0].decode("latin-1")
        if not self.hosts.allows(header):
            host = request_host(header)
            named = "a malformed Host" if host is None else f"the host {host[:100]}"
            return ServiceError(421, "host_not_allowed", f"this service does not answer for "
                                f"{named} (allowed_hosts)", close=close)
        return None

    def _check_key(self, headers: list, close: bool) -> ServiceError | None:
        values = [v for k, v in headers if k == b"authorization"]
        if not values:
            return _unauthorized("missing_api_key", "this service needs an API key: send "
                                 "Authorization: Bearer KEY", close)
        if len(values) > 1:
            return _unauthorized("missing_api_key", "the request has more than one "
                                 "Authorization header", close)
        scheme, _, key = values[0].strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return _unauthorized("missing_api_key", "the Authorization header must be "
                                 "Bearer KEY (an API key)", close)
        key = key.strip()
        if not key:
            return _unauthorized("missing_api_key", "the Authorization header has no key after "
                                 "Bearer", close)
        if not self._known(key):
            return _unauthorized("invalid_api_key", "the API key is not valid", close,
                                 error="invalid_token")
        return None

    def _known(self, key: bytes) -> bool:
        """Whether `key` is one of the keys, in a time that says nothing about which or how
        close: fixed-length digests, each compared in constant time, every one of them."""
        digest, found = _digest(key), False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found


class HostMatcher:
    """Host-header patterns: `*` (any), `.example.com` (it and its subdomains), an address
    network (`127.0.0.0/8`), or a host name or address; case, port and brackets do not matter."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self.patterns = patterns
        self.any = "*" in patterns
        self._names = {p for p in patterns if not p.startswith(".") and "/" not in p}
        self._suffixes = tuple(p for p in patterns if p.startswith("."))
        self._networks = tuple(ipaddress.ip_network(p) for p in patterns if "/" in p)

    def allows(self, header: str) -> bool:
        """Whether a request with this Host header value may be answered."""
        if self.any:
            return True
        host = request_host(header)
        if host is None:
            return False
        if host in self._names:
            return True
        address = _address(host)
        if address is not None:
            return any(address in network for network in self._networks)
        return any(host == s[1:] or host.endswith(s) for s in self._suffixes)


def parse_allowed_hosts(text: str) -> tuple[str, ...]:
    """The patterns of `--allowed-hosts` (comma-separated), normalized; ValueError naming a bad
    one."""
    patterns = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        pattern = _pattern(item)
        if pattern is None:
            raise ValueError(f"{item!r} is not a host name, an address, a network, "
                             f".domain or *")
        patterns.append(pattern)
    if not patterns:
        raise ValueError("no host given (* allows any)")
    return tuple(dict.fromkeys(patterns))


def _pattern(item: str) -> str | None:
    if item == "*":
        return item
    if "/" in item:
        try:
            return str(ipaddress.ip_network(item, strict=False))
        except ValueError:
            return None
    if item.startswith("."):
        name = item.rstrip(".")
        return name if _HOST_NAME.fullmatch(name[1:]) else None
    return request_host(item)


def request_host(header: str) -> str | None:
    """The host of a Host header value (`name[:port]`, `address[:port]`, `[v6][:port]`): lower
    case, no port, no brackets, no trailing dot, addresses in their canonical form; None if it
    is none of those."""
    value = header.strip().lower()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or rest and not re.fullmatch(r":[0-9]*", rest):
            return None
        address = _address(host)
        return str(address) if address is not None and address.version == 6 else None
    if value.count(":") > 1:  # an IPv6 address without brackets (not valid, but unambiguous)
        address = _address(value)
        return str(address) if address is not None else None
    host, _, port = value.partition(":")
    if not port.isdigit() and port:
        return None
    host = host.removesuffix(".")  # a fully qualified name is the same host
    address = _address(host)
    if address is not None:
        return str(address)
    return host if _HOST_NAME.fullmatch(host) else None


def read_api_keys(path: str | os.PathLike, name: str | None = None) -> tuple[str, ...]:
    """The API keys in `path`: one a line, blank lines and lines starting with `#` ignored.

    A one-line UserError naming the file (as `name`, when given) and the line when the file is
    missing, not a regular file, unreadable or holds no key, or when a key has a space or a
    character that is not visible ASCII inside. No message shows a key."""
    name = str(path) if name is None else name
    data = read_bounded(path, MAX_KEY_FILE_BYTES, name)
    keys = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise UserError(f"{name}, line {number}: not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        problem = _key_problem(line)
        if problem:
            raise UserError(f"{name}, line {number}: {problem}")
        keys.append(line)
    if not keys:
        raise UserError(f"{name} holds no key (one a line; blank lines and lines starting "
                        f"with # are ignored)")
    return tuple(dict.fromkeys(keys))


def _key_problem(key: str) -> str | None:
    for c in key:
        if c.isspace():
            return ("the key has a space inside (a key is one word; comments go on lines of "
                    "their own, starting with #)")
        if not "!" <= c <= "~":
            return f"the key has a character that is not visible ASCII (U+{ord(c):04X})"
    return None


def api_key_file(flag: str | None, environ: Mapping[str, str] = os.environ
                 ) -> tuple[str, str] | None:
    """The API key file to read and how to name it in errors: `--api-key-file`, else the file
    that KERASLM_API_KEY_FILE names; None for neither."""
    if flag:
        return flag, f"--api-key-file {flag}"
    named = environ.get(API_KEY_FILE_VARIABLE, "")
    return (named, f"{API_KEY_FILE_VARIABLE}={named}") if named else None


def is_loopback(address: str) -> bool:
    """Whether the listening address is this machine only."""
    parsed = _address(address.split("%")[0])
    return parsed is not None and parsed.is_loopback


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def announces_body(headers: list) -> bool:
    """Whether a request's headers (ASGI's [(name, value)]) announce a body."""
    for k, v in headers:
        if k == b"transfer-encoding" or (k == b"content-length" and v.strip() not in (b"0", b"")):
            return True
    return False


def _unauthorized(code: str, message: str, close: bool, error: str | None = None) -> ServiceError:
    challenge = REALM + (f', error="{error}"' if error else "")
    return ServiceError(401, code, message, close=close,
                        extra_headers={"WWW-Authenticate": challenge})
