"""The FastAPI app: the endpoints, and every error answered as JSON."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.web.access import ACCESS_RESPONSES, PROBE_PATHS
from serve.web.edge import CONTEXT_KEY, GENERATE_PATH, SCORE_PATH, Edge
from serve.web.generation import GenerateRequest, GenerateResponse, generate_text
from serve.web.metrics import CONTENT_TYPE
from serve.web.page import page_html
from serve.web.schemas import (
    ERROR_RESPONSES,
    ErrorResponse,
    ScoreRequest,
    ScoreResponse,
    ServiceError,
)
from serve.web.service import Service
from serve.web.settings import Settings

log = logging.getLogger("uvicorn.error")


def create_app(settings: Settings, on_fatal: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app over `settings.bundle`, loaded in the background once the app starts.

    `on_fatal` is called if the bundle cannot be loaded (the CLI uses it to stop the server).
    """
    service = Service(settings, on_fatal)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(title="keraslm scoring service", version="1",
                  summary="Log-likelihood and perplexity of texts under a keraslm LSTM bundle.",
                  lifespan=lifespan)
    app.state.service = service
    responses = {**ERROR_RESPONSES, **ACCESS_RESPONSES}

    @app.post(SCORE_PATH, response_model=ScoreResponse, responses=responses)
    async def score(body: ScoreRequest, request: Request) -> JSONResponse:
        """Score each text on its own: from a zero state with <eos> as context, like
        `Scorer.score` and `serve/score.py --per-line`. Log-likelihoods are natural logs."""
        return JSONResponse(await service.score(body, request.scope[CONTEXT_KEY]))

    @app.post(GENERATE_PATH, response_model=GenerateResponse, responses=responses)
    async def generate(body: GenerateRequest, request: Request) -> JSONResponse:
        """Sample one continuation of `prompt`, as `python serve/generate.py` does with the same
        options (and seed)."""
        return JSONResponse(await generate_text(service, body, request.scope[CONTEXT_KEY]))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        """The page: score a text and see every token coloured by its surprisal."""
        return HTMLResponse(page_html())

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is alive (the model may still be loading)."""
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz() -> dict:
        """200 once the model is loaded; 503 until then."""
        service.check_ready()
        return {"status": "ready", "bundle": service.bundle_name}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics, text exposition format."""
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    _add_error_handlers(app, service)
    if service.access.keys_required:
        _document_api_key(app, service.access.open_paths | PROBE_PATHS)
    app.add_middleware(Edge, service=service)
    return app


def _document_api_key(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Say in /openapi.json that every path but `open_paths` needs the bearer key (so /docs
    offers to send one)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
                "type": "http", "scheme": "bearer",
                "description": "a key of the server's --api-key-file"}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["security"] = [] if path in open_paths else [{"apiKey": []}]
        return app.openapi_schema

    app.openapi = openapi


def _add_error_handlers(app: FastAPI, service: Service) -> None:
    """ServiceError as itself; validation, HTTP and unexpected errors as JSON ServiceErrors."""

    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, err: ServiceError) -> JSONResponse:
        service.metrics.errors.labels(code=err.code).inc()
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return await on_service_error(request, _invalid_request(request, err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}
        message = str(err.detail)
        if err.status_code == 400:  # FastAPI could not decode the body (e.g. not UTF-8)
            message = ("the body could not be parsed as JSON (not UTF-8, or nested too "
                       "deeply)")
        response = await on_service_error(request, ServiceError(
            err.status_code, codes.get(err.status_code, "http_error"), message))
        response.headers.update(err.headers or {})
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        log.error("keraslm: unexpected error on %s", request.url.path, exc_info=err)
        return await on_service_error(request, ServiceError(
            500, "internal_error", f"the server failed ({type(err).__name__}); see its log"))


def _invalid_request(request: Request, problems: list[dict]) -> ServiceError:
    """415 for a body not sent as JSON, 400 for invalid JSON, 422 for wrong fields or types."""
    kind = request.headers.get("content-type", "").split(";")[0].strip()
    if kind != "application/json" and not kind.endswith("+json"):
        return ServiceError(415, "unsupported_media_type", f"the body must be JSON sent as "
                            f"Content-Type: application/json, not {kind or 'without a Content-Type'}")
    if any(p.get("type") == "json_invalid" for p in problems):
        where = problems[0].get("ctx", {}).get("error", "")
        return ServiceError(400, "invalid_json",
                            f"the body is not valid JSON ({where})".replace(" ()", ""))
    first = problems[0] if problems else {}
    where = _location(first.get("loc", ()))
    message = f"{where}: {first.get('msg', 'invalid')}" if where else first.get("msg", "")
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more)"
    return ServiceError(422, "invalid_request", message)


def _location(loc: tuple | list) -> str:
    """('body', 'texts', 2) -> 'texts[2]'."""
    text = ""
    for p in (p for p in loc if p != "body"):
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else str(p))
    return text
