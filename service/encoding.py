"""Fast response bodies: orjson straight from numpy arrays, and .npy bytes."""

import io

import numpy as np
import orjson
from fastapi import Response

# 3 decimals of a unit-scale cloud is far below a pixel at any plotting size; it halves trajectory JSON.
TRAJECTORY_DECIMALS = 3


def json_response(payload: dict, status_code: int = 200, headers: dict | None = None) -> Response:
    # OPT_SERIALIZE_NUMPY writes float32 arrays directly (shortest round-trip repr), no Python floats per point.
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return Response(body, status_code=status_code, media_type="application/json", headers=headers)


def npy_response(array: np.ndarray, headers: dict | None = None, dtype: str = "float32") -> Response:
    """float32, or float16 (half the bytes; ~0.001 resolution at unit scale, as fine as the JSON's 3 decimals)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.dtype(dtype)), allow_pickle=False)
    return Response(buf.getvalue(), media_type="application/x-npy", headers=headers)


def compact(array: np.ndarray) -> np.ndarray:
    return np.round(array, TRAJECTORY_DECIMALS).astype(np.float32)
