"""Optional API keys for the endpoints that cost compute, and for /model. Probes, /samplers and metrics stay open."""

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

# Declares the Bearer scheme in the OpenAPI schema (the docs' "Authorize" button; the fuzzer sends it); never
# rejects by itself: whether a key is needed is the settings' call, below.
_bearer = HTTPBearer(auto_error=False, description="one of SWISSROLL_API_KEYS, when set")


async def require_api_key(
    request: Request, _scheme: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)] = None
) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # Header values reach us decoded as latin-1 (the HTTP default): re-encoding gives the bytes the client sent, so
    # a key with non-ASCII characters, sent as UTF-8 (what curl and browsers do), matches its UTF-8 setting.
    presented_bytes = presented.strip().encode("latin-1", errors="replace")
    # Compare against every key, each in constant time: timing reveals neither a key nor which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented_bytes, key.get_secret_value().encode("utf-8"))
    if scheme.lower() != "bearer" or not matched:
        raise HTTPException(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
