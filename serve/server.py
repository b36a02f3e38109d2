"""HTTP scoring service: `python -m serve.server [--model BUNDLE] [--port 8080]` (FastAPI + uvicorn).

    POST /v1/score   {"texts": [...], "per_token": false} -> each text scored on its own, exactly
                     as `Scorer.score` and `serve/score.py --per-line` score it
    GET  /healthz    the process is alive          GET /readyz   the model is loaded (503 before)
    GET  /metrics    Prometheus text format        GET /docs, /openapi.json   the API

The server listens (on loopback unless told otherwise) before the model is loaded, so probes get
an answer at once; the bundle loads on the model thread, which then runs every onnxruntime batch
while the event loop keeps accepting, parsing and answering. A request is admitted or refused
(503 + Retry-After) on arrival, before any work; from then one deadline (`--timeout`) covers
reading its body, tokenizing, waiting and scoring. Every limit answers with a JSON error that
names it. API keys (`--api-key-file`), allowed hosts (`--allowed-hosts`) and TLS
(`--ssl-certfile/--ssl-keyfile`) make it fit to expose (README: "Deploying"). SIGTERM or Ctrl-C
stops accepting connections, lets the requests in flight finish, and exits 0. Needs the `[serve]` extra; never imports TensorFlow. The parts live in `serve/web/`.
"""

from __future__ import annotations

import sys

from serve.web.app import create_app
from serve.web.cli import build_parser, main
from serve.web.settings import Settings

__all__ = ["Settings", "build_parser", "create_app", "main"]

if __name__ == "__main__":
    sys.exit(main())
