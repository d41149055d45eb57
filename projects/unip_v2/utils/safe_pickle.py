"""Reading `.pkl` weight files without running the code a pickle can carry.

`pickle.load` calls whatever callable the file names, so a weights file from the internet
can run arbitrary code (detectron2's checkpointer loads `.pkl` files with it). Real
detectron2 / Detectron1 / Caffe2 / torchvision `.pkl` checkpoints only hold containers,
strings, numbers, NumPy arrays and, at times, torch tensors; this unpickler accepts those
and refuses every other global with a message, before anything is called.

torch's own `weights_only` loader cannot serve here: it reads torch's zip format, not a
plain pickle stream.
"""
import io
import pickle
from typing import Any, BinaryIO, Union

import numpy as np
import torch

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "load_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that is not on the allow-list."""


def _storage_from_bytes(data: bytes):
    """A tensor storage pickled by `pickle.dumps(tensor)` (torch writes it as the bytes of a
    `torch.save` of the storage): read those bytes with torch's own weights-only loader."""
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def _allowed_globals():
    numpy_core = getattr(np, "_core", None) or np.core  # NumPy 2 renamed np.core to np._core
    allowed = {
        ("collections", "OrderedDict"): __import__("collections").OrderedDict,
        # NumPy arrays, dtypes and scalars (the pickle names both spellings of the module,
        # depending on the NumPy version that wrote it)
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("torch", "Size"): torch.Size,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        # protocol 2 writes bytes as _codecs.encode(str, "latin1"): a pure conversion
        ("_codecs", "encode"): __import__("_codecs").encode,
    }
    for name in ("set", "frozenset", "complex", "bytearray", "slice"):  # plain constructors
        allowed[("builtins", name)] = getattr(__import__("builtins"), name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = numpy_core.multiarray._reconstruct
        allowed[(module, "scalar")] = numpy_core.multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5 arrays
        allowed[(module, "_frombuffer")] = numpy_core.numeric._frombuffer
    for name in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                 "uint8", "bool_"):
        allowed[("numpy", name)] = getattr(np, name)
    # dtype objects pickle as numpy.dtype plus a class for some types (NumPy 2)
    for name in ("Float32DType", "Float64DType", "Float16DType", "Int64DType", "Int32DType",
                 "Int16DType", "Int8DType", "UInt8DType", "BoolDType", "ObjectDType"):
        dtypes = getattr(np, "dtypes", None)
        if dtypes is not None and hasattr(dtypes, name):
            allowed[("numpy.dtypes", name)] = getattr(dtypes, name)
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler whose find_class returns only allow-listed objects (containers,
    NumPy arrays and scalars, torch tensors); any other global raises UnsafePickleError."""

    _ALLOWED = None

    def __init__(self, file: BinaryIO, *, source: str = "<pickle>", **kwargs):
        super().__init__(file, **kwargs)
        self.source = source
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._ALLOWED.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to load the global {module}.{name}: a .pkl weights "
                f"file may only hold containers, strings, numbers, NumPy arrays and torch "
                f"tensors (unpickling anything else can run code). If you trust the file, "
                f"convert it to a state dict of tensors and save it with torch.save.")
        return found


def load_pickle(file: Union[str, BinaryIO], encoding: str = "latin1") -> Any:
    """Unpickle a weights file (a path or a binary file object) with RestrictedUnpickler.

    encoding: latin1 by default, as Caffe2 / Detectron1 pickles were written by Python 2.
    Raises UnsafePickleError for a disallowed global, pickle.UnpicklingError / EOFError for a
    damaged file.
    """
    if isinstance(file, str):
        with open(file, "rb") as f:
            return RestrictedUnpickler(f, source=file, encoding=encoding).load()
    return RestrictedUnpickler(file, source=getattr(file, "name", "<pickle>"),
                               encoding=encoding).load()
