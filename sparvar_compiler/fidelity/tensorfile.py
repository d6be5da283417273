"""Tensor files without pickle: ``.npz`` and ``.safetensors``, read header first.

The safetensors format is small enough to read and write here, so captures need no extra package: an 8-byte
little-endian header length ``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the raw little-endian tensor bytes (offsets relative to the end of the header).
Supported dtypes: F64, F32, F16, BF16. numpy has no bfloat16, so BF16 travels as its raw 16-bit words
(:class:`BF16Words`, as safetensors stores them): :func:`write_tensors` writes them as BF16, :func:`read_tensors`
widens them to float32 (exactly: a bfloat16 is the top half of a float32), :func:`read_tensors_torch` returns
``torch.bfloat16`` tensors. ``.npz`` cannot hold BF16.

Writing uses the ``safetensors`` package when it is installed (``safetensors.torch.save_file``) and the writer here
otherwise; both produce the same format, and the reader here reads either.

Reading goes through :mod:`sparvar_compiler.arrays`: every header (npy members, the safetensors JSON) is checked
against :mod:`sparvar_compiler.limits` and against the bytes of the file before any tensor is allocated, so a
header claiming 7 TiB, float or overlapping offsets, or a shape whose product overflows int64 is one error.
:func:`read_tensor_headers` gives the shapes alone, for a reader that checks them before reading.

Every problem raises :class:`TensorFileError` naming the file; nothing here can execute code from a file.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Union

import numpy as np

from ..arrays import ArrayHeader, npz_headers, read_npz_member, read_safetensors_tensor, safetensors_headers
from ..errors import SparvarError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
TENSOR_SUFFIXES = (".safetensors", ".npz")
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_ST_NAMES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}


class TensorFileError(SparvarError):
    """A tensor file that cannot be read safely (format, pickle, malformed header)."""


@dataclass(frozen=True)
class BF16Words:
    """A bfloat16 array carried as numpy's ``<u2`` words (numpy has no bfloat16): each word is the top 16 bits of
    the float32 it rounds, exactly what a safetensors file holds for dtype ``"BF16"``."""

    words: np.ndarray

    def __post_init__(self) -> None:
        if self.words.dtype != np.dtype("<u2"):
            raise TensorFileError(f"BF16Words holds <u2 words, got {self.words.dtype}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.words.shape)

    @property
    def nbytes(self) -> int:
        return int(self.words.nbytes)

    def to_float32(self) -> np.ndarray:
        """The exact float32 values."""
        return (self.words.astype(np.uint32) << 16).view(np.float32)

    @classmethod
    def from_torch(cls, t: Any) -> "BF16Words":
        """The words of a ``torch.bfloat16`` tensor (any device)."""
        import torch

        if t.dtype != torch.bfloat16:
            raise TensorFileError(f"BF16Words.from_torch takes a bfloat16 tensor, got {t.dtype}")
        return cls(t.detach().contiguous().cpu().view(torch.int16).numpy().view("<u2"))

    def to_torch(self) -> Any:
        """A ``torch.bfloat16`` tensor of these words (shares their memory)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.words).view(np.int16)).view(torch.bfloat16)


Tensor = Union[np.ndarray, BF16Words]


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
            out[name] = BF16Words(read_safetensors_tensor(p, h, TensorFileError)).to_float32()  # exact
        else:
            out[name] = read_safetensors_tensor(p, h, TensorFileError)
    return out


def read_tensors_torch(path: str | Path, names: Iterable[str] | None = None,
                       headers: Mapping[str, ArrayHeader] | None = None) -> dict[str, Any]:
    """Like :func:`read_tensors`, as CPU torch tensors in the stored dtype: ``BF16`` stays ``torch.bfloat16``."""
    import torch

    p = Path(path)
    headers = read_tensor_headers(p) if headers is None else headers
    wanted = list(headers) if names is None else [n for n in names if n in headers]
    out = {}
    for name in wanted:
        h = headers[name]
        if p.suffix == ".safetensors" and h.dtype_name == "BF16":
            out[name] = BF16Words(read_safetensors_tensor(p, h, TensorFileError)).to_torch()
        else:
            a = read_tensors(p, (name,), {name: h})[name]
            out[name] = torch.from_numpy(a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("=")))
    return out


def safetensors_package() -> Any:
    """``safetensors.torch`` when the ``safetensors`` package is installed, else None."""
    try:
        import safetensors.torch as st
    except ImportError:
        return None
    return st


def write_tensors(path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None,
                  use_package: bool | None = None) -> Path:
    """Write ``tensors`` as ``.npz`` (uncompressed) or ``.safetensors`` by the path's suffix; the file appears
    whole or not at all (written beside it, then renamed).

    Values are numpy float16/32/64 arrays, or :class:`BF16Words` (``.safetensors`` only). ``use_package``: write
    with the ``safetensors`` package (default: when it is installed) or with the writer here (False).
    """
    p = Path(path)
    _refuse_pickle(p)
    if p.suffix not in TENSOR_SUFFIXES:
        raise TensorFileError(f"{p}: unknown tensor file type {p.suffix!r}; expected one of "
                              f"{', '.join(TENSOR_SUFFIXES)}")
    arrays: dict[str, Tensor] = {}
    for name, a in tensors.items():
        if isinstance(a, BF16Words):
            if p.suffix == ".npz":
                raise TensorFileError(f"{p}: tensor {name!r} is bfloat16, which .npz cannot hold; write .safetensors "
                                      "or widen it to float32")
            arrays[name] = BF16Words(np.ascontiguousarray(a.words))
            continue
        a = np.ascontiguousarray(a)
        if a.dtype not in _ST_NAMES:
            raise TensorFileError(f"{p}: tensor {name!r} has dtype {a.dtype}; write float16/32/64 or bfloat16")
        arrays[name] = a
    tmp = p.with_name(p.name + ".tmp")
    try:
        if p.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)  # type: ignore[arg-type]
        else:
            st = safetensors_package() if use_package in (None, True) else None
            if use_package and st is None:
                raise TensorFileError("use_package=True, but the safetensors package is not installed")
            if st is not None:
                _write_with_package(st, tmp, arrays, metadata)
            else:
                _write_safetensors(tmp, arrays, metadata)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def _write_with_package(st: Any, path: Path, arrays: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> None:
    import torch

    tensors = {name: a.to_torch() if isinstance(a, BF16Words) else torch.from_numpy(a)
               for name, a in arrays.items()}
    st.save_file(tensors, str(path), metadata={str(k): str(v) for k, v in (metadata or {}).items()} or None)


def _write_safetensors(path: Path, arrays: Mapping[str, Tensor], metadata: Mapping[str, str] | None) -> None:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, a in arrays.items():
        dtype = "BF16" if isinstance(a, BF16Words) else _ST_NAMES[a.dtype]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes so tensors stay aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for a in arrays.values():
            words = a.words if isinstance(a, BF16Words) else a
            f.write(np.ascontiguousarray(words, dtype=words.dtype.newbyteorder("<")).data)  # no copy when native
