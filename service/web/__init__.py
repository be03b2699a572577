"""The token explorer page at ``/`` and the offline API docs (``/docs``, ``/redoc``).

Everything the page loads is served from this package (``static/``: the page, its script, style, icon
and sample photos) or, for the docs, from the ``fastapi-offline`` package that vendors Swagger UI and
ReDoc: no request ever leaves the server. The page talks to the service only through its public HTTP
API (``/info``, ``/codebook``, ``/layouts``, ``/encode``, ``/decode``), so it doubles as a worked example.
"""

from vqtok.service.web.router import ASSETS_PREFIX, install

__all__ = ["ASSETS_PREFIX", "install"]
