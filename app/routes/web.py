"""The web page: plain HTML/CSS/JS from ``app/static`` (no build step)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from ..strict_json import StrictJSONRoute

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(route_class=StrictJSONRoute, include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
