"""Reading a user's ``.npz`` (validation inputs, calibration data): plain named arrays, or InvalidArgument."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np

from mlxd_daemon.errors import InvalidArgument


def read_npz(source: Path | bytes, what: str, reason: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (a path) or its bytes. Pickled objects are refused; garbage, a truncated
    archive or a lone ``.npy`` array is InvalidArgument ``reason`` naming ``what``."""
    try:
        loaded = np.load(io.BytesIO(source) if isinstance(source, bytes) else source, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        msg = f"{what} is not a readable .npz of plain arrays: {e}"
        raise InvalidArgument(msg, reason=reason) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        msg = f"{what} holds a single .npy array, not an .npz archive of named arrays (numpy.savez writes one)"
        raise InvalidArgument(msg, reason=reason)
    try:
        with loaded as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a member that is corrupt or pickled
        msg = f"{what} is not a readable .npz of plain arrays: {e}"
        raise InvalidArgument(msg, reason=reason) from None
