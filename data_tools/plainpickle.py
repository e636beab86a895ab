"""Loading pickles that may hold only plain data (numpy arrays and builtin values).

A pickle can call any global it names, so an open ``pickle.load`` on a downloaded file would run
whatever the file says. ObMan ships its annotations as pickles; this reads them with every global
refused except numpy's array reconstruction and side-effect-free builtin types.
"""
from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import numpy as np

from occmllm.errors import OccError


def _allowed_globals() -> dict[tuple[str, str], object]:
    """The only globals a pickle may name: numpy array/scalar/dtype reconstruction and
    side-effect-free builtin data types."""
    try:  # numpy >= 2 keeps these in numpy._core; 1.x in numpy.core (pickles name either)
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], object] = {}
    for package in ("numpy.core", "numpy._core"):
        table[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    # np.matrix is a plain-data ndarray subclass; older numpy pickles name its defining module.
    table[("numpy", "matrix")] = table[("numpy.matrixlib.defmatrix", "matrix")] = np.matrix
    for name in ("set", "frozenset", "complex", "bytearray", "bytes", "str", "int", "float", "bool",
                 "list", "tuple", "dict"):
        table[("builtins", name)] = getattr(builtins, name)
    return table


_ALLOWED = _allowed_globals()


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """Protocol-2 pickles written by Python 3 store bytes as ``_codecs.encode(text, 'latin1')``;
    only that codec is admitted (a codec name is a lookup, so arbitrary ones are refused)."""
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"refuses codec {encoding!r}")
    return text.encode("latin1", errors)


class _PlainUnpickler(pickle.Unpickler):
    def __init__(self, fh, context: str, hint: str):
        # latin1: Python 2 pickles hold numpy buffers as 8-bit str; latin1 maps them to bytes 1:1.
        super().__init__(fh, encoding="latin1")
        self.context, self.hint = context, hint

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module  # Python 2 name
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise OccError(f"{self.context}: refuses to load pickle global {module}.{name}; {self.hint}") from None


def load_plain(path: str | Path, context: str, hint: str, remedy: str):
    """The object pickled in ``path``, refusing any global but numpy data and builtins. ``hint``
    ends the message for a refused global, ``remedy`` the one for a damaged file."""
    try:
        with open(path, "rb") as fh:
            return _PlainUnpickler(fh, context, hint).load()
    except OccError:
        raise
    except FileNotFoundError:
        raise OccError(f"{context}: file not found") from None
    except Exception as exc:  # a damaged pickle surfaces as many exception types
        raise OccError(f"{context}: not a readable pickle ({type(exc).__name__}: {exc}); {remedy}") from None
