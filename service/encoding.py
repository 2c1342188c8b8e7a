"""Fast response bodies: orjson straight from numpy arrays, and .npy bytes."""

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
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype))
    return Response(
        npy_header(data.dtype.str, data.shape) + data.tobytes(), media_type="application/x-npy", headers=headers
    )


def npy_header(descr: str, shape: tuple[int, ...]) -> bytes:
    """The .npy format 1.0 header of a C-order array, byte for byte what np.save writes (pinned by a test): np.save
    builds it through numpy's general writer, ~0.1 ms of the event loop right after a long job (cold caches), as
    much as the rest of a 2-evaluation /sample response."""
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {shape!r}, }}"
    # Magic (6) + version (2) + length (2) + text + newline, padded with spaces to a multiple of 64 bytes.
    padding = -(10 + len(text) + 1) % 64
    text = text + " " * padding + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin-1")


def compact(array: np.ndarray) -> np.ndarray:
    return np.round(array, TRAJECTORY_DECIMALS).astype(np.float32)
