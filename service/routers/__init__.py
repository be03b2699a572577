"""The endpoints, one ``APIRouter`` per concern; ``app.create_app`` includes them.

``encode`` (POST /encode), ``decode`` (POST /decode), ``codebook`` (GET /codebook), ``info`` (GET /info),
``layouts`` (GET /layouts, POST /layouts/{name}/allowed)
and ``health`` (GET /health, /ready, /metrics). Handlers read parse -> check -> submit -> shape: the
body through ``parsing``, the limits through ``limits`` and ``imaging``, the model work through the
batcher, the answer through ``responses``. The API key is checked before them, by the middleware.
"""

OPENAPI_TAGS = [
    {"name": "encode", "description": "images to token grids"},
    {"name": "decode", "description": "token grids (or an LLM's flat tokens) to images"},
    {"name": "codebook", "description": "the codebook: size, usage, vectors"},
    {"name": "info", "description": "model identity, config, device and limits"},
    {"name": "layouts", "description": "token layouts (how LLMs lay image tokens out) and constrained generation"},
    {"name": "health", "description": "liveness and readiness (no API key, no model needed for liveness)"},
]
