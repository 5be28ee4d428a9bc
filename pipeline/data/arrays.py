"""NumPy arrays to Arrow without pyarrow's pandas probe.

`pa.array(ndarray)` asks whether the array is a pandas object, which imports pandas (0.2 s on a
2-core CPU; more on a cold file cache) in the middle of the first window, though we never use
pandas. A fixed-width NumPy array is already Arrow's layout: wrap its buffer (no copy).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

_NP = {pa.int64(): np.int64, pa.int32(): np.int32, pa.float32(): np.float32, pa.float64(): np.float64}


def _validity(mask: np.ndarray | None):
    """Arrow's validity bitmap (1 = valid, least significant bit first) of a null mask."""
    if mask is None or not mask.any():
        return None, 0
    return pa.py_buffer(np.packbits(~np.asarray(mask, bool), bitorder="little")), int(np.count_nonzero(mask))


def to_arrow(a, type_: pa.DataType = pa.int64(), mask: np.ndarray | None = None) -> pa.Array:
    """`a` as an Arrow array of `type_` (int32/64, float32/64, or bool); `mask` marks nulls."""
    a = np.asarray(a)
    validity, nulls = _validity(mask)
    if type_ == pa.bool_():
        data = pa.py_buffer(np.packbits(a.astype(bool, copy=False), bitorder="little"))
    else:
        data = pa.py_buffer(np.ascontiguousarray(a, dtype=_NP[type_]))
    return pa.Array.from_buffers(type_, len(a), [validity, data], null_count=nulls)


def to_numpy(col) -> np.ndarray:
    """A fixed-width numeric Arrow column (chunked or not) without nulls as NumPy, read from its
    data buffer: pyarrow's to_numpy goes through its pandas shim (the import above)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    dt = _NP.get(col.type)
    if dt is None or col.null_count:
        return col.to_numpy(zero_copy_only=False)
    return np.frombuffer(col.buffers()[1], dtype=dt, count=len(col), offset=col.offset * np.dtype(dt).itemsize)
