"""The OpenAPI declarations the routes share: responses (JSON models, binary media, errors) and their headers.

A route states its responses as a sum of these, e.g.
    responses={**ok(SampleResult, X_SEED, X_MODEL, binary=NPY), **errors(401, 422, 503, 504)}
so a new route or status is one line, and every error is declared with the one body every error has (Error).
"""

from typing import Any

from pydantic import BaseModel

from service.responses import Error

NPY = "application/x-npy"
MP4 = "video/mp4"
PROMETHEUS_TEXT = "text/plain"


def header(description: str, required: bool = False, **schema: Any) -> dict:
    return {"description": description, "required": required, "schema": {"type": "string", **schema}}


def headers(*names: str) -> dict:
    return {name: HEADERS[name] for name in names}


HEADERS = {
    "X-Seed": header(
        "the seed used (drawn when the request gave none): repeat the request with it", pattern="^[0-9]+$"
    ),
    "X-Model": header("the checkpoint id: sha256 of the model file", pattern="^[0-9a-f]{64}$"),
    "X-Model-Name": header("the model's name (its file stem in the models directory; see /models)"),
    "X-Elapsed-Ms": header("compute time, milliseconds"),
    "X-Sampler": header("format=npy: the sampler used"),
    "X-Spacing": header("format=npy: the spacing used (trailing or tuned)"),
    "X-Timesteps": header("format=npy: the level of each step, comma-separated", examples=["39,29,19,9"]),
    "X-Levels": header("format=npy: the noising levels, ascending, comma-separated", examples=["9,19,29,39"]),
    "X-Cache": header("hit or miss: whether the video came from the render cache", enum=["hit", "miss"]),
    "ETag": header("strong entity tag of this video (deterministic given all parameters and the model)"),
    "Accept-Ranges": header("bytes", enum=["bytes"]),
    "Content-Range": header("bytes first-last/length (206), or bytes */length (416)"),
    "Cache-Control": header("immutable with a seed; no-store when the seed was drawn"),
    "Content-Location": header("the reproducible URL (with the drawn seed) when the request gave no seed"),
    "Retry-After": header("seconds to wait before retrying", required=True, pattern="^[0-9]+$"),
    "WWW-Authenticate": header("Bearer", required=True),
}

# The groups the docs page and generated clients (api/<tag>/...) sort operations into.
TAGS = [
    {"name": "sampling", "description": "Draw points from the model: the final points, every step, or a video"},
    {"name": "explain", "description": "The teaching views: the forward (noising) process and the learned field"},
    {"name": "model", "description": "The loaded checkpoint and the samplers it supports"},
    {"name": "ops", "description": "Probes and metrics for orchestrators and monitoring"},
]

_ERRORS = {
    401: ("missing or invalid API key (only when SWISSROLL_API_KEYS is set)", ("WWW-Authenticate",)),
    404: ("no such resource", ()),
    416: ("range not satisfiable: Content-Range gives the length", ("Content-Range",)),
    422: ("invalid request: one issue per parameter, naming it and the values allowed", ()),
    431: ("more header fields than SWISSROLL_MAX_HEADERS, or a head over SWISSROLL_MAX_HEADER_BYTES", ()),
    503: ("overloaded, shutting down, or too many connections: retry after Retry-After seconds", ("Retry-After",)),
    504: ("not finished within the request deadline (SWISSROLL_REQUEST_TIMEOUT_S)", ()),
}

# Every route can answer these: ?a=1&a=2 is a 422 anywhere, and the header-count limit runs before any route.
ANY_ROUTE = (422, 431)
# Routes that need the key (when keys are set) and queue for compute.
COMPUTE = (401, *ANY_ROUTE, 503, 504)


def errors(*statuses: int) -> dict:
    """The declared error responses: all share the Error body (`{"detail": ...}`)."""
    out = {}
    for status in statuses:
        description, names = _ERRORS[status]
        out[status] = {"model": Error, "description": description}
        if names:
            out[status]["headers"] = headers(*names)
    return out


def binary(media_type: str, description: str) -> dict:
    return {media_type: {"schema": {"type": "string", "format": "binary", "description": description}}}


def ok(model: type[BaseModel] | None, *header_names: str, description: str = "OK", media: dict | None = None) -> dict:
    """The 200 response: `model` as application/json (None: no JSON body), `media` its other media types."""
    response: dict[str, Any] = {"description": description}
    if model is not None:
        response["model"] = model
    if media:
        response["content"] = media
    if header_names:
        response["headers"] = headers(*header_names)
    return {200: response}


def operation_id(route) -> str:
    """The route's name (its function's, or `name=`): `sample`, not FastAPI's `sample_sample_get`. Generated clients
    turn operation ids into function names, so these are part of the contract: renaming one breaks them."""
    return route.name
