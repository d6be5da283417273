"""Read a JSON document that may come from anyone, bounded before it is parsed.

``json.loads`` of a hostile file can take the machine: a 10 GB file is read whole, ``/dev/zero`` never ends,
200,000 nested brackets overflow the parser's recursion, and a 100,000-digit number costs quadratic time in
``int()``. :func:`read_json` reads at most ``max_bytes + 1`` bytes (refusing more, and a NUL byte, which no JSON
text holds, as soon as it is seen), decodes strict UTF-8, checks the nesting depth with a linear scan (no
recursion), then parses with hooks that refuse number literals longer than ``max_digits`` and non-finite
numbers. Every refusal is a :class:`JsonInputError` naming the source and the problem in one line.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .. import limits
from ..errors import SparvarError

_CHUNK = 1 << 20
# A JSON string: quote, then runs of plain characters and escapes (unrolled, so it is linear), quote.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_OPENERS = np.frombuffer(b"[{", dtype=np.uint8)


class JsonInputError(SparvarError):
    """A JSON input that is too large, too deep, not UTF-8 or not JSON."""


def read_bytes(source: str | os.PathLike, max_bytes: int, what: str = "JSON") -> bytes:
    """At most ``max_bytes`` of ``source`` (a file, FIFO or device); more, or a NUL byte, is refused while
    reading, so ``/dev/zero`` costs one chunk."""
    out = bytearray()
    with open(source, "rb") as f:
        try:
            size = os.fstat(f.fileno()).st_size
        except OSError:
            size = 0
        if size > max_bytes:
            raise JsonInputError(f"{source}: {size} bytes is over the limit of {max_bytes} for {what} "
                                 f"(sparvar_compiler.limits)")
        while True:
            chunk = f.read(min(_CHUNK, max_bytes + 1 - len(out)))
            if not chunk:
                break
            nul = chunk.find(b"\0")
            if nul >= 0:
                raise JsonInputError(f"{source}: not {what} text (a NUL byte at offset {len(out) + nul})")
            out += chunk
            if len(out) > max_bytes:
                raise JsonInputError(f"{source}: over the limit of {max_bytes} bytes for {what} "
                                     f"(sparvar_compiler.limits)")
    return bytes(out)


def check_depth(text: str, max_depth: int, where: str = "JSON") -> None:
    """Refuse ``text`` whose brackets nest deeper than ``max_depth`` (outside strings), in one linear pass."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    codes = np.frombuffer(brackets, dtype=np.uint8)
    depth = 0
    for start in range(0, codes.size, 1 << 24):
        chunk = codes[start:start + (1 << 24)]
        steps = np.where(np.isin(chunk, _OPENERS), 1, -1).astype(np.int32)
        running = np.cumsum(steps, dtype=np.int64) + depth
        if running.size and int(running.max()) > max_depth:
            raise JsonInputError(f"{where}: nesting deeper than {max_depth} levels "
                                 f"(sparvar_compiler.limits.MAX_JSON_DEPTH)")
        depth = int(running[-1]) if running.size else depth


def _number_hooks(max_digits: int, where: str):
    def parse_int(literal: str) -> int:
        if len(literal) > max_digits:
            raise JsonInputError(f"{where}: a number of {len(literal)} digits is over the limit of {max_digits} "
                                 f"(sparvar_compiler.limits.MAX_JSON_NUMBER_DIGITS)")
        return int(literal)

    def parse_float(literal: str) -> float:
        if len(literal) > max_digits:
            raise JsonInputError(f"{where}: a number of {len(literal)} characters is over the limit of "
                                 f"{max_digits} (sparvar_compiler.limits.MAX_JSON_NUMBER_DIGITS)")
        value = float(literal)
        if not math.isfinite(value):
            raise JsonInputError(f"{where}: number {literal} is out of range")
        return value

    def parse_constant(name: str) -> Any:
        raise JsonInputError(f"{where}: {name} is not valid JSON")

    return parse_int, parse_float, parse_constant


def parse_json(data: bytes | str, where: str = "JSON", *, max_depth: int = limits.MAX_JSON_DEPTH,
               max_digits: int = limits.MAX_JSON_NUMBER_DIGITS) -> Any:
    """Parse one JSON document from strict UTF-8 ``data`` within the depth and number limits."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JsonInputError(f"{where}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") \
                from None
    else:
        text = data
    check_depth(text, max_depth, where)
    parse_int, parse_float, parse_constant = _number_hooks(max_digits, where)
    try:
        return json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=parse_constant)
    except JsonInputError:
        raise
    except (ValueError, RecursionError) as e:
        raise JsonInputError(f"{where}: not valid JSON: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def read_json(source: str | os.PathLike, *, max_bytes: int = limits.MAX_JSON_BYTES,
              max_depth: int = limits.MAX_JSON_DEPTH, max_digits: int = limits.MAX_JSON_NUMBER_DIGITS,
              what: str = "JSON") -> Any:
    """Read and parse the JSON document at ``source`` within the limits.

    Raises
    ------
    JsonInputError
        Too large, NUL bytes, not UTF-8, too deep, a number too long or not finite, or not JSON.
    OSError
        ``source`` cannot be opened or read.
    """
    return parse_json(read_bytes(source, max_bytes, what), str(Path(source)), max_depth=max_depth,
                      max_digits=max_digits)
