"""Tensor files without pickle: ``.npz`` (``np.load(allow_pickle=False)``) and ``.safetensors``.

The safetensors format is small enough to read and write here, so captures need no extra package: an 8-byte
little-endian header length ``n``, ``n`` bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]},
"__metadata__": {...}}``, then the raw little-endian tensor bytes (offsets relative to the end of the header).
Supported dtypes: F64, F32, F16, BF16 (BF16 is widened to float32 on reading: numpy has no bfloat16).

Every problem raises :class:`TensorFileError` naming the file; nothing here can execute code from a file.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import SparvarError

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
TENSOR_SUFFIXES = (".safetensors", ".npz")
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2")}
_ST_NAMES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
_MAX_HEADER = 100 * 1024 * 1024


class TensorFileError(SparvarError):
    """A tensor file that cannot be read safely (format, pickle, malformed header)."""


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise TensorFileError(
            f"{path}: {path.suffix} files are pickle-based and are refused (loading them can run arbitrary code); "
            "save q/k/v as .safetensors or .npz (sparvar_compiler.fidelity.hooks.CaptureWriter does)")


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.npz`` or ``.safetensors`` file, as numpy arrays.

    Raises
    ------
    TensorFileError
        For pickle-based files, object arrays, unknown suffixes or a malformed file.
    """
    p = Path(path)
    _refuse_pickle(p)
    if p.suffix == ".npz":
        return _read_npz(p)
    if p.suffix == ".safetensors":
        return _read_safetensors(p)
    raise TensorFileError(f"{p}: unknown tensor file type {p.suffix!r}; expected one of {', '.join(TENSOR_SUFFIXES)}")


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


def _read_npz(p: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(p, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise TensorFileError(f"{p}: holds an object array (pickled); only numeric arrays are accepted") from None
        raise TensorFileError(f"{p}: not a readable .npz file ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise TensorFileError(f"{p}: not a readable .npz file ({e})") from None


def _read_safetensors(p: Path) -> dict[str, np.ndarray]:
    try:
        data = p.read_bytes()
    except OSError as e:
        raise TensorFileError(f"{p}: cannot read ({e})") from None
    if len(data) < 8:
        raise TensorFileError(f"{p}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise TensorFileError(f"{p}: safetensors header length {n} is larger than the file")
    try:
        header = json.loads(data[8:8 + n].decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{p}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{p}: safetensors header must be a JSON object")
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{p}: tensor {name!r} has a malformed header entry {info!r}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if dtype_name == "BF16":
            width = 2
        elif dtype_name in _ST_DTYPES:
            width = _ST_DTYPES[dtype_name].itemsize
        else:
            raise TensorFileError(f"{p}: tensor {name!r} has dtype {dtype_name}; supported: F64, F32, F16, BF16")
        if not (0 <= begin <= end <= len(body)) or end - begin != count * width:
            raise TensorFileError(f"{p}: tensor {name!r} data offsets {begin}..{end} do not match shape {shape} "
                                  f"and dtype {dtype_name} within the file")
        chunk = body[begin:end]
        if dtype_name == "BF16":
            # bfloat16 is the top half of a float32: widen exactly.
            bits = np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(chunk, dtype=_ST_DTYPES[dtype_name]).copy()
        out[name] = arr.reshape(shape)
    return out
