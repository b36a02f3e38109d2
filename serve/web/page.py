"""GET /: the service's one page, `static/index.html` (inline CSS and script: no CDN, no build
step, works offline). It scores a text through POST /v1/score with `per_token` true, colours
every token by its surprisal, and continues the text through POST /v1/generate."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

PAGE_FILE = Path(__file__).with_name("static") / "index.html"


@lru_cache(maxsize=1)
def page_html() -> str:
    """The page, read once."""
    return PAGE_FILE.read_text(encoding="utf-8")
