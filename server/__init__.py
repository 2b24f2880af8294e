"""The SimVQ codec HTTP and WebSocket service (FastAPI on uvicorn); see docs/service.md.

`create_app` and `Settings` are imported lazily, so `simvq-codec` (which loads `server.cli` to register
`serve`) does not pay for FastAPI on every command.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from server.app import create_app

        return create_app
    if name == "Settings":
        from server.settings import Settings

        return Settings
    raise AttributeError(f"module 'server' has no attribute {name!r}")
