"""Routes of the page and the offline docs; ``install(app)`` adds them to the service app.

- ``GET /``: the token explorer (``static/index.html``).
- ``/web/...``: the page's assets; ``/web/vendor/...``: Swagger UI and ReDoc from ``fastapi-offline``.
- ``GET /docs``, ``/docs/oauth2-redirect``, ``/redoc``: FastAPI's pages, pointed at the local assets.

All of them are public (``middleware.PUBLIC_PATHS`` and ``PUBLIC_PREFIXES``): a browser cannot send a
bearer key when it opens a page; the page asks for the key and sends it on its own API calls.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent / "static"
ASSETS_PREFIX = "/web"
VENDOR_PREFIX = f"{ASSETS_PREFIX}/vendor"
DOCS_URL, REDOC_URL, OAUTH2_REDIRECT_URL = "/docs", "/redoc", "/docs/oauth2-redirect"

# Swagger UI's online validator badge would call validator.swagger.io: off.
SWAGGER_UI_PARAMETERS = {"validatorUrl": None, "tryItOutEnabled": True}


def vendor_directory() -> Path:
    """The folder of Swagger UI's and ReDoc's files inside the installed ``fastapi-offline`` package."""
    return Path(str(files("fastapi_offline") / "static"))


# ReDoc's bundle draws Redocly's logo from their CDN in its sidebar (no option turns it off): the copy we serve
# draws an empty local image instead, so /redoc makes no request to any other host.
REDOC_JS = "redoc.standalone.js"
REDOC_REMOTE_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
LOCAL_EMPTY_IMAGE = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' width='1' height='1'/%3E"


@functools.cache
def redoc_script() -> bytes:
    """ReDoc's standalone bundle from ``fastapi-offline``, with its one remote image made local."""
    return (vendor_directory() / REDOC_JS).read_bytes().replace(REDOC_REMOTE_LOGO, LOCAL_EMPTY_IMAGE)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


def build_router(title: str, openapi_url: str) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"], response_class=FileResponse)
    async def explorer() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"cache-control": "no-cache"})

    @router.get(DOCS_URL, response_class=HTMLResponse)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_swagger_ui_html(
            openapi_url=root + openapi_url,
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{VENDOR_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{VENDOR_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_PREFIX}/favicon.svg",
            oauth2_redirect_url=root + OAUTH2_REDIRECT_URL,
            swagger_ui_parameters=SWAGGER_UI_PARAMETERS,
        )

    @router.get(OAUTH2_REDIRECT_URL, response_class=HTMLResponse)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get(f"{VENDOR_PREFIX}/{REDOC_JS}")
    async def redoc_js() -> Response:
        return Response(redoc_script(), media_type="text/javascript; charset=utf-8",
                        headers={"cache-control": "public, max-age=3600"})

    @router.get(REDOC_URL, response_class=HTMLResponse)
    async def redoc(request: Request) -> HTMLResponse:
        root = _root(request)
        return get_redoc_html(
            openapi_url=root + openapi_url,
            title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{VENDOR_PREFIX}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_PREFIX}/favicon.svg",
            with_google_fonts=False,
        )

    return router


def install(app: FastAPI) -> None:
    """Add the page, its assets and the offline docs to ``app`` (built with ``docs_url=None, redoc_url=None``)."""
    assert app.docs_url is None and app.redoc_url is None, "the offline docs replace FastAPI's CDN ones"
    app.include_router(build_router(app.title, app.openapi_url or "/openapi.json"))
    # the longer prefix first: a mount matches every path under it
    app.mount(VENDOR_PREFIX, StaticFiles(directory=vendor_directory()), name="web-vendor")
    app.mount(ASSETS_PREFIX, StaticFiles(directory=STATIC), name="web")
