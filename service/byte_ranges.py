"""HTTP conditional and Range responses for in-memory bodies (RFC 9110 sections 13 and 14).

Safari refuses <video> sources that do not answer Range requests with 206; every browser uses them to seek.
Whatever these headers hold, the answer is a 200, 206, 304 or 416: never an error of ours.
"""

import re

import orjson
from fastapi import Request, Response

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Positions beyond any body: longer digit strings are not parsed (int() of thousands of digits is slow, and
# Python refuses beyond 4300 digits); they only ever mean "past the end".
_MAX_DIGITS = 18
_HUGE = 10**_MAX_DIGITS


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}..."


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= _MAX_DIGITS else _HUGE


def _wanted_range(header: str, length: int) -> tuple[int, int] | None | str:
    """(start, end inclusive), None to send the whole body, or "unsatisfiable"."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # unsupported syntax (e.g. multiple ranges): a full 200 is always allowed
    if m.group(1):
        start = _position(m.group(1))
        if m.group(2) and _position(m.group(2)) < start:
            return None  # last < first: an invalid range, and an invalid Range header is ignored (14.1.1)
        end = min(_position(m.group(2)), length - 1) if m.group(2) else length - 1
        if start >= length:
            return "unsatisfiable"
        return start, end
    suffix = _position(m.group(2))  # "bytes=-N": the last N bytes
    if suffix == 0:
        return "unsatisfiable"
    return max(0, length - suffix), length - 1


def _opaque(tag: str) -> str:
    """The entity tag without its weakness indicator: If-None-Match uses the weak comparison (13.1.2)."""
    tag = tag.strip()
    return tag[2:] if tag.startswith("W/") else tag


def not_modified(request: Request, etag: str | None) -> bool:
    """If-None-Match matches: '*' (any current representation: answerable before rendering it) or, weakly, etag."""
    inm = request.headers.get("if-none-match")
    if not inm:
        return False
    if inm.strip() == "*":
        return True
    return etag is not None and _opaque(etag) in [_opaque(t) for t in inm.split(",")]


def ranged_response(request: Request, body: bytes, media_type: str, etag: str, headers: dict[str, str]) -> Response:
    headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes"}
    if not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    # If-Range uses the strong comparison: a weak tag never matches, and the whole body is sent.
    if range_header and (if_range is None or if_range.strip() == etag):
        wanted = _wanted_range(range_header, len(body))
        if wanted == "unsatisfiable":
            # The body every error has (service/responses.py Error), so a client parses one shape.
            detail = f"range not satisfiable: {clip(range_header, 100)!r}; the video has {len(body)} bytes"
            return Response(
                orjson.dumps({"detail": detail}),
                status_code=416,
                media_type="application/json",
                headers={**headers, "Content-Range": f"bytes */{len(body)}"},
            )
        if wanted is not None:
            start, end = wanted
            return Response(
                body[start : end + 1],
                status_code=206,
                media_type=media_type,
                headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(body)}"},
            )
    return Response(body, media_type=media_type, headers=headers)
