"""The API's shapes (FastAPI turns them into the OpenAPI schema) and its error answers."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr
from starlette.responses import JSONResponse

RETRY_AFTER = 1  # seconds, when overloaded or loading


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="texts to score, each on its own, through the "
                                               "bundle's text pipeline")
    per_token: StrictBool = Field(False, description="also return every token's log-probability")


class TokenScore(BaseModel):
    token: str
    logprob: float | None = Field(description="natural log of the token's probability")
    oov: bool = Field(description="not in the vocabulary: scored as <unk>")


class TextResult(BaseModel):
    """A text's score: the fields of keraslm.scores.TextScore, as the CLI's --per-line has them."""

    num_tokens: int = Field(description="tokens scored (the pipeline's <eos> included)")
    num_oov: int = Field(description="of those, out of the vocabulary")
    log_likelihood: float | None = Field(description="natural log, summed over the tokens")
    perplexity: float | None = Field(description="exp(-log_likelihood / num_tokens); null for "
                                                 "none")
    tokens: int = Field(description="deprecated: num_tokens (removed in the next release)",
                        json_schema_extra={"deprecated": True})
    oov: int = Field(description="deprecated: num_oov (removed in the next release)",
                     json_schema_extra={"deprecated": True})
    per_token: list[TokenScore] | None = Field(None, description="only when per_token is true")


class ScoreResponse(BaseModel):
    bundle: str
    results: list[TextResult]


class ErrorDetail(BaseModel):
    code: str = Field(description="e.g. too_many_texts, overloaded, timeout, invalid_json")
    message: str
    limit: str | None = Field(None, description="the limit exceeded (its flag, with _ for -)")
    max: float | None = Field(None, description="that limit's value")


class ErrorResponse(BaseModel):
    error: ErrorDetail


ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in (
    (400, "invalid JSON"), (408, "the body did not arrive within the timeout"),
    (413, "over a limit: body, texts or tokens per text"),
    (415, "not sent as application/json"), (422, "wrong fields or types, or unscorable text"),
    (431, "the request line and headers are over max_header_bytes (then closed)"),
    (503, "loading, or overloaded (see Retry-After)"), (504, "not scored within the timeout"))}


class ServiceError(Exception):
    """An answer other than 200: status, code, one-line message, and the limit it concerns."""

    def __init__(self, status: int, code: str, message: str, *, limit: str | None = None,
                 max: float | None = None, retry_after: int | None = None,
                 close: bool = False, extra_headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit, self.max, self.retry_after, self.close = limit, max, retry_after, close
        self.extra_headers = dict(extra_headers or {})  # e.g. WWW-Authenticate

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            error.update(limit=self.limit, max=self.max)
        return {"error": error}

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else {}
        headers.update(self.extra_headers)
        if self.close:  # the rest of the request is not read: the connection cannot be reused
            headers["Connection"] = "close"
        return headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())

    def http_bytes(self) -> bytes:
        """The whole answer as raw HTTP/1.1, for a connection refused before any request."""
        body = json.dumps(self.body()).encode()
        head = [f"HTTP/1.1 {self.status} {HTTPStatus(self.status).phrase}", "Content-Type: application/json",
                f"Content-Length: {len(body)}", "Connection: close",
                *(f"{k}: {v}" for k, v in self.headers().items() if k != "Connection")]
        return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def timeout_error(timeout: float) -> ServiceError:
    return ServiceError(504, "timeout", f"not scored within {timeout:g} s (timeout)",
                        limit="timeout", max=timeout)
