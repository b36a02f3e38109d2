"""The HTTP scoring service (`python -m serve.server`): needs the `[serve]` extra.

One module per job: `settings` (what the flags set), `schemas` (the API's shapes and errors),
`access` (allowed hosts and API keys), `admission` (who gets in, and by when they must be
answered), `batcher` (texts of concurrent requests in one onnxruntime batch), `service`
(tokenize, queue, score), `generation` (POST /v1/generate), `edge` (the ASGI layer: access and
admission before any work, every body read against a deadline, request metrics), `protocol`
(connections: a cap, and a deadline and a size cap for request heads), `metrics` (Prometheus),
`page` (GET /), `app` (the FastAPI app) and `cli` (the command line). The scoring library in `serve/` never imports this
package.
"""
