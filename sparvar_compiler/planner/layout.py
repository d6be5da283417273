"""``BlockLayout``: the static block-sparse layout of one attention call.

Format (block compressed sparse rows, one layout for every batch element and head)::

    queries  [0, q_len)  are cut into q_blocks  = ceil(q_len / block_m)  row blocks
    keys     [0, kv_len) are cut into kv_blocks = ceil(kv_len / block_n) column blocks

    full_offsets[i] : full_offsets[i+1]       -> full_indices:    kv blocks of query block i whose every in-range
                                                 (query, key) pair is kept: a kernel computes them with no mask
    partial_offsets[i] : partial_offsets[i+1] -> partial_indices: kv blocks of query block i that are kept in
                                                 part; a block-level kernel computes them whole, a token-exact
                                                 kernel applies partial_masks
    partial_masks[p, r, w] (optional, uint32) -> bit b of word w is key column 32*w + b of row r of the p-th
                                                 partial block, in the order of partial_indices

Indices are sorted and unique within a row, and a block is never both full and partial. Rows and columns past
``q_len``/``kv_len`` in the last blocks are not part of the layout: a block whose in-range pairs are all kept is
full even if it is a tail block (kernels mask the tail by bounds, not by the layout). ``sparsity()`` is the
fraction of blocks that are skipped.

The arrays are read-only; layouts are compared and cached by :meth:`BlockLayout.content_hash`.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .. import limits
from ..arrays import ArrayHeader, bounded_json, npz_headers, read_npz_member
from ..errors import LayoutError, SparvarError
from ..limits import shown

EMPTY, PARTIAL, FULL = 0, 1, 2
BLOCK_SIZES = (16, 32, 64, 128, 256)
_FORMAT_VERSION = 1


def check_block_size(value: int, name: str) -> int:
    """Block sides must be powers of two between 16 and 256 (the kernels tile by them)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) not in BLOCK_SIZES:
        raise LayoutError(f"{name} must be a power of two between 16 and 256, got {value!r}")
    return int(value)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _frozen(a: Any, dtype: Any) -> np.ndarray:
    out = np.ascontiguousarray(np.array(a, dtype=dtype, copy=True))
    out.setflags(write=False)
    return out


def _csr(kinds: np.ndarray, kind: int) -> tuple[np.ndarray, np.ndarray]:
    sel = kinds == kind
    counts = sel.sum(axis=1)
    offsets = np.zeros(kinds.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    _, cols = np.nonzero(sel)  # row-major, so columns come sorted within each row
    return offsets, cols


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """A block-sparse attention layout; see the module docstring for the format."""

    q_len: int
    kv_len: int
    block_m: int
    block_n: int
    full_offsets: np.ndarray
    full_indices: np.ndarray
    partial_offsets: np.ndarray
    partial_indices: np.ndarray
    partial_masks: np.ndarray | None = None

    # ------------------------------------------------------------------ construction and validation
    def __post_init__(self) -> None:
        check_block_size(self.block_m, "block_m")
        check_block_size(self.block_n, "block_n")
        for name in ("q_len", "kv_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise LayoutError(f"{name} must be a positive integer, got {v!r}")
        qb, kb = self.q_blocks, self.kv_blocks
        for prefix in ("full", "partial"):
            off = _frozen(getattr(self, f"{prefix}_offsets"), np.int32)
            idx = _frozen(getattr(self, f"{prefix}_indices"), np.int32)
            if off.shape != (qb + 1,) or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != idx.size:
                raise LayoutError(f"{prefix}_offsets must be {qb + 1} non-decreasing offsets from 0 to "
                                  f"{idx.size}")
            if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= kb)):
                raise LayoutError(f"{prefix}_indices must be kv block numbers in [0, {kb})")
            for i in range(qb):
                row = idx[off[i]:off[i + 1]]
                if row.size > 1 and np.any(np.diff(row) <= 0):
                    raise LayoutError(f"{prefix}_indices of query block {i} must be sorted and unique")
            object.__setattr__(self, f"{prefix}_offsets", off)
            object.__setattr__(self, f"{prefix}_indices", idx)
        object.__setattr__(self, "q_len", int(self.q_len))
        object.__setattr__(self, "kv_len", int(self.kv_len))
        kinds = np.zeros((qb, kb), dtype=np.int8)
        rows_f = np.repeat(np.arange(qb), np.diff(self.full_offsets))
        rows_p = np.repeat(np.arange(qb), np.diff(self.partial_offsets))
        kinds[rows_f, self.full_indices] = FULL
        if np.any(kinds[rows_p, self.partial_indices] != EMPTY):
            raise LayoutError("a kv block is listed as both full and partial")
        kinds[rows_p, self.partial_indices] = PARTIAL
        kinds.setflags(write=False)
        object.__setattr__(self, "_kinds", kinds)
        if self.partial_masks is not None:
            masks = _frozen(self.partial_masks, np.uint32)
            shape = (self.partial_indices.size, self.block_m, self.mask_words)
            if masks.shape != shape:
                raise LayoutError(f"partial_masks must have shape {shape}, got {masks.shape}")
            object.__setattr__(self, "partial_masks", masks)

    @property
    def q_blocks(self) -> int:
        return _ceil_div(self.q_len, self.block_m)

    @property
    def kv_blocks(self) -> int:
        return _ceil_div(self.kv_len, self.block_n)

    @property
    def mask_words(self) -> int:
        """uint32 words per row of a partial block's token mask."""
        return _ceil_div(self.block_n, 32)

    @property
    def has_token_masks(self) -> bool:
        return self.partial_masks is not None

    @classmethod
    def from_kinds(cls, kinds: np.ndarray, q_len: int, kv_len: int, block_m: int, block_n: int,
                   partial_masks: np.ndarray | None = None) -> "BlockLayout":
        """From a ``[q_blocks, kv_blocks]`` array of ``EMPTY``/``PARTIAL``/``FULL``."""
        kinds = np.asarray(kinds)
        want = (_ceil_div(q_len, check_block_size(block_m, "block_m")),
                _ceil_div(kv_len, check_block_size(block_n, "block_n")))
        if kinds.shape != want:
            raise LayoutError(f"block kinds have shape {kinds.shape}, expected {want} for q_len {q_len}, "
                              f"kv_len {kv_len}, blocks {block_m}x{block_n}")
        fo, fi = _csr(kinds, FULL)
        po, pi = _csr(kinds, PARTIAL)
        return cls(q_len, kv_len, block_m, block_n, fo, fi, po, pi, partial_masks)

    @classmethod
    def from_block_mask(cls, active: np.ndarray, q_len: int, kv_len: int, block_m: int,
                        block_n: int) -> "BlockLayout":
        """From a boolean ``[q_blocks, kv_blocks]`` array; every active block is computed whole (full)."""
        active = np.asarray(active, dtype=bool)
        return cls.from_kinds(np.where(active, FULL, EMPTY).astype(np.int8), q_len, kv_len, block_m, block_n)

    @classmethod
    def dense(cls, q_len: int, kv_len: int, block_m: int, block_n: int) -> "BlockLayout":
        qb, kb = _ceil_div(q_len, block_m), _ceil_div(kv_len, block_n)
        return cls.from_block_mask(np.ones((qb, kb), dtype=bool), q_len, kv_len, block_m, block_n)

    @classmethod
    def from_token_mask(cls, mask: np.ndarray, block_m: int, block_n: int,
                        token_masks: bool = True) -> "BlockLayout":
        """Coarsen a boolean ``[q_len, kv_len]`` token mask: a block is active if any of its pairs is kept.

        With ``token_masks`` the exact mask of every partial block is kept as bits (for token-exact kernels).
        """
        mask = np.asarray(mask)
        if mask.ndim != 2 or mask.dtype != np.bool_:
            raise LayoutError(f"token mask must be a 2-D boolean array, got {mask.dtype} {mask.shape}")
        bm, bn = check_block_size(block_m, "block_m"), check_block_size(block_n, "block_n")
        q_len, kv_len = mask.shape
        qb, kb = _ceil_div(q_len, bm), _ceil_div(kv_len, bn)
        padded = np.zeros((qb * bm, kb * bn), dtype=bool)
        padded[:q_len, :kv_len] = mask
        blocks = padded.reshape(qb, bm, kb, bn)
        counts = blocks.sum(axis=(1, 3), dtype=np.int64)
        rows = np.minimum(bm, q_len - np.arange(qb) * bm)
        cols = np.minimum(bn, kv_len - np.arange(kb) * bn)
        valid = rows[:, None] * cols[None, :]
        kinds = np.where(counts == valid, FULL, np.where(counts > 0, PARTIAL, EMPTY)).astype(np.int8)
        masks = None
        if token_masks:
            pr, pc = np.nonzero(kinds == PARTIAL)
            bits = blocks.transpose(0, 2, 1, 3)[pr, pc]  # [n_partial, bm, bn]
            words = _ceil_div(bn, 32)
            if words * 32 != bn:
                bits = np.concatenate([bits, np.zeros(bits.shape[:2] + (words * 32 - bn,), bool)], axis=2)
            packed = np.packbits(bits, axis=2, bitorder="little")
            masks = packed.view("<u4").reshape(len(pr), bm, words)
        return cls.from_kinds(kinds, q_len, kv_len, bm, bn, masks)

    # ------------------------------------------------------------------ views
    def kinds(self) -> np.ndarray:
        """``[q_blocks, kv_blocks]`` int8 of ``EMPTY`` (0), ``PARTIAL`` (1), ``FULL`` (2)."""
        return self._kinds  # type: ignore[attr-defined]

    def active(self) -> np.ndarray:
        """``[q_blocks, kv_blocks]`` boolean: blocks a kernel computes."""
        return self.kinds() != EMPTY

    @property
    def num_active(self) -> int:
        return int(self.full_indices.size + self.partial_indices.size)

    def sparsity(self) -> float:
        """Fraction of blocks skipped."""
        return 1.0 - self.num_active / (self.q_blocks * self.kv_blocks)

    def computed_pairs(self) -> int:
        """(query, key) pairs inside the active blocks, clipped to the tensor bounds (work of a block kernel)."""
        rows = np.minimum(self.block_m, self.q_len - np.arange(self.q_blocks) * self.block_m)
        cols = np.minimum(self.block_n, self.kv_len - np.arange(self.kv_blocks) * self.block_n)
        return int((self.active() * (rows[:, None] * cols[None, :])).sum())

    def to_token_mask(self, exact: bool = False) -> np.ndarray:
        """Expand to a boolean ``[q_len, kv_len]`` mask.

        ``exact=False``: every active block whole (what a block-level kernel computes). ``exact=True``: partial
        blocks by their token masks (requires them).
        """
        if exact and not self.has_token_masks:
            raise LayoutError("this layout has no token masks; build it with token_masks=True")
        bm, bn = self.block_m, self.block_n
        out = np.repeat(np.repeat(self.active(), bm, axis=0), bn, axis=1)
        if exact and self.partial_indices.size:
            bits = np.unpackbits(self.partial_masks.view(np.uint8), axis=2, bitorder="little")[:, :, :bn]
            rows = np.repeat(np.arange(self.q_blocks), np.diff(self.partial_offsets))
            for p, (r, c) in enumerate(zip(rows, self.partial_indices)):
                out[r * bm:(r + 1) * bm, c * bn:(c + 1) * bn] = bits[p].astype(bool)
        return np.ascontiguousarray(out[: self.q_len, : self.kv_len])

    def tables(self, which: str = "active") -> tuple[np.ndarray, np.ndarray]:
        """Padded per-row tables for kernels: ``(num [q_blocks] int32, idx [q_blocks, max(1, max num)] int32)``.

        ``which`` is ``"active"`` (full and partial merged, sorted), ``"full"`` or ``"partial"``. Padding
        entries repeat the row's last index (or 0), so a prefetching kernel never reads out of range.
        """
        if which == "active":
            kinds = self.active()
        elif which == "full":
            kinds = self.kinds() == FULL
        elif which == "partial":
            kinds = self.kinds() == PARTIAL
        else:
            raise ValueError(f"which must be active, full or partial, got {which!r}")
        num = kinds.sum(axis=1).astype(np.int32)
        width = max(1, int(num.max(initial=0)))
        idx = np.zeros((self.q_blocks, width), dtype=np.int32)
        for i in range(self.q_blocks):
            cols = np.nonzero(kinds[i])[0]
            if cols.size:
                idx[i, : cols.size] = cols
                idx[i, cols.size:] = cols[-1]
        return num, idx

    def bsr(self) -> tuple[np.ndarray, np.ndarray]:
        """All active blocks as plain BSR: ``(row_offsets [q_blocks+1], col_indices)`` (FlashInfer's form)."""
        offsets, cols = _csr(self.active().astype(np.int8), 1)
        return offsets.astype(np.int32), cols.astype(np.int32)

    def transpose(self) -> "BlockLayout":
        """The layout of the transposed problem (keys as rows), e.g. for a backward pass over key blocks."""
        if self.has_token_masks:
            token_t = self.to_token_mask(exact=True).T
            return BlockLayout.from_token_mask(np.ascontiguousarray(token_t), self.block_n, self.block_m)
        kinds_t = np.ascontiguousarray(self.kinds().T)
        return BlockLayout.from_kinds(kinds_t, self.kv_len, self.q_len, self.block_n, self.block_m)

    # ------------------------------------------------------------------ identity and persistence
    def _header(self) -> dict[str, Any]:
        return {"format": _FORMAT_VERSION, "q_len": self.q_len, "kv_len": self.kv_len,
                "block_m": self.block_m, "block_n": self.block_n}

    def content_hash(self) -> str:
        """sha256 (hex) of the header and every array: equal layouts hash equal on any machine."""
        h = hashlib.sha256(json.dumps(self._header(), sort_keys=True).encode())
        for a in (self.full_offsets, self.full_indices, self.partial_offsets, self.partial_indices):
            h.update(a.astype("<i4").tobytes())
        h.update(b"masks" if self.has_token_masks else b"nomasks")
        if self.partial_masks is not None:
            h.update(self.partial_masks.astype("<u4").tobytes())
        return h.hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockLayout) and self.content_hash() == other.content_hash()

    def __hash__(self) -> int:
        return hash(self.content_hash())

    def to_npz(self, path: str | Path) -> None:
        """Write the layout as an ``.npz``: a ``header`` member (uint8 JSON: format, q_len, kv_len, block_m,
        block_n) and one int32/uint32 ``.npy`` member per array; :meth:`from_npz` reads it back."""
        arrays = {"header": np.frombuffer(json.dumps(self._header()).encode(), dtype=np.uint8),
                  "full_offsets": self.full_offsets, "full_indices": self.full_indices,
                  "partial_offsets": self.partial_offsets, "partial_indices": self.partial_indices}
        if self.partial_masks is not None:
            arrays["partial_masks"] = self.partial_masks
        np.savez_compressed(path, **arrays)

    @classmethod
    def from_npz(cls, path: str | Path) -> "BlockLayout":
        """Read a layout written by :meth:`to_npz`, trusting nothing in the file.

        Every member's npy header is read first (:func:`sparvar_compiler.arrays.npz_headers`: ``.npy`` members
        only, numeric dtypes, sizes within :mod:`sparvar_compiler.limits`, exactly as many bytes as promised);
        then the layout header's lengths and block sizes are bounded, and every array's shape must be the one
        they imply, before any array is read. Pickle is never allowed.

        Raises
        ------
        LayoutError
            Naming the file and the member or field that is malformed, inconsistent or over a limit.
        """
        p = Path(path)
        headers = npz_headers(p, LayoutError)
        known = _NPZ_MEMBERS + ("partial_masks",)
        unknown = [name for name in headers if name not in known]
        if unknown:
            raise LayoutError(f"{p}: not a block layout file (unknown member {shown(unknown[0] + '.npy')})")
        missing = [name for name in _NPZ_MEMBERS if name not in headers]
        if missing:
            raise LayoutError(f"{p}: not a block layout file (member {missing[0]}.npy is missing)")
        meta = _read_npz_header(p, headers["header"])
        q_len, kv_len = (_bounded_length(meta.get(k), k, p) for k in ("q_len", "kv_len"))
        try:
            block_m, block_n = check_block_size(meta.get("block_m"), "block_m"), check_block_size(
                meta.get("block_n"), "block_n")
        except LayoutError as e:
            raise LayoutError(f"{p}: header {e}") from None
        qb, kb = _ceil_div(q_len, block_m), _ceil_div(kv_len, block_n)
        limits.check_limit(qb * kb, limits.MAX_TABLE_ELEMENTS, "MAX_TABLE_ELEMENTS",
                           f"{p}: header's block grid ({qb} x {kb} blocks)", LayoutError)
        shapes: dict[str, Any] = {"full_offsets": (qb + 1,), "partial_offsets": (qb + 1,)}
        for name in ("full_indices", "partial_indices"):
            shape = headers[name].shape
            if len(shape) != 1 or shape[0] > qb * kb:
                raise LayoutError(f"{p}: member {name}.npy has shape {list(shape)}; expected at most {qb * kb} kv "
                                  f"block numbers ({qb} x {kb} blocks)")
            shapes[name] = shape
        if "partial_masks" in headers:
            shapes["partial_masks"] = (shapes["partial_indices"][0], block_m, _ceil_div(block_n, 32))
        for name, want in shapes.items():
            h = headers[name]
            if h.shape != want:
                raise LayoutError(f"{p}: member {name}.npy has shape {list(h.shape)}; the header "
                                  f"(q_len {q_len}, kv_len {kv_len}, blocks {block_m}x{block_n}) implies {list(want)}")
            if h.dtype.kind not in "iu" or h.dtype.itemsize > 4:  # wider values would wrap when narrowed to 32 bits
                raise LayoutError(f"{p}: member {name}.npy has dtype {h.dtype_name}; expected 32-bit integers")
        arrays = {name: read_npz_member(p, headers[name], LayoutError) for name in shapes}
        try:
            return cls(q_len, kv_len, block_m, block_n, arrays["full_offsets"], arrays["full_indices"],
                       arrays["partial_offsets"], arrays["partial_indices"], arrays.get("partial_masks"))
        except LayoutError as e:
            raise LayoutError(f"{p}: {e}") from None
        except (ValueError, OverflowError) as e:  # e.g. an index that does not fit int32
            raise LayoutError(f"{p}: not a block layout file ({e})") from None

    # ------------------------------------------------------------------ human views
    def summary(self) -> str:
        kinds = self.kinds()
        return (f"BlockLayout {self.q_len}x{self.kv_len}, blocks {self.block_m}x{self.block_n} "
                f"({self.q_blocks}x{self.kv_blocks}): {int((kinds == FULL).sum())} full, "
                f"{int((kinds == PARTIAL).sum())} partial, sparsity {100 * self.sparsity():.1f}%")

    def to_text(self, max_width: int = 120) -> str:
        """A character picture: ``#`` full, ``+`` partial, ``.`` skipped (columns grouped if wider than max)."""
        kinds = self.kinds()
        group = _ceil_div(kinds.shape[1], max_width)
        lines = [self.summary() + (f"; {group} kv blocks per column" if group > 1 else "")]
        chars = np.array([".", "+", "#"])
        for row in kinds:
            padded = np.zeros(_ceil_div(row.size, group) * group, dtype=np.int8)
            padded[: row.size] = row
            lines.append("".join(chars[padded.reshape(-1, group).max(axis=1)]))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<{self.summary()}, hash {self.content_hash()[:12]}>"

    def plot(self, path: str | Path, title: str | None = None,
             key_scales: Sequence[tuple[int, int, int]] | None = None,
             query_spans: Sequence[tuple[int, int, int]] | None = None) -> Path:
        """Write a PNG picture of the layout: full, partial and skipped blocks in three colours, on axes in
        token positions.

        Parameters
        ----------
        path:
            Where to write the PNG (parent directories are created).
        title:
            Wrapped to the figure's width; default :meth:`summary`.
        key_scales:
            ``(scale index, first token, tokens)`` per key scale (:func:`~sparvar_compiler.planner.csla.
            key_scale_spans`): draws a line where each key scale starts and labels the scales on a top axis.
            Scales narrower than one key block share a label (``0-4``).
        query_spans:
            The same for the rows (e.g. a call whose queries span several scales): lines and a right axis.

        Raises
        ------
        SparvarError
            If matplotlib is not installed (``pip install 'sparvar-compiler[plot]'``).
        """
        figure = _figure_class()
        from matplotlib.colors import ListedColormap
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch

        kinds = self.kinds()
        qb, kb = kinds.shape
        width_tokens, height_tokens = kb * self.block_n, qb * self.block_m
        # ~0.065 inch per block (8 pixels at 120 dpi), so 165 x 165 blocks stay readable; clamped for tiny and huge.
        fig_w = float(np.clip(2.6 + kb * 0.065, 6.5, 14.0))
        fig_h = float(np.clip(2.4 + qb * 0.065, 4.0, 12.5))
        fig = figure(figsize=(fig_w, fig_h), dpi=120)
        ax = fig.add_subplot()
        colours = ("#f2f2f2", "#f0a64b", "#1f5fa8")
        ax.imshow(kinds, cmap=ListedColormap(colours), vmin=-0.5, vmax=2.5, interpolation="nearest",
                  aspect="auto", extent=(0, width_tokens, height_tokens, 0))
        for end, total, draw in ((self.kv_len, width_tokens, ax.axvline), (self.q_len, height_tokens, ax.axhline)):
            if end < total:  # the tail of the last block is outside the tensors
                draw(end, color="#888888", linewidth=0.6, linestyle=":")
        ax.set_xlim(0, width_tokens)
        ax.set_ylim(height_tokens, 0)
        ax.set_xlabel(f"key position (token; {self.kv_blocks} blocks of {self.block_n})", fontsize=8.5)
        ax.set_ylabel(f"query position (token; {self.q_blocks} blocks of {self.block_m})", fontsize=8.5)
        ax.tick_params(labelsize=7.5)
        if key_scales:
            _scale_axis(ax, key_scales, self.block_n, fig_w, vertical=True)
        if query_spans:
            _scale_axis(ax, query_spans, self.block_m, fig_h, vertical=False)
        n_full, n_partial = int((kinds == FULL).sum()), int((kinds == PARTIAL).sum())
        n_empty = kinds.size - n_full - n_partial
        handles = [Patch(facecolor=colours[2], label=f"full: {n_full}"),
                   Patch(facecolor=colours[1], label=f"partial: {n_partial}"),
                   Patch(facecolor=colours[0], edgecolor="#999999", linewidth=0.5, label=f"skipped: {n_empty}")]
        if key_scales or query_spans:
            handles.append(Line2D([], [], color="black", linewidth=0.9, label="scale boundary"))
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        wrapped = "\n".join(textwrap.fill(line, width=max(40, int(fig_w * 13)))
                            for line in (title or self.summary()).splitlines())
        fig.suptitle(wrapped, fontsize=9.5)
        top_room = 0.12 + 0.19 * (wrapped.count("\n") + 1) + (0.42 if key_scales else 0.08)
        fig.subplots_adjust(left=0.8 / fig_w, right=1 - (0.55 if query_spans else 0.25) / fig_w,
                            bottom=0.85 / fig_h, top=1 - top_room / fig_h)
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
        return out


_NPZ_MEMBERS = ("header", "full_offsets", "full_indices", "partial_offsets", "partial_indices")


def _read_npz_header(path: Path, header: ArrayHeader) -> dict[str, Any]:
    """The JSON header member of a layout ``.npz``: bounded, UTF-8, an object of our format version."""
    if header.dtype != np.uint8 or len(header.shape) != 1:
        raise LayoutError(f"{path}: member header.npy must be uint8 JSON text, got {header.dtype_name} "
                          f"{list(header.shape)}")
    limits.check_limit(header.nbytes, limits.MAX_LAYOUT_HEADER_BYTES, "MAX_LAYOUT_HEADER_BYTES",
                       f"{path}: header.npy size in bytes", LayoutError)
    raw = read_npz_member(path, header, LayoutError).tobytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LayoutError(f"{path}: member header.npy is not UTF-8 JSON") from None
    meta = bounded_json(text, f"{path}: header", LayoutError)
    if not isinstance(meta, dict):
        raise LayoutError(f"{path}: header must be a JSON object, got {type(meta).__name__}")
    if meta.get("format") != _FORMAT_VERSION:
        raise LayoutError(f"{path}: layout format {shown(meta.get('format'))} is not supported")
    return meta


def _bounded_length(value: Any, name: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise LayoutError(f"{path}: header {name} must be a positive integer, got {shown(value)}")
    return limits.check_limit(value, limits.MAX_KV_LEN, "MAX_KV_LEN", f"{path}: header {name}", LayoutError)


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise SparvarError("drawing a picture needs matplotlib: pip install 'sparvar-compiler[plot]'") from None
    return Figure


def _scale_axis(ax, spans: Sequence[tuple[int, int, int]], block: int, inches: float, vertical: bool) -> None:
    """Lines where scales start and a secondary axis naming them. A boundary closer than one block to the last
    drawn one is not drawn (the sink scales of a 1024 px schedule all sit in the first block); the scales between
    two drawn lines share one label."""
    groups: list[list[tuple[int, int, int]]] = []
    last = None
    for span in spans:
        if groups and (span[1] - last < block):
            groups[-1].append(span)
            continue
        groups.append([span])
        last = span[1]
    draw = ax.axvline if vertical else ax.axhline
    for group in groups[1:]:
        draw(group[0][1], color="black", linewidth=0.9, alpha=0.8)
    centres = [(g[0][1] + g[-1][1] + g[-1][2]) / 2 for g in groups]
    labels = [str(g[0][0]) if len(g) == 1 else f"{g[0][0]}-{g[-1][0]}" for g in groups]
    if vertical:
        sec = ax.secondary_xaxis("top")
        sec.set_xticks(centres, labels, fontsize=7.5)
        sec.set_xlabel("key scale", fontsize=8.5)
    else:
        sec = ax.secondary_yaxis("right")
        sec.set_yticks(centres, labels, fontsize=7.5)
        sec.set_ylabel("query scale", fontsize=8.5)
    sec.tick_params(length=0)
