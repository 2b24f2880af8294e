"""GET /: the listening page (record or upload, hear each bitrate), one static file with no outside resources."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from server.deps import SettingsDep

router = APIRouter()

PAGE = Path(__file__).resolve().parent.parent / "static" / "listen.html"


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@lru_cache(maxsize=1)
def page_and_policy() -> tuple[str, str]:
    """The page's HTML and a Content-Security-Policy that lets it run only its own inline script and style
    and talk only to this server: no CDN, nothing fetched from elsewhere, even if the file were edited to."""
    html = PAGE.read_text(encoding="utf-8")
    script = re.search(r"<script>(.*?)</script>", html, re.S)
    style = re.search(r"<style>(.*?)</style>", html, re.S)
    assert script and style, f"{PAGE} must hold one inline <script> and one <style>"
    policy = "; ".join(
        [
            "default-src 'none'",
            f"script-src {_sha256(script.group(1))}",
            f"style-src {_sha256(style.group(1))}",
            "connect-src 'self' blob:",  # the API, and reading back its own downloads
            "media-src 'self' blob:",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, policy


@router.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
async def listen_page(settings: SettingsDep) -> HTMLResponse:
    """The page; the service's duration limit is written into it so that a recording stops there."""
    html, policy = page_and_policy()
    html = html.replace("__MAX_DURATION_S__", f"{settings.max_duration_s:g}")
    return HTMLResponse(html, headers={"Content-Security-Policy": policy, "Cache-Control": "no-cache"})
