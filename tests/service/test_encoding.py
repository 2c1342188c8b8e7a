"""Response bodies: the .npy header written by hand is np.save's, byte for byte."""

import io

import numpy as np
import pytest

from service.encoding import npy_header


@pytest.mark.parametrize("shape", [(10000, 2), (0, 2), (1, 2), (41, 5000, 2), (2, 41, 5000, 2), (7,), (3, 1)])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_npy_header_is_what_np_save_writes(shape, dtype):
    array = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    saved = io.BytesIO()
    np.save(saved, array, allow_pickle=False)
    assert npy_header(array.dtype.str, array.shape) + array.tobytes() == saved.getvalue()
    assert np.array_equal(np.load(io.BytesIO(saved.getvalue())), array)
