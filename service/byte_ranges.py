"""HTTP conditional and Range responses for in-memory bodies (RFC 9110 sections 13 and 14).

Safari refuses <video> sources that do not answer Range requests with 206; every browser uses them to seek.
"""

import re

from fastapi import Request, Response

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _wanted_range(header: str, length: int) -> tuple[int, int] | None | str:
    """(start, end inclusive), None to send the whole body, or "unsatisfiable"."""
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # unsupported syntax (e.g. multiple ranges): a full 200 is always allowed
    if m.group(1):
        start = int(m.group(1))
        end = min(int(m.group(2)), length - 1) if m.group(2) else length - 1
        if start >= length or end < start:
            return "unsatisfiable"
        return start, end
    suffix = int(m.group(2))  # "bytes=-N": the last N bytes
    if suffix == 0:
        return "unsatisfiable"
    return max(0, length - suffix), length - 1


def not_modified(request: Request, etag: str) -> bool:
    inm = request.headers.get("if-none-match")
    return bool(inm) and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")])


def ranged_response(request: Request, body: bytes, media_type: str, etag: str, headers: dict[str, str]) -> Response:
    headers = {**headers, "ETag": etag, "Accept-Ranges": "bytes"}
    if not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if range_header and (if_range is None or if_range.strip() == etag):
        wanted = _wanted_range(range_header, len(body))
        if wanted == "unsatisfiable":
            return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{len(body)}"})
        if wanted is not None:
            start, end = wanted
            return Response(
                body[start : end + 1],
                status_code=206,
                media_type=media_type,
                headers={**headers, "Content-Range": f"bytes {start}-{end}/{len(body)}"},
            )
    return Response(body, media_type=media_type, headers=headers)
