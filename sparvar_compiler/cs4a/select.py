"""CS4A selection and index tables (torch, any device, no host synchronisation).

Pipeline for one layer below the bound layer, per image:

1. The decision scale S runs dense attention, returning its log-sum-exp; the statistics kernel
   (:mod:`sparvar_compiler.codegen.cs4a_stats`, or :func:`group_mass` here on the CPU) sums each query group's
   softmax columns: ``mass[b, h, g, key]``.
2. Selection: token top-k per group (:func:`topk_keys`), or for D-CSLA per query block the key blocks covering
   ``dcsla_coverage`` of the row's mass (:func:`dcsla_select`).
3. Each later CS4A scale fills its fixed-shape tables from the selection: :meth:`TokenTables.fill` (gather
   kernel: key indices per query group) or :meth:`BlockTables.fill` (block-sparse kernel: key blocks per query
   block). Everything but the selected indices (group mapping, bands, sinks, diagonal blocks, capacities) is
   static and comes from :mod:`sparvar_compiler.planner.cs4a`.

Table conventions, shared with the kernels: ``num`` int32 ``[B, H, rows]`` and ``idx`` int32
``[B, H, rows, capacity]``; a row's first ``num`` entries are distinct, sorted ascending; the rest repeat a
valid index (never read past ``num`` unmasked), so loads stay in bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from ..planner.cs4a import band_keys, check_table_sizes, cs4a_tables, dcsla_capacity, group_mapping, round_to_tile
from ..planner.plan import Mode, Plan

_TILE = 128  # the widest key tile of a gather kernel: token tables are padded to a multiple of it


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------- statistics
def group_mass_reference(q: torch.Tensor, k: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """float64 ``[B, H, G, Nkv]``: per group of ``group`` consecutive queries, the sum of the rows of
    ``softmax(q k^T * scale)`` (the straightforward definition, for tests and fidelity). One group at a time,
    so the whole ``[Nq, Nkv]`` probability matrix is never held."""
    B, H, N, _ = q.shape
    G = _ceil_div(N, group)
    out = torch.empty(B, H, G, k.shape[2], dtype=torch.float64, device=q.device)
    kt = k.double().transpose(-1, -2)
    for g in range(G):
        out[:, :, g] = torch.softmax(q[:, :, g * group:(g + 1) * group].double() @ kt * scale, dim=-1).sum(2)
    return out


def group_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, group: int) -> torch.Tensor:
    """float32 ``[B, H, G, Nkv]``: the group column mass from q, k and the dense pass's natural-log lse
    ``[B, H, Nq]`` (what the statistics kernel computes, in torch: the CPU path)."""
    B, H, N, _ = q.shape
    G = _ceil_div(N, group)
    out = torch.empty(B, H, G, k.shape[2], dtype=torch.float32, device=q.device)
    kt = k.float().transpose(-1, -2)
    for g in range(G):
        sl = slice(g * group, min(N, (g + 1) * group))
        s = q[:, :, sl].float() @ kt * scale
        out[:, :, g] = torch.exp(s - lse[:, :, sl, None].float()).sum(2)
    return out


def topk_keys(mass: torch.Tensor, k: int) -> torch.Tensor:
    """int64 ``[..., k]``: the ``k`` keys of largest mass per row, sorted by key index (memory order)."""
    if not 0 < k <= mass.shape[-1]:
        raise ValueError(f"top-k of {k} keys out of {mass.shape[-1]}")
    return torch.topk(mass, k, dim=-1, sorted=False).indices.sort(dim=-1).values


def block_mass(mass: torch.Tensor, block_n: int) -> torch.Tensor:
    """``[..., ceil(Nkv / block_n)]``: ``mass`` summed over key blocks."""
    kv = mass.shape[-1]
    kb = _ceil_div(kv, block_n)
    pad = torch.zeros(*mass.shape[:-1], kb * block_n - kv, dtype=mass.dtype, device=mass.device)
    return torch.cat([mass, pad], dim=-1).view(*mass.shape[:-1], kb, block_n).sum(-1)


def dcsla_select(mass_blocks: torch.Tensor, coverage: float, min_blocks: int, capacity: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """D-CSLA: per row, the fewest key blocks (by mass) covering ``coverage`` of the row's mass, clamped to
    ``[min_blocks, capacity]``.

    Returns ``(blocks, count)``: int64 ``[..., capacity]`` blocks by decreasing mass (only the first ``count``
    are selected) and int64 ``[...]`` counts. Fixed shapes, no host sync.
    """
    vals, idx = torch.topk(mass_blocks, capacity, dim=-1, sorted=True)
    total = mass_blocks.sum(-1, keepdim=True)
    # Blocks needed = 1 + how many prefixes still fall short of the target.
    count = (vals.cumsum(-1) < coverage * total).sum(-1) + 1
    count = count.clamp(min(min_blocks, capacity), capacity)
    return idx, count


def compact_rows(idx: torch.Tensor, sentinel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of each row, ascending, padded with the row's smallest.

    ``idx`` int ``[..., C]`` of valid indices ``< sentinel`` (duplicates allowed). Returns int32 ``num [...]``
    and int32 ``[..., C]`` rows whose first ``num`` entries are distinct and ascending. Fixed shapes and no
    sort: a presence bitmap over ``[0, sentinel)``, its running count gives each present value its slot.
    """
    lead, C = idx.shape[:-1], idx.shape[-1]
    present = torch.zeros(*lead, sentinel, dtype=torch.int32, device=idx.device)
    present.scatter_(-1, idx.long(), 1)
    slot = present.cumsum(-1, dtype=torch.int32) - 1
    num = slot[..., -1] + 1
    # Absent values go to a spill column C, dropped afterwards.
    slot = torch.where(present.bool(), slot, C).long()
    values = torch.arange(sentinel, dtype=torch.int32, device=idx.device).expand_as(present)
    out = torch.zeros(*lead, C + 1, dtype=torch.int32, device=idx.device)
    out.scatter_(-1, slot, values)
    out = out[..., :C]
    keep = torch.arange(C, device=idx.device) < num[..., None]
    return num, torch.where(keep, out, out[..., :1]).contiguous()


def interpolation_matrix(n_in: int, n_out: int) -> np.ndarray:
    """float64 ``[n_out, n_in]``: 1-D linear interpolation with half-pixel centres and edge clamping (what
    ``F.interpolate(mode="bilinear", align_corners=False)`` does along one axis)."""
    a = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        lam = src - i0
        a[i, i0] += 1.0 - lam
        a[i, i1] += lam
    return a


_MATRICES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def upsample_add(out: torch.Tensor, residual: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]
                 ) -> torch.Tensor:
    """``out += upsample_grid(residual, src, dst)`` without the upsampled temporary's permutes: separable
    bilinear as two batched matmuls (rows, then columns with the add fused through ``baddbmm``)."""
    B, H, N, D = residual.shape
    (h, w), (h2, w2) = src, dst
    key = (h, w, h2, w2, residual.dtype, residual.device)
    if key not in _MATRICES:
        _MATRICES[key] = tuple(torch.from_numpy(interpolation_matrix(a, b)).to(residual.device, residual.dtype)
                               for a, b in ((h, h2), (w, w2)))
    a_h, a_w = _MATRICES[key]
    rows = torch.matmul(a_h, residual.reshape(B * H, h, w * D))  # [BH, h2, w*D]
    n = B * H * h2
    out.view(n, w2, D).baddbmm_(a_w.expand(n, w2, w), rows.view(n, w, D))
    return out


# --------------------------------------------------------------------------------------------- tables
class _OnDevice:
    """Caches torch copies of a frozen table object's numpy arrays per device."""

    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        cache = self._cache  # type: ignore[attr-defined]
        key = str(device)
        if key not in cache:
            cache[key] = {n: torch.from_numpy(np.ascontiguousarray(getattr(self, n))).to(device)
                          for n in self._arrays}  # type: ignore[attr-defined]
        return cache[key]


@dataclass(frozen=True, eq=False)
class TokenTables(_OnDevice):
    """Static part of the token top-k tables of one scale (a later CS4A scale, or the decision scale itself,
    whose sparse output the residual needs).

    Row ``g`` (query group ``g`` of ``group_size`` queries) attends to the top-k keys of decision group
    ``decision_group[g]``, mapped through ``key_map`` (None: identity), then to ``static_keys[g, :static_len[g]]``
    (its own band, the reused bands of earlier CS4A scales, and decompose-align-project's sinks, merged).
    ``dedup`` is False only when mapped keys can never meet static ones (identity mapping, static keys past the
    decision scale's cache), which saves two sorts per call.
    """

    scale: int
    q_len: int
    kv_len: int
    group_size: int
    topk: int
    decision_group: np.ndarray
    key_map: np.ndarray | None
    static_keys: np.ndarray
    static_len: np.ndarray
    capacity: int
    dedup: bool
    decision_kv_len: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _arrays = ("decision_group", "static_keys", "static_len", "key_map_or_empty")

    @property
    def groups(self) -> int:
        return len(self.decision_group)

    @property
    def key_map_or_empty(self) -> np.ndarray:
        return self.key_map if self.key_map is not None else np.zeros(0, dtype=np.int32)

    def fill(self, topk: torch.Tensor, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables ``(num [B, H, G], idx [B, H, G, capacity])`` (int32) from the decision scale's selection
        ``topk`` ``[B, H, G_S, topk]`` (int, sorted per row).

        ``reuse=True`` (the runtime's hot path) writes into buffers kept per device and shape, whose static part
        was written once: only the selected columns are written per call. The returned tensors are then
        overwritten by the next call, so consume them first (stream order does it for kernel launches).
        """
        t = self._tensors(topk.device)
        B, H = topk.shape[:2]
        G, cap, kk = self.groups, self.capacity, self.topk
        sel = topk.index_select(2, t["decision_group"])
        if self.key_map is not None:
            sel = t["key_map_or_empty"].long()[sel.long()]
        static = t["static_keys"]
        key = ("buffers", str(topk.device), B, H)
        if reuse and not self.dedup and key in self._cache:
            num, idx = self._cache[key]
            idx[..., :kk] = sel
            if not static.shape[1]:
                idx[..., kk:] = sel[..., -1:]
            return num, idx
        idx = torch.empty(B, H, G, cap, dtype=torch.int32, device=topk.device)
        idx[..., :kk] = sel
        idx[..., kk: kk + static.shape[1]] = static
        idx[..., kk + static.shape[1]:] = static[:, -1:] if static.shape[1] else sel[..., -1:]
        if self.dedup:
            num, compacted = compact_rows(idx.long(), self.kv_len)
            return num, compacted
        num = (t["static_len"] + kk).expand(B, H, G).to(torch.int32).contiguous()
        if reuse:
            self._cache[key] = (num, idx)
        return num, idx


@dataclass(frozen=True, eq=False)
class BlockTables(_OnDevice):
    """Static part of the D-CSLA tables of one scale: query block ``r`` (``block`` queries) keeps the selected
    key blocks of decision row ``decision_row[r]`` (identity mapping: the decision scale's cache is a prefix of
    this one) plus ``static_blocks[r, :static_len[r]]`` (the +-1 diagonal blocks and the sink blocks)."""

    scale: int
    q_len: int
    kv_len: int
    block: int
    select_capacity: int
    decision_row: np.ndarray
    static_blocks: np.ndarray
    static_len: np.ndarray
    decision_kv_len: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    _arrays = ("decision_row", "static_blocks")

    @property
    def rows(self) -> int:
        return len(self.decision_row)

    @property
    def capacity(self) -> int:
        return self.select_capacity + self.static_blocks.shape[1]

    @property
    def kv_blocks(self) -> int:
        return _ceil_div(self.kv_len, self.block)

    def fill(self, blocks: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables ``(num [B, H, R], idx [B, H, R, capacity])`` (int32) from :func:`dcsla_select`'s output at
        the decision scale."""
        t = self._tensors(blocks.device)
        B, H = blocks.shape[:2]
        sel = blocks.index_select(2, t["decision_row"]).long()
        cnt = count.index_select(2, t["decision_row"])
        keep = torch.arange(sel.shape[-1], device=sel.device) < cnt[..., None]
        sel = torch.where(keep, sel, sel[..., :1])  # unselected slots repeat a selected block: dropped as dups
        static = t["static_blocks"].long().expand(B, H, -1, -1)
        return compact_rows(torch.cat([sel, static], dim=-1), self.kv_blocks)


def _dap_sinks(plan: Plan, scale_index: int) -> int:
    return plan.scales[scale_index - plan.config.decision_scale].kv_offset


def token_tables(plan: Plan, scale_index: int, mapping: str | None = None) -> TokenTables:
    """The static token tables of ``scale_index``: the decision scale (each group's own top-k only: the sparse
    output the residual is taken against) or a later CS4A scale."""
    cfg = plan.config
    check_table_sizes(plan, "token")
    S, gs = cfg.decision_scale, cfg.group_size
    mapping = mapping or cfg.key_mapping
    sp, dec = plan.scales[scale_index], plan.scales[S]
    if scale_index == S:
        # The residual's sparse output: each group's own top-k keys and nothing else, so that the tables are a
        # plain copy of the selection (no static part to merge, no duplicates to drop).
        groups = -(-dec.tokens // gs)
        topk = min(round_to_tile(cfg.topk_fraction * dec.kv_len, cfg.key_tile), dec.kv_len)
        static = [np.zeros(0, dtype=np.int64)] * groups
        dgroup = np.arange(groups, dtype=np.int64)
        kmap = None
        dedup = False
    else:
        tables = cs4a_tables(plan, mapping)
        if tables is None:
            raise ValueError("the plan has no CS4A scale")
        st = tables.scale(scale_index)
        topk = st.topk
        own = [st.band[g, : st.band_len[g]] for g in range(st.groups)]
        static = []
        reused = []
        for j in st.reused_bands:
            pj = plan.scales[j]
            keys_j = band_keys(pj.h, pj.w, pj.kv_offset, gs, cfg.band_windows[j - S - 1])
            reused.append((keys_j, group_mapping(st.groups, len(keys_j))))
        sinks = np.arange(st.sink_keys, dtype=np.int64)
        for g in range(st.groups):
            parts = [own[g], sinks] + [keys_j[m[g]] for keys_j, m in reused]
            static.append(np.unique(np.concatenate(parts)))
        dgroup = st.decision_group.astype(np.int64)
        kmap = None if mapping == "identity" else st.key_map.astype(np.int32)
        dedup = mapping != "identity" or min(int(s[0]) for s in static) < dec.kv_len
    width = max(len(s) for s in static)
    keys = np.empty((len(static), width), dtype=np.int32)
    for g, s in enumerate(static):
        keys[g, : len(s)] = s
        keys[g, len(s):] = s[-1] if len(s) else 0
    cap = _ceil_div(topk + width, _TILE) * _TILE
    return TokenTables(scale_index, sp.tokens, sp.kv_len, gs, topk, dgroup, kmap, keys,
                       np.array([len(s) for s in static], dtype=np.int32), cap, dedup, dec.kv_len)


def block_tables(plan: Plan, scale_index: int) -> BlockTables:
    """The static D-CSLA tables of ``scale_index`` (the decision scale or a later CS4A scale)."""
    cfg = plan.config
    check_table_sizes(plan, "block")
    bs = cfg.dcsla_block
    S = cfg.decision_scale
    sp, dec = plan.scales[scale_index], plan.scales[S]
    rows, rows_s = _ceil_div(sp.tokens, bs), _ceil_div(dec.tokens, bs)
    kb = _ceil_div(sp.kv_len, bs)
    sink_blocks = _ceil_div(plan.scales[cfg.sink_scales].kv_offset, bs) if cfg.sink_scales else 0
    static = []
    for r in range(rows):
        lo = (sp.kv_offset + r * bs) // bs
        hi = (sp.kv_offset + min(sp.tokens, (r + 1) * bs) - 1) // bs
        diag = np.arange(max(0, lo - 1), min(kb, hi + 2))
        static.append(np.unique(np.concatenate([diag, np.arange(sink_blocks)])))
    width = max(len(s) for s in static)
    blocks = np.empty((rows, width), dtype=np.int64)
    for r, s in enumerate(static):
        blocks[r, : len(s)] = s
        blocks[r, len(s):] = s[-1]
    select_cap = dcsla_capacity(_ceil_div(dec.kv_len, bs), cfg.dcsla_min_blocks, 0.5)
    return BlockTables(scale_index, sp.tokens, sp.kv_len, bs, select_cap, group_mapping(rows, rows_s).astype(np.int64),
                       blocks, np.array([len(s) for s in static], dtype=np.int32), dec.kv_len)


def example_selection(tables: TokenTables | BlockTables, batch: int, heads: int, device: torch.device | str,
                      generator: torch.Generator, coverage: float = 0.9, min_blocks: int = 16):
    """A selection drawn from random decision-scale mass (what tuning and benchmarks feed the dynamic kernels:
    every shape and capacity is the real one; only which keys are picked is random)."""
    if isinstance(tables, TokenTables):
        groups = int(tables.decision_group.max()) + 1
        mass = torch.rand(batch, heads, groups, tables.decision_kv_len, device=device, generator=generator)
        return topk_keys(mass, tables.topk)
    rows = int(tables.decision_row.max()) + 1
    kb = _ceil_div(tables.decision_kv_len, tables.block)
    mass = torch.rand(batch, heads, rows, kb, device=device, generator=generator) ** 4  # a few heavy blocks
    return dcsla_select(mass, coverage, min_blocks, tables.select_capacity)


def fill_tables(tables: TokenTables | BlockTables, selection, reuse: bool = False) -> dict[str, torch.Tensor]:
    """The kernel's table arguments by parameter name, filled from a selection (``reuse``: see
    :meth:`TokenTables.fill`)."""
    if isinstance(tables, TokenTables):
        num, idx = tables.fill(selection, reuse=reuse)
        return {"key_num": num.contiguous(), "key_idx": idx.contiguous()}
    num, idx = tables.fill(*selection)
    return {"kv_num": num.contiguous(), "kv_idx": idx.contiguous()}


def kernel_tables_mask(tables: TokenTables | BlockTables, filled: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool ``[B, H, q_len, kv_len]`` of what the dynamic kernel attends to with ``filled`` tables."""
    if isinstance(tables, TokenTables):
        return tables_mask(filled["key_num"], filled["key_idx"], tables.group_size, tables.q_len, tables.kv_len)
    return tables_mask(filled["kv_num"], filled["kv_idx"], tables.block, tables.q_len, tables.kv_len, tables.block)


# --------------------------------------------------------------------------------------------- masks
def tables_mask(num: torch.Tensor, idx: torch.Tensor, row_size: int, q_len: int, kv_len: int,
                block_n: int | None = None) -> torch.Tensor:
    """bool ``[B, H, q_len, kv_len]``: the (query, key) pairs tables attend to. Rows cover ``row_size``
    consecutive queries; entries are keys, or key blocks of ``block_n`` when given."""
    B, H, R, C = idx.shape
    valid = torch.arange(C, device=idx.device) < num[..., None].long()
    if block_n is None:
        rows = torch.zeros(B, H, R, kv_len + 1, dtype=torch.bool, device=idx.device)
        rows.scatter_(-1, torch.where(valid, idx.long(), kv_len), True)
        rows = rows[..., :kv_len]
    else:
        kb = _ceil_div(kv_len, block_n)
        blk = torch.zeros(B, H, R, kb + 1, dtype=torch.bool, device=idx.device)
        blk.scatter_(-1, torch.where(valid, idx.long(), kb), True)
        rows = blk[..., torch.arange(kv_len, device=idx.device) // block_n]
    # Row of each query, not repeat_interleave(row_size)[:q_len]: a group larger than the scale would first
    # build R * row_size rows (one group of 65536 over a 10k cache, B=2, H=16: 22 GB) to keep q_len of them.
    row_of = torch.clamp(torch.arange(q_len, device=idx.device) // row_size, max=R - 1)
    return rows[:, :, row_of]


def _selection(plan: Plan, q_dec: torch.Tensor, k_dec: torch.Tensor, scale: float, mode: str):
    cfg = plan.config
    if mode == "token":
        mass = group_mass_reference(q_dec, k_dec, scale, cfg.group_size)
        return topk_keys(mass, token_tables(plan, cfg.decision_scale).topk)
    mass = block_mass(group_mass_reference(q_dec, k_dec, scale, cfg.dcsla_block), cfg.dcsla_block)
    cap = block_tables(plan, cfg.decision_scale).select_capacity
    return dcsla_select(mass, cfg.dcsla_coverage, cfg.dcsla_min_blocks, cap)


def _mask_for(plan: Plan, scale_index: int, sel, mode: str, mapping: str | None) -> torch.Tensor:
    if mode == "token":
        t = token_tables(plan, scale_index, mapping)
        num, idx = t.fill(sel)
        return tables_mask(num, idx, t.group_size, t.q_len, t.kv_len)
    if (mapping or plan.config.key_mapping) != "identity":
        raise ValueError("D-CSLA (cs4a: block) supports the identity key mapping only: a mapped token does not "
                         "keep its block")
    b = block_tables(plan, scale_index)
    num, idx = b.fill(*sel)
    return tables_mask(num, idx, b.block, b.q_len, b.kv_len, block_n=b.block)


def _mode(plan: Plan, mode: str | None) -> str:
    mode = mode or plan.config.cs4a
    if mode not in ("token", "block"):
        raise ValueError(f"CS4A mode must be 'token' or 'block', got {mode!r}")
    return mode


def cs4a_masks(plan: Plan, q_dec: torch.Tensor, k_dec: torch.Tensor, softmax_scale: float,
               mapping: str | None = None, mode: str | None = None) -> dict[int, torch.Tensor]:
    """Reference CS4A patterns of one layer: for every CS4A scale after the decision scale, bool
    ``[B, H, tokens, kv_len]`` of the keys each query attends to, selected from the decision scale's ``q_dec``
    ``[B, H, tokens_S, D]`` and ``k_dec`` ``[B, H, kv_len_S, D]`` (float64 statistics)."""
    mode = _mode(plan, mode)
    sel = _selection(plan, q_dec, k_dec, softmax_scale, mode)
    return {s.index: _mask_for(plan, s.index, sel, mode, mapping) for s in plan.scales
            if s.index > plan.config.decision_scale and Mode.CS4A in s.modes}


def decision_mask(plan: Plan, q_dec: torch.Tensor, k_dec: torch.Tensor, softmax_scale: float,
                  mapping: str | None = None, mode: str | None = None) -> torch.Tensor:
    """bool ``[B, H, tokens_S, kv_len_S]``: the sparse pattern at the decision scale itself, whose output the
    residual ``O_dense - O_sparse`` is taken against."""
    mode = _mode(plan, mode)
    sel = _selection(plan, q_dec, k_dec, softmax_scale, mode)
    return _mask_for(plan, plan.config.decision_scale, sel, mode, "identity")


def upsample_grid(residual: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (half-pixel centres) of ``[B, H, h*w, D]`` tokens on grid ``src = (h, w)`` to grid
    ``dst``: ``[B, H, h'*w', D]`` (any aspect ratio)."""
    B, H, N, D = residual.shape
    (h, w), (h2, w2) = src, dst
    if N != h * w:
        raise ValueError(f"residual has {N} tokens, not {h}x{w}")
    x = residual.reshape(B, H, h, w, D).permute(0, 1, 4, 2, 3).reshape(B, H * D, h, w)
    dtype = x.dtype
    if x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        x = x.float()  # CPU bilinear kernels do not all take half types
    y = torch.nn.functional.interpolate(x, size=(h2, w2), mode="bilinear", align_corners=False)
    return y.to(dtype).reshape(B, H, D, h2, w2).permute(0, 1, 3, 4, 2).reshape(B, H, h2 * w2, D)


def upsample_residual(residual: torch.Tensor, plan: Plan, scale_index: int) -> torch.Tensor:
    """The decision scale's residual ``[B, H, tokens_S, D]`` upsampled to scale ``scale_index``'s grid."""
    dec, sp = plan.scales[plan.config.decision_scale], plan.scales[scale_index]
    return upsample_grid(residual, (dec.h, dec.w), (sp.h, sp.w))


# --------------------------------------------------------------------------------------------- storage
def tables_to_data(tables: TokenTables | BlockTables) -> tuple[dict, dict[str, np.ndarray]]:
    """``(scalars, arrays)`` of static tables: JSON-able scalars for a manifest and numpy arrays for an npz."""
    scalars, arrays = {"kind": "token" if isinstance(tables, TokenTables) else "block"}, {}
    for f in fields(tables):
        if f.name.startswith("_"):
            continue
        value = getattr(tables, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif value is not None:
            scalars[f.name] = value
    return scalars, arrays


def tables_from_data(scalars: dict, arrays: dict[str, np.ndarray]) -> TokenTables | BlockTables:
    """Inverse of :func:`tables_to_data`; raises ``ValueError`` naming a missing or malformed field."""
    cls = {"token": TokenTables, "block": BlockTables}.get(scalars.get("kind"))
    if cls is None:
        raise ValueError(f"CS4A tables of unknown kind {scalars.get('kind')!r}")
    kw = {}
    for f in fields(cls):
        if f.name.startswith("_"):
            continue
        if f.name in arrays:
            kw[f.name] = np.asarray(arrays[f.name])
        elif f.name in scalars:
            kw[f.name] = scalars[f.name]
        elif f.name == "key_map":
            kw[f.name] = None
        else:
            raise ValueError(f"CS4A {scalars['kind']} tables miss field {f.name!r}")
    t = cls(**kw)
    rows = t.groups if isinstance(t, TokenTables) else t.rows
    lens = t.static_len
    if lens.shape != (rows,) or int(lens.max(initial=0)) > (t.static_keys if isinstance(t, TokenTables)
                                                              else t.static_blocks).shape[1]:
        raise ValueError(f"CS4A tables of scale {t.scale} are inconsistent (static lengths vs widths)")
    return t


__all__ = ["BlockTables", "TokenTables", "block_mass", "block_tables", "compact_rows", "cs4a_masks",
           "decision_mask", "dcsla_select", "group_mass", "group_mass_reference", "tables_mask", "token_tables",
           "topk_keys", "upsample_grid", "upsample_residual", "tables_to_data", "tables_from_data",
           "example_selection", "fill_tables", "kernel_tables_mask", "interpolation_matrix", "upsample_add"]
