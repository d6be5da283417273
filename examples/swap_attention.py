"""How a model swaps its self-attention for a sparvar runtime module.

A small Infinity-shaped stack of our own (random weights): scale by scale, each layer projects the new scale's
tokens to q/k/v, L2-normalises q and k (q times a learned per-head scale, softmax scale 1.0, as Infinity does),
appends k/v to that layer's KV cache, and attends from the current scale's queries to the whole cache. The only
change a model needs is the attention call: ``module.attention(q, k, v, scale_index, layer_index)``.

    .venv/bin/python examples/swap_attention.py            # emits the module for --gpu (default h100), then
                                                            # runs on the GPU if present, else the CPU fallback
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import sparvar_compiler.runtime as rt
from sparvar_compiler.emit.emitter import emit_module
from sparvar_compiler.planner import PlanConfig, get_gpu, make_plan

HERE = Path(__file__).resolve().parent


class TinyInfinity(torch.nn.Module):
    def __init__(self, depth: int, heads: int, head_dim: int):
        super().__init__()
        width = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(width, 3 * width) for _ in range(depth))
        self.proj = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))
        self.q_scale = torch.nn.Parameter(torch.full((depth, heads, 1, 1), 8.0))

    def forward_scale(self, x: torch.Tensor, scale_index: int, cache: list[dict], attention) -> torch.Tensor:
        """One scale's tokens ``x [B, tokens, width]`` through every layer; ``cache[layer]`` grows by one scale."""
        B, N, _ = x.shape
        for layer, (qkv, proj) in enumerate(zip(self.qkv, self.proj)):
            q, k, v = qkv(x).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q = F.normalize(q, dim=-1) * self.q_scale[layer]
            k = F.normalize(k, dim=-1)
            c = cache[layer]
            c["k"] = k if "k" not in c else torch.cat([c["k"], k], dim=2)
            c["v"] = v if "v" not in c else torch.cat([c["v"], v], dim=2)
            o = attention(q.contiguous(), c["k"].contiguous(), c["v"].contiguous(), scale_index, layer)
            x = x + proj(o.transpose(1, 2).reshape(B, N, -1))
        return x


def dense_attention(q, k, v, scale_index, layer_index):
    return F.scaled_dot_product_attention(q, k, v, scale=1.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", default="h100", help="target of the emitted module")
    args = ap.parse_args()
    # CSLA from scale 4 on in layers >= 2; the windows keep sinks 0-1 and local windows on scales 2-6.
    plan = make_plan(str(HERE / "tiny-infinity.yaml"),
                     config=PlanConfig(decision_scale=4, bound_layer=2, sink_scales=2, windows=(-1, -1, 1, 1, 3, 5, 7),
                                       cs4a="off"))
    out = Path(tempfile.mkdtemp()) / "tiny-infinity"
    emit_module(plan, get_gpu(args.gpu), out, block_sizes=(32,), batch=2, progress=print)
    module = rt.load(out)
    device = module.device
    torch.manual_seed(0)
    model = TinyInfinity(plan.depth, plan.heads, plan.head_dim).to(device, torch.bfloat16)
    tokens = [torch.randn(2, s.tokens, plan.heads * plan.head_dim, device=device, dtype=torch.bfloat16)
              for s in plan.scales]
    with torch.no_grad():
        for name, attention in (("dense", dense_attention), ("sparvar", module.attention)):
            cache = [{} for _ in range(plan.depth)]
            outs = [model.forward_scale(x, i, cache, attention) for i, x in enumerate(tokens)]
            if name == "dense":
                dense_outs = outs
        for s, a, b in zip(plan.scales, dense_outs, outs):
            err = ((a.float() - b.float()).norm() / a.float().norm()).item()
            print(f"scale {s.index} ({s.h}x{s.w}, {module.op(s.index, plan.depth - 1)[0]} in the last layer): "
                  f"relative difference to dense {err:.3e}")


if __name__ == "__main__":
    main()
