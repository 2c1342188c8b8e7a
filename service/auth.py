"""Optional API keys for the endpoints that cost compute. Probes and metrics stay open."""

import hmac

from fastapi import HTTPException, Request


def require_api_key(request: Request) -> None:
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    presented_bytes = presented.strip().encode()
    # Compare against every key, each in constant time: timing reveals neither a key nor which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented_bytes, key.get_secret_value().encode())
    if scheme.lower() != "bearer" or not matched:
        raise HTTPException(
            401,
            "missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
