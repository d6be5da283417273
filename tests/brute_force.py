"""Independent, slow re-implementations of the CSLA definition, for tests only.

Nothing here shares code with sparvar_compiler.planner: the window test is written straight from SPEC.md with
Python's round() (ties to even), and coarsening loops over tokens.
"""

from __future__ import annotations

import numpy as np


def token_mask(grids, query_scale, windows, sink_scales):
    hq, wq = grids[query_scale]
    offsets = [0]
    for h, w in grids:
        offsets.append(offsets[-1] + h * w)
    kv_len = offsets[query_scale + 1]
    mask = np.zeros((hq * wq, kv_len), dtype=bool)
    for y in range(hq):
        for x in range(wq):
            q = y * wq + x
            for k in range(query_scale + 1):
                hk, wk = grids[k]
                base = offsets[k]
                if k < sink_scales:
                    mask[q, base:base + hk * wk] = True
                    continue
                r = windows[k]
                if r < 0:
                    continue
                cy, cx = round(y * hk / hq), round(x * wk / wq)
                for u in range(hk):
                    if abs(u - cy) > r // 2:
                        continue
                    for v in range(wk):
                        if abs(v - cx) <= r // 2:
                            mask[q, base + u * wk + v] = True
    return mask


def block_kinds(mask, bm, bn):
    """0 empty, 1 partial, 2 full, by counting tokens block by block."""
    nq, nk = mask.shape
    qb, kb = -(-nq // bm), -(-nk // bn)
    out = np.zeros((qb, kb), dtype=np.int8)
    for i in range(qb):
        for j in range(kb):
            blk = mask[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            if blk.all():
                out[i, j] = 2
            elif blk.any():
                out[i, j] = 1
    return out
