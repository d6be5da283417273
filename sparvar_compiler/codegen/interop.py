"""Convert a :class:`BlockLayout` to and from the block-sparse formats of the kernels users pick instead.

* PyTorch FlexAttention's ``BlockMask`` (``torch.nn.attention.flex_attention``): per query block, a table of
  *partial* kv blocks (``kv_num_blocks``/``kv_indices``, where ``mask_mod`` decides per token) and a table of
  *full* kv blocks (``full_kv_num_blocks``/``full_kv_indices``, computed with no mask), both
  ``[B, H, q_blocks, ...]``; ours is one layout for every batch element and head, so B = H = 1 (flex broadcasts).
* Plain BSR - FlashInfer's ``BlockSparseAttentionWrapper.plan(indptr, indices, M, N, R, C, ..., mask=...)``:
  row offsets ``indptr [q_blocks + 1]``, column indices, ``M x N`` tokens in ``R x C`` blocks, and an optional
  boolean ``mask [nnz, R, C]`` for token-exact blocks.

Two semantics, as in the kernels: *block level* (``token_exact=False``, SparVAR's default: every active block is
computed whole) and *token exact* (partial blocks keep only their token mask, which the layout must carry).

The ``mask_mod`` of every BlockMask made here agrees with its block tables: it keeps exactly the pairs the
tables say are kept. Compiled flex only evaluates ``mask_mod`` inside partial blocks, but eager flex (the CPU
fallback) evaluates it everywhere and ignores the tables, so a "no-op" mask_mod would silently turn a sparse
mask dense there.

Round trips are exact (equal :meth:`BlockLayout.content_hash`) when nothing is dropped on the way: token-exact
layouts through either format with masks; block-level layouts whose active blocks are all full. A block-level
conversion of a layout with partial blocks makes them full (that is what "computed whole" means).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..errors import LayoutError
from ..planner.layout import EMPTY, FULL, PARTIAL, BlockLayout, check_block_size


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ---------------------------------------------------------------------------------------------- FlexAttention
def _padded_table(num: np.ndarray, idx: np.ndarray, width: int, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts ``[1, 1, rows]`` and indices ``[1, 1, rows, width]`` int32, as BlockMask stores them."""
    table = np.zeros((num.shape[0], width), dtype=np.int32)
    table[:, : idx.shape[1]] = idx[:, :width]
    return (torch.from_numpy(num.astype(np.int32))[None, None].to(device),
            torch.from_numpy(table)[None, None].to(device))


def layout_mask_mod(layout: BlockLayout, token_exact: bool = False,
                    device: torch.device | str = "cpu") -> Callable[..., torch.Tensor]:
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` that keeps what a kernel over ``layout`` keeps.

    Block level: the pair's block is active. Token exact: full blocks whole, partial blocks by their bitmask
    (bit ``kv % 32`` of word ``(kv % block_n) // 32`` of row ``q % block_m`` of the block's entry in
    ``partial_masks``). Lookups use small device tensors that flex captures.
    """
    bm, bn = layout.block_m, layout.block_n
    if not token_exact:
        active = torch.from_numpy(layout.active().copy()).to(device)

        def block_mask_mod(b, h, q_idx, kv_idx):
            return active[q_idx // bm, kv_idx // bn]

        return block_mask_mod
    if not layout.has_token_masks:
        raise LayoutError("token_exact needs a layout with token masks (build it with token_masks=True)")
    kinds = layout.kinds()
    slot = np.zeros(kinds.shape, dtype=np.int64)
    rows = np.repeat(np.arange(layout.q_blocks), np.diff(layout.partial_offsets))
    slot[rows, layout.partial_indices] = np.arange(layout.partial_indices.size)
    words = layout.partial_masks.astype(np.int64)  # uint32 -> int64: shifts stay unsigned
    if words.shape[0] == 0:
        words = np.zeros((1, bm, layout.mask_words), dtype=np.int64)
    kinds_t = torch.from_numpy(kinds.astype(np.int64)).to(device)
    slot_t = torch.from_numpy(slot).to(device)
    words_t = torch.from_numpy(words).to(device)

    def token_mask_mod(b, h, q_idx, kv_idx):
        qb, kb = q_idx // bm, kv_idx // bn
        kind = kinds_t[qb, kb]
        col = kv_idx % bn
        word = words_t[slot_t[qb, kb], q_idx % bm, col // 32]
        bit = (word >> (col % 32)) & 1
        return (kind == FULL) | ((kind == PARTIAL) & (bit == 1))

    return token_mask_mod


def to_block_mask(layout: BlockLayout, token_exact: bool = False, device: torch.device | str = "cpu"):
    """FlexAttention ``BlockMask`` of ``layout`` (B = H = 1, broadcast by flex), ``BLOCK_SIZE = (block_m,
    block_n)``, ``seq_lengths = (q_len, kv_len)``.

    Parameters
    ----------
    layout:
        The layout.
    token_exact:
        False (SparVAR's default): every active block goes into the *full* tables, so flex computes it whole
        and never calls ``mask_mod`` on the hot path. True: full blocks full, partial blocks partial with a
        ``mask_mod`` reading the layout's token masks (required).
    device:
        Where the tables (and the mask_mod's lookup tensors) live; flex wants them on the inputs' device.

    Notes
    -----
    Compiled flex on the GPU needs its kernel tile to divide the sparse block: for blocks smaller than its
    default tile (128 queries on Hopper), pass ``kernel_options={"BLOCK_M": block_m, "BLOCK_N": block_n}``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    kb = layout.kv_blocks
    if token_exact:
        if not layout.has_token_masks:
            raise LayoutError("token_exact needs a layout with token masks (build it with token_masks=True)")
        part = _padded_table(*layout.tables("partial"), kb, device)
        full = _padded_table(*layout.tables("full"), kb, device)
    else:
        part = (torch.zeros((1, 1, layout.q_blocks), dtype=torch.int32, device=device),
                torch.zeros((1, 1, layout.q_blocks, kb), dtype=torch.int32, device=device))
        full = _padded_table(*layout.tables("active"), kb, device)
    return BlockMask.from_kv_blocks(part[0], part[1], full[0], full[1],
                                    BLOCK_SIZE=(layout.block_m, layout.block_n),
                                    mask_mod=layout_mask_mod(layout, token_exact, device),
                                    seq_lengths=(layout.q_len, layout.kv_len))


def _table_rows(num: torch.Tensor, idx: torch.Tensor, name: str) -> list[np.ndarray]:
    """Per query block, the sorted kv block numbers of one BlockMask table (checked equal over batch/heads)."""
    num_np = num.detach().cpu().numpy().astype(np.int64)
    idx_np = idx.detach().cpu().numpy().astype(np.int64)
    if num_np.ndim != 3 or idx_np.ndim != 4 or idx_np.shape[:3] != num_np.shape:
        raise LayoutError(f"BlockMask {name} tables must be [B, H, q_blocks] and [B, H, q_blocks, n], got "
                          f"{tuple(num.shape)} and {tuple(idx.shape)}")
    flat_num = num_np.reshape(-1, num_np.shape[2])
    flat_idx = idx_np.reshape(-1, *idx_np.shape[2:])
    rows0 = None
    for n_bh, i_bh in zip(flat_num, flat_idx):
        if np.any(n_bh < 0) or np.any(n_bh > i_bh.shape[1]):
            raise LayoutError(f"BlockMask {name} counts must lie in [0, {i_bh.shape[1]}]")
        rows = [np.sort(i_bh[r, : n_bh[r]]) for r in range(n_bh.shape[0])]
        if rows0 is None:
            rows0 = rows
        elif any(a.shape != b.shape or np.any(a != b) for a, b in zip(rows, rows0)):
            raise LayoutError("BlockMask differs between batch elements or heads; a BlockLayout is one layout "
                              "for all of them")
    return rows0 or []


def from_block_mask(block_mask, q_len: int | None = None, kv_len: int | None = None,
                    token_masks: bool = False) -> BlockLayout:
    """The :class:`BlockLayout` of a FlexAttention ``BlockMask`` (flex's full blocks -> full, partial ->
    partial).

    Parameters
    ----------
    block_mask:
        A ``BlockMask`` with equal tables for every batch element and head.
    q_len, kv_len:
        Token lengths; default ``block_mask.seq_lengths``. Must fit its number of blocks.
    token_masks:
        Also record each partial block's exact token mask by evaluating ``block_mask.mask_mod`` (batch 0, head
        0) - what a token-exact kernel needs. Without it the partial blocks carry no mask (block level).

    Raises
    ------
    LayoutError
        Tables that differ between batch elements or heads, block sizes we cannot tile, lengths that do not
        match the tables, or a block listed both full and partial.
    """
    seq = tuple(getattr(block_mask, "seq_lengths", None) or ())
    q_len = int(q_len if q_len is not None else seq[0])
    kv_len = int(kv_len if kv_len is not None else seq[1])
    bs = block_mask.BLOCK_SIZE
    bm, bn = (bs, bs) if isinstance(bs, int) else (int(bs[0]), int(bs[1]))
    check_block_size(bm, "BlockMask Q block size")
    check_block_size(bn, "BlockMask KV block size")
    qb, kb = _ceil_div(q_len, bm), _ceil_div(kv_len, bn)
    partial = _table_rows(block_mask.kv_num_blocks, block_mask.kv_indices, "kv")
    full = ([] if block_mask.full_kv_num_blocks is None else
            _table_rows(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, "full_kv"))
    if len(partial) != qb or (full and len(full) != qb):
        raise LayoutError(f"BlockMask has {len(partial)} query blocks, {q_len} queries in blocks of {bm} need {qb}")
    kinds = np.full((qb, kb), EMPTY, dtype=np.int8)
    for table, kind in ((full, FULL), (partial, PARTIAL)):
        for r, cols in enumerate(table):
            if cols.size and (cols.min() < 0 or cols.max() >= kb):
                raise LayoutError(f"BlockMask query block {r} lists kv blocks outside [0, {kb}) for kv_len "
                                  f"{kv_len} in blocks of {bn}")
            if np.any(kinds[r, cols] != EMPTY):
                raise LayoutError(f"BlockMask query block {r} lists a kv block twice (full and partial?)")
            kinds[r, cols] = kind
    masks = (_partial_masks_from(block_mask.mask_mod, kinds, q_len, kv_len, bm, bn, block_mask.kv_indices.device)
             if token_masks else None)
    return BlockLayout.from_kinds(kinds, q_len, kv_len, bm, bn, masks)


def _partial_masks_from(mask_mod: Callable[..., Any], kinds: np.ndarray, q_len: int, kv_len: int, bm: int,
                        bn: int, device: torch.device) -> np.ndarray:
    from torch.nn.attention.flex_attention import create_mask

    dense = create_mask(mask_mod, 1, 1, q_len, kv_len, device=device)[0, 0].cpu().numpy().astype(bool)
    return _pack_blocks(dense, kinds, bm, bn)


def _pack_blocks(dense: np.ndarray, kinds: np.ndarray, bm: int, bn: int) -> np.ndarray:
    """Bitmasks ``[n_partial, bm, ceil(bn/32)]`` uint32 of the partial blocks of a dense token mask (row-major
    block order, which is the order of ``partial_indices``); tails past the lengths are 0."""
    qb, kb = kinds.shape
    padded = np.zeros((qb * bm, kb * bn), dtype=bool)
    padded[: dense.shape[0], : dense.shape[1]] = dense
    pr, pc = np.nonzero(kinds == PARTIAL)
    bits = padded.reshape(qb, bm, kb, bn).transpose(0, 2, 1, 3)[pr, pc]
    words = _ceil_div(bn, 32)
    if words * 32 != bn:
        bits = np.concatenate([bits, np.zeros(bits.shape[:2] + (words * 32 - bn,), bool)], axis=2)
    return np.packbits(bits, axis=2, bitorder="little").view("<u4").reshape(len(pr), bm, words)


# ---------------------------------------------------------------------------------------------- plain BSR
@dataclass(frozen=True, eq=False)
class BsrLayout:
    """A layout as plain block compressed sparse rows (SciPy's ``bsr_matrix`` structure, FlashInfer's input).

    Attributes
    ----------
    indptr:
        ``[M_blocks + 1]`` int32 row offsets into ``indices``.
    indices:
        ``[nnz]`` int32 kv block numbers, sorted within each row.
    M, N:
        Query and key lengths in tokens.
    R, C:
        Block rows (queries) and columns (keys).
    mask:
        Optional ``[nnz, R, C]`` boolean token mask of every listed block (token exact); rows and columns past
        ``M``/``N`` are False. None: every listed block is computed whole.
    """

    indptr: np.ndarray
    indices: np.ndarray
    M: int
    N: int
    R: int
    C: int
    mask: np.ndarray | None = None

    def plan_kwargs(self, device: torch.device | str = "cpu") -> dict[str, Any]:
        """Keyword arguments for FlashInfer's ``BlockSparseAttentionWrapper.plan`` (add heads and head_dim)."""
        kw: dict[str, Any] = {"indptr": torch.from_numpy(self.indptr).to(device),
                              "indices": torch.from_numpy(self.indices).to(device),
                              "M": self.M, "N": self.N, "R": self.R, "C": self.C}
        if self.mask is not None:
            kw["mask"] = torch.from_numpy(self.mask).to(device)
        return kw


def to_bsr(layout: BlockLayout, with_mask: bool = False) -> BsrLayout:
    """Every active block of ``layout`` as plain BSR; ``with_mask`` adds the token mask of every block
    (requires token masks: full blocks all True within bounds, partial blocks their bits)."""
    indptr, indices = layout.bsr()
    mask = None
    if with_mask:
        if not layout.has_token_masks:
            raise LayoutError("with_mask needs a layout with token masks (build it with token_masks=True)")
        bm, bn = layout.block_m, layout.block_n
        padded = np.zeros((layout.q_blocks * bm, layout.kv_blocks * bn), dtype=bool)
        padded[: layout.q_len, : layout.kv_len] = layout.to_token_mask(exact=True)
        rows = np.repeat(np.arange(layout.q_blocks), np.diff(indptr))
        mask = np.ascontiguousarray(padded.reshape(layout.q_blocks, bm, layout.kv_blocks, bn)
                                    .transpose(0, 2, 1, 3)[rows, indices])
    return BsrLayout(indptr.astype(np.int32), indices.astype(np.int32), layout.q_len, layout.kv_len,
                     layout.block_m, layout.block_n, mask)


def from_bsr(bsr: BsrLayout) -> BlockLayout:
    """The :class:`BlockLayout` of plain BSR.

    Without a mask every listed block is full. With one, each block is classified by its in-bounds pairs
    (all kept: full, some: partial with token masks, none: dropped), as :meth:`BlockLayout.from_token_mask`
    does, so a token-exact layout made by it round-trips exactly.
    """
    R, C = check_block_size(bsr.R, "R"), check_block_size(bsr.C, "C")
    qb, kb = _ceil_div(bsr.M, R), _ceil_div(bsr.N, C)
    indptr = np.asarray(bsr.indptr, dtype=np.int64)
    indices = np.asarray(bsr.indices, dtype=np.int64)
    if indptr.shape != (qb + 1,) or indptr[0] != 0 or np.any(np.diff(indptr) < 0) or indptr[-1] != indices.size:
        raise LayoutError(f"indptr must be {qb + 1} non-decreasing offsets from 0 to {indices.size}")
    if indices.size and (indices.min() < 0 or indices.max() >= kb):
        raise LayoutError(f"indices must be kv block numbers in [0, {kb})")
    rows = np.repeat(np.arange(qb), np.diff(indptr))
    active = np.zeros((qb, kb), dtype=bool)
    active[rows, indices] = True
    if int(active.sum()) != indices.size:
        raise LayoutError("indices list a block twice within a row")
    if bsr.mask is None:
        return BlockLayout.from_block_mask(active, bsr.M, bsr.N, R, C)
    mask = np.asarray(bsr.mask)
    if mask.dtype != np.bool_ or mask.shape != (indices.size, R, C):
        raise LayoutError(f"mask must be boolean [{indices.size}, {R}, {C}], got {mask.dtype} {mask.shape}")
    padded = np.zeros((qb, kb, R, C), dtype=bool)
    padded[rows, indices] = mask
    dense = padded.transpose(0, 2, 1, 3).reshape(qb * R, kb * C)[: bsr.M, : bsr.N]
    return BlockLayout.from_token_mask(np.ascontiguousarray(dense), R, C, token_masks=True)
