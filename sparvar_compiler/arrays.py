"""Reading arrays from files nobody vouches for: the header first, then only what it promised.

An ``.npy`` header, a ``.npz`` member's header or a ``.safetensors`` JSON header states each array's dtype and
shape, hence its size. ``np.load`` trusts it: a 200-byte file claiming ``(1 << 40,)`` float64s asks for 8 TiB.
Here every header is read and checked before any array is allocated:

* the array's bytes against :data:`~sparvar_compiler.limits.MAX_ARRAY_BYTES` and its elements against
  ``MAX_ARRAY_ELEMENTS`` (computed with Python integers, so a shape cannot overflow int64 into a small number);
* the dtype: plain numbers and booleans only (no object arrays, so nothing is ever unpickled, and no
  structured or void dtypes);
* the header against the bytes that follow it: an ``.npz`` member must hold exactly the array its header
  describes; a safetensors tensor's byte range must be integers, inside the file, of exactly the size of its
  shape and dtype, and not overlap another tensor's;
* an ``.npz`` holds only ``.npy`` members (at most ``MAX_ARRAYS_PER_FILE``), each named once.

Readers call :func:`npz_headers` or :func:`safetensors_headers` to check shapes against what they expect (a
block layout's header, a capture's schedule), then :func:`read_npz_member` / :func:`read_safetensors_tensor`.
Every problem raises the caller's :class:`~sparvar_compiler.errors.SparvarError` subclass (default
:class:`ArrayFileError`) naming the file, the member and the field.
"""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Type

import numpy as np
import numpy.lib.format as npy_format

from . import limits
from .errors import SparvarError
from .limits import shown

# numpy kinds of plain numbers: bool, signed and unsigned integers, floats, complex.
_NUMERIC_KINDS = "biufc"

# safetensors dtype names -> (numpy dtype to read the bytes as, item size). BF16 has no numpy dtype: its raw
# 16-bit words are read as <u2, and a reader widens them to float32.
SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class ArrayFileError(SparvarError):
    """An array file whose header is malformed, over a size limit, or inconsistent with its contents."""


@dataclass(frozen=True)
class ArrayHeader:
    """What a header says about one array, checked against the limits and the file.

    Attributes
    ----------
    name:
        The array's name: an ``.npz`` member without ``.npy``, or a safetensors tensor name.
    shape, dtype:
        Its shape and the numpy dtype its bytes are read as (``<u2`` for safetensors BF16).
    dtype_name:
        numpy's name of the dtype (``"float32"``), or the safetensors name (``"BF16"``) for safetensors.
    nbytes:
        ``prod(shape) * itemsize``.
    offset:
        Where the data starts: in the ``.npz`` member (after the npy header), or in the ``.safetensors`` file.
    fortran_order:
        npy only: the data is column-major.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    dtype_name: str
    nbytes: int
    offset: int
    fortran_order: bool = False

    @property
    def size(self) -> int:
        return _product(self.shape)


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def check_shape(shape: Any, itemsize: int, where: str, error: Type[Exception]) -> tuple[tuple[int, ...], int]:
    """``(shape, nbytes)`` of a header's shape: a list of non-negative integers (not bools), at most
    ``MAX_ARRAY_DIMS`` of them, whose product fits ``MAX_ARRAY_ELEMENTS`` and whose bytes fit
    ``MAX_ARRAY_BYTES``; Python integers throughout, so nothing overflows."""
    if not isinstance(shape, (list, tuple)):
        raise error(f"{where}: shape must be a list of integers, got {shown(shape)}")
    limits.check_limit(len(shape), limits.MAX_ARRAY_DIMS, "MAX_ARRAY_DIMS", f"{where}: dimensions", error)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise error(f"{where}: shape must be non-negative integers, got {shown(shape)}")
    count = _product(tuple(shape))
    nbytes = count * itemsize
    limits.check_limit(nbytes, limits.MAX_ARRAY_BYTES, "MAX_ARRAY_BYTES",
                       f"{where}: bytes of shape {shown(list(shape))}", error)
    limits.check_limit(count, limits.MAX_ARRAY_ELEMENTS, "MAX_ARRAY_ELEMENTS",
                       f"{where}: elements of shape {shown(list(shape))}", error)
    return tuple(shape), nbytes


# --------------------------------------------------------------------------------------------- npy / npz
def read_npy_header(f: Any, where: str, error: Type[Exception] = ArrayFileError) -> tuple[tuple[int, ...], np.dtype,
                                                                                          bool, int]:
    """``(shape, dtype, fortran_order, nbytes)`` from the npy header at the start of the binary file ``f``,
    leaving ``f`` at the first data byte; raises ``error`` for anything but a version 1 or 2 header of a
    numeric dtype within the limits."""
    try:
        version = npy_format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(f, max_header_size=limits.MAX_NPY_HEADER_BYTES)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(f, max_header_size=limits.MAX_NPY_HEADER_BYTES)
        else:
            raise error(f"{where}: npy format version {version[0]}.{version[1]} is not supported (1.0 and 2.0 are)")
    except SparvarError:
        raise
    except (ValueError, TypeError, SyntaxError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise error(f"{where}: not an npy array ({' '.join(str(e).split())[:200]})") from None
    if dtype.hasobject or dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype:
        raise error(f"{where}: dtype {dtype.str} is refused; only plain numeric arrays are read (an object array "
                    "would be unpickled)")
    shape, nbytes = check_shape(shape, dtype.itemsize, where, error)
    return shape, dtype, bool(fortran), nbytes


def npz_headers(path: str | Path, error: Type[Exception] = ArrayFileError) -> dict[str, ArrayHeader]:
    """Every member's header of an ``.npz`` file, checked (see the module docstring), in file order.

    Only the zip directory and each member's npy header are read; no array is allocated.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            limits.check_limit(len(infos), limits.MAX_ARRAYS_PER_FILE, "MAX_ARRAYS_PER_FILE",
                               f"{p}: number of members", error)
            out: dict[str, ArrayHeader] = {}
            for info in infos:
                if not info.filename.endswith(".npy") or info.is_dir():
                    raise error(f"{p}: member {shown(info.filename)} is not an .npy array (an .npz holds only "
                                ".npy members)")
                name = info.filename[:-4]
                if name in out:
                    raise error(f"{p}: member {shown(info.filename)} appears twice")
                where = f"{p}: member {shown(info.filename)}"
                with z.open(info) as f:
                    shape, dtype, fortran, nbytes = read_npy_header(f, where, error)
                    offset = f.tell()
                if info.file_size != offset + nbytes:
                    raise error(f"{where}: its header promises {nbytes} bytes of {dtype.name} {list(shape)}, but the "
                                f"member holds {info.file_size - offset}")
                out[name] = ArrayHeader(name, shape, dtype, dtype.name, nbytes, offset, fortran)
            return out
    except SparvarError:
        raise
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, RuntimeError,
            ValueError) as e:
        raise error(f"{p}: not a readable .npz file ({' '.join(str(e).split())[:200]})") from None


def read_npz_member(path: str | Path, header: ArrayHeader, error: Type[Exception] = ArrayFileError) -> np.ndarray:
    """The array of one member whose header :func:`npz_headers` returned: exactly ``header.nbytes`` bytes are
    read into a new, writable array."""
    p = Path(path)
    where = f"{p}: member {shown(header.name + '.npy')}"
    try:
        with zipfile.ZipFile(p) as z, z.open(header.name + ".npy") as f:
            shape, dtype, fortran, nbytes = read_npy_header(f, where, error)
            if (shape, dtype, fortran) != (header.shape, header.dtype, header.fortran_order):
                raise error(f"{where}: changed while it was read")
            buf = bytearray(nbytes)
            got = f.readinto(buf) if nbytes else 0
            while got < nbytes:
                more = f.readinto(memoryview(buf)[got:])
                if not more:
                    raise error(f"{where}: holds {got} bytes of data; its header promises {nbytes}")
                got += more
    except SparvarError:
        raise
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError) as e:
        raise error(f"{where}: cannot be read ({' '.join(str(e).split())[:200]})") from None
    flat = np.frombuffer(buf, dtype=dtype)
    return flat.reshape(shape[::-1]).T if fortran else flat.reshape(shape)


def read_npz(path: str | Path, error: Type[Exception] = ArrayFileError) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file, each checked by its header before it is read."""
    headers = npz_headers(path, error)
    return {name: read_npz_member(path, h, error) for name, h in headers.items()}


# --------------------------------------------------------------------------------------------- safetensors
def bounded_json(text: str, where: str, error: Type[Exception]) -> Any:
    """``json.loads`` of a small header or index, without its three hazards: a huge integer literal (quadratic
    ``int()``, refused past 4300 digits with a ValueError), NaN/Infinity (not JSON), and deep nesting
    (RecursionError); each is ``error`` naming ``where``."""

    def parse_int(s: str) -> int:
        if len(s.lstrip("-")) > limits.MAX_JSON_NUMBER_DIGITS:
            raise error(f"{where}: a number of {len(s)} digits is over the limit of {limits.MAX_JSON_NUMBER_DIGITS} "
                        "(sparvar_compiler.limits.MAX_JSON_NUMBER_DIGITS)")
        return int(s)

    def parse_float(s: str) -> float:
        if len(s) > 2 * limits.MAX_JSON_NUMBER_DIGITS:
            raise error(f"{where}: a number of {len(s)} characters is over the limit of "
                        f"{2 * limits.MAX_JSON_NUMBER_DIGITS}")
        return float(s)

    def parse_constant(s: str) -> Any:
        raise error(f"{where}: {s} is not JSON")

    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not JSON ({e})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None


def safetensors_headers(path: str | Path, error: Type[Exception] = ArrayFileError
                        ) -> tuple[dict[str, ArrayHeader], dict[str, str]]:
    """``(tensors, metadata)`` of a ``.safetensors`` file: every tensor's header checked (see the module
    docstring), and the ``__metadata__`` strings. Only the 8-byte length and the JSON header are read.

    The checks: header length at most ``MAX_SAFETENSORS_HEADER_BYTES`` and inside the file; UTF-8 JSON object;
    at most ``MAX_ARRAYS_PER_FILE`` tensors; per tensor exactly ``dtype``, ``shape`` and ``data_offsets``, a known
    dtype, a shape within the limits, and offsets ``[begin, end]`` that are integers with
    ``0 <= begin <= end <= data bytes`` and ``end - begin`` equal to the shape's bytes; no two tensors overlap.
    """
    p = Path(path)
    try:
        with open(p, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            head = f.read(8)
            if len(head) < 8:
                raise error(f"{p}: too short for a safetensors file ({len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            limits.check_limit(n, limits.MAX_SAFETENSORS_HEADER_BYTES, "MAX_SAFETENSORS_HEADER_BYTES",
                               f"{p}: safetensors header length", error)
            if n > size - 8:
                raise error(f"{p}: safetensors header length {n} is larger than the file ({size} bytes)")
            raw = f.read(n)
    except SparvarError:
        raise
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: safetensors header is not UTF-8 (byte at offset {8 + e.start})") from None
    header = bounded_json(text, f"{p}: safetensors header", error)
    if not isinstance(header, dict):
        raise error(f"{p}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise error(f"{p}: safetensors __metadata__ must map names to strings")
    limits.check_limit(len(header), limits.MAX_ARRAYS_PER_FILE, "MAX_ARRAYS_PER_FILE", f"{p}: number of tensors",
                       error)
    body = size - 8 - n
    out: dict[str, ArrayHeader] = {}
    for name, info in header.items():
        where = f"{p}: tensor {shown(name)}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise error(f"{where}: header entry must have exactly dtype, shape and data_offsets, got {shown(info)}")
        dtype_name = info["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in SAFETENSORS_DTYPES:
            raise error(f"{where}: dtype {shown(dtype_name)} is not supported; known: {', '.join(SAFETENSORS_DTYPES)}")
        dtype = SAFETENSORS_DTYPES[dtype_name]
        shape, nbytes = check_shape(info["shape"], dtype.itemsize, where, error)
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise error(f"{where}: data_offsets must be two integers [begin, end], got {shown(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= body:
            raise error(f"{where}: data_offsets {shown(offsets)} are outside the {body} data bytes of the file")
        if end - begin != nbytes:
            raise error(f"{where}: data_offsets {shown(offsets)} hold {end - begin} bytes, but shape {list(shape)} of "
                        f"{dtype_name} is {nbytes} bytes")
        out[name] = ArrayHeader(name, shape, dtype, dtype_name, nbytes, 8 + n + begin)
    spans = sorted((h.offset, h.offset + h.nbytes, name) for name, h in out.items() if h.nbytes)
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise error(f"{p}: tensors {shown(a)} and {shown(b)} overlap in the file (their data_offsets share bytes)")
    return out, metadata


def read_safetensors_tensor(path: str | Path, header: ArrayHeader, error: Type[Exception] = ArrayFileError
                            ) -> np.ndarray:
    """The raw array of one tensor whose header :func:`safetensors_headers` returned (``<u2`` words for BF16),
    as a new, writable array."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            f.seek(header.offset)
            buf = bytearray(header.nbytes)
            got = f.readinto(buf) if header.nbytes else 0
    except OSError as e:
        raise error(f"{p}: cannot read ({e.strerror or e})") from None
    if got != header.nbytes:
        raise error(f"{p}: tensor {shown(header.name)} is truncated ({got} of {header.nbytes} bytes)")
    return np.frombuffer(buf, dtype=header.dtype).reshape(header.shape)
