"""Tensor files without pickle: ``.npz`` and ``.safetensors``, read header first.

The safetensors format is small enough to read and write here, so captures need no extra package: an 8-byte
little-endian header length ``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the raw little-endian tensor bytes (offsets relative to the end of the header).
Supported dtypes: F64, F32, F16, BF16 (BF16 is widened to float32 on reading: numpy has no bfloat16).

Reading goes through :mod:`sparvar_compiler.arrays`: every header (npy members, the safetensors JSON) is checked
against :mod:`sparvar_compiler.limits` and against the bytes of the file before any tensor is allocated, so a
header claiming 7 TiB, float or overlapping offsets, or a shape whose product overflows int64 is one error.
:func:`read_tensor_headers` gives the shapes alone, for a reader that checks them before reading.

Every problem raises :class:`TensorFileError` naming the file; nothing here can execute code from a file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..arrays import ArrayHeader, npz_headers, read_npz_member, read_safetensors_tensor, safetensors_headers
from ..errors import SparvarError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
TENSOR_SUFFIXES = (".safetensors", ".npz")
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_ST_NAMES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


class TensorFileError(SparvarError):
    """A tensor file that cannot be read safely (format, pickle, malformed header)."""


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TensorFileError(
            f"{path}: {path.suffix} files are pickle-based and are refused (loading them can run arbitrary code); "
            "save q/k/v as .safetensors or .npz (sparvar_compiler.fidelity.hooks.CaptureWriter does)")


def read_tensor_headers(path: str | Path) -> dict[str, ArrayHeader]:
    """The checked header of every tensor of a ``.npz`` or ``.safetensors`` file; no tensor is read.

    ``ArrayHeader.dtype_name`` is numpy's name for ``.npz`` (``"float32"``) and the safetensors name
    (``"F32"``, ``"BF16"``) for ``.safetensors``.

    Raises
    ------
    TensorFileError
        For pickle-based files, unknown suffixes, or a header that is malformed, over a limit of
        :mod:`sparvar_compiler.limits`, or inconsistent with the file.
    """
    p = Path(path)
    _refuse_pickle(p)
    if p.suffix == ".npz":
        return npz_headers(p, TensorFileError)
    if p.suffix == ".safetensors":
        headers, _ = safetensors_headers(p, TensorFileError)
        return headers
    raise TensorFileError(f"{p}: unknown tensor file type {p.suffix!r}; expected one of {', '.join(TENSOR_SUFFIXES)}")


def read_tensors(path: str | Path, names: Iterable[str] | None = None,
                 headers: Mapping[str, ArrayHeader] | None = None) -> dict[str, np.ndarray]:
    """Tensors of a ``.npz`` or ``.safetensors`` file, as numpy arrays: every one, or those of ``names``
    (absent names are left out). ``headers`` (from :func:`read_tensor_headers`) saves reading them again.

    Raises
    ------
    TensorFileError
        For pickle-based files, object or other non-numeric arrays, unknown suffixes, a safetensors dtype other
        than F64, F32, F16 or BF16, or a malformed file (see :func:`read_tensor_headers`).
    """
    p = Path(path)
    headers = read_tensor_headers(p) if headers is None else headers
    wanted = list(headers) if names is None else [n for n in names if n in headers]
    out = {}
    for name in wanted:
        h = headers[name]
        if p.suffix == ".npz":
            out[name] = read_npz_member(p, h, TensorFileError)
        elif h.dtype_name not in ("F64", "F32", "F16", "BF16"):
            raise TensorFileError(f"{p}: tensor {name!r} has dtype {h.dtype_name}; supported: F64, F32, F16, BF16")
        elif h.dtype_name == "BF16":
            # bfloat16 is the top half of a float32: widen exactly.
            bits = read_safetensors_tensor(p, h, TensorFileError).astype(np.uint32) << 16
            out[name] = bits.view(np.float32)
        else:
            out[name] = read_safetensors_tensor(p, h, TensorFileError)
    return out


def write_tensors(path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` as ``.npz`` (uncompressed) or ``.safetensors`` by the path's suffix."""
    p = Path(path)
    _refuse_pickle(p)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if p.suffix == ".npz":
        with open(p, "wb") as f:
            np.savez(f, **arrays)
        return p
    if p.suffix != ".safetensors":
        raise TensorFileError(f"{p}: unknown tensor file type {p.suffix!r}; expected one of {', '.join(TENSOR_SUFFIXES)}")
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, a in arrays.items():
        if a.dtype not in _ST_NAMES:
            raise TensorFileError(f"{p}: tensor {name!r} has dtype {a.dtype}; write float16/32/64")
        header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes so tensors stay aligned
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return p
