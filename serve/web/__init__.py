"""The HTTP scoring service (`python -m serve.server`): needs the `[serve]` extra.

One module per job: `settings` (what the flags set), `schemas` (the API's shapes and errors),
`admission` (who gets in, and by when they must be answered), `batcher` (texts of concurrent
requests in one onnxruntime batch), `service` (tokenize, queue, score), `edge` (the ASGI layer:
admission before any work, the body read against the deadline, request metrics), `protocol`
(connections: a cap and a deadline for request headers), `metrics` (Prometheus), `app` (the
FastAPI app) and `cli` (the command line). The scoring library in `serve/` never imports this
package.
"""
